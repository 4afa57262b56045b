"""One regression test per wrong-output defect the fidelity matrix found (each fails before its fix).

1. modules_to_save: the saved module was applied to every row of a mixed batch;
2. sliding-window attention with the shared prompt prefix: shorter prompts came out wrong;
3. LoRA on a mixture-of-experts shared expert: routed by rows while its input is flattened tokens;
4. the generation cache ignored the dtype (and the path, tokenizer and generation config);
5. valid adapters refused: GPT-2's non-square Conv1D (fan_in_fan_out) and `lora_bias`.
Models and adapters are the tiny random-weight ones of `tiny_models`; the reference is plain
transformers + PEFT with each prompt alone and the adapter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from contract.config import GenerationConfig
from tests.tiny_models import ADAPTERS, EOS_IDS, make_adapter, make_model, plain_reference

NEW_TOKENS = 8


def _load(base: Path, adapters: dict[str, Path]) -> Any:
    """Base + adapters the way the worker's model host loads them (one PeftModel, routing installed)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.engine import lora_routing

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    for name, folder in adapters.items():
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False).eval()
    lora_routing.install(model)
    return model


def _alone(base: Path, adapter: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    return plain_reference(base, adapter, prompts, NEW_TOKENS)


def _prompts(base: Path, lengths: tuple[int, ...] = (2, 5, 9, 30)) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    words = "the quick brown fox jumps over lazy dog lora base model".split()
    texts = [" ".join(words[(i + k) % len(words)] for k in range(n)) for i, n in enumerate(lengths)]
    return [tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for t in texts]


def _decode(model: Any, prompts: list[list[int]], names: list[str] | None, **options: Any) -> list[list[int]]:
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows

    request = DecodeRequest(GenerationConfig(max_new_tokens=NEW_TOKENS), set(EOS_IDS), 0, torch.device("cpu"))
    return decode_rows(model, prompts, request, options=DecodeOptions(**{"capacity": 8, **options}),
                       adapter_names=names)


def _mixed_rows(prompts: list[list[int]], names: list[str]) -> tuple[list[list[int]], list[str]]:
    rows = [(p, n) for p in prompts for n in names]
    return [p for p, _ in rows], [n for _, n in rows]


def test_1_modules_to_save_applies_only_to_its_adapters_rows(tmp_path: Path) -> None:
    base = make_model("llama", tmp_path / "llama")
    adapters = {name: make_adapter(base, "llama", ADAPTERS[name], tmp_path / name, seed=i)
                for i, name in enumerate(["r1", "saves_norm"])}
    prompts = _prompts(base)
    model = _load(base, adapters)
    flat, names = _mixed_rows(prompts, ["__base__", "r1", "saves_norm"])
    got = _decode(model, flat, names)
    expected = {"__base__": _alone(base, None, prompts), **{n: _alone(base, f, prompts) for n, f in adapters.items()}}
    assert expected["saves_norm"] != expected["__base__"]  # the saved norm really changes outputs
    assert got == [expected[n][i // 3] for i, n in enumerate(names)]


def test_2_sliding_window_with_a_shared_prefix_keeps_short_prompts_right(tmp_path: Path) -> None:
    base = make_model("mistral", tmp_path / "mistral")  # window of 8 tokens, prompts of 20 to 50
    prompts = _prompts(base)
    model = _load(base, {})
    assert _decode(model, prompts, None, share_prefix=True) == _alone(base, None, prompts)


def test_3_lora_on_a_moe_shared_expert_is_not_sliced_as_rows(tmp_path: Path) -> None:
    base = make_model("qwen2_moe", tmp_path / "moe")
    adapter = make_adapter(base, "qwen2_moe", ADAPTERS["r64_rslora"], tmp_path / "expert", seed=3)  # shared expert
    prompts = _prompts(base)
    model = _load(base, {"expert": adapter})
    expected = {"__base__": _alone(base, None, prompts), "expert": _alone(base, adapter, prompts)}
    assert expected["expert"] != expected["__base__"]
    for capacity in (1, 8):
        flat, names = _mixed_rows(prompts, ["__base__", "expert"])
        assert _decode(model, flat, names, capacity=capacity) == [expected[n][i // 2] for i, n in enumerate(names)]


def test_4_a_bfloat16_run_then_a_float32_run_reuses_nothing(tmp_path: Path) -> None:
    import json
    import sqlite3

    from click.testing import CliRunner

    from producer.cli import cli

    base = make_model("llama", tmp_path / "llama")
    adapter = make_adapter(base, "llama", ADAPTERS["r1"], tmp_path / "r1", seed=1)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"what is {i} plus {i + 3}"}) + "\n" for i in range(6)))
    db = tmp_path / "runs.db"
    runner = CliRunner()
    for dtype in ("bfloat16", "float32", "float32"):
        config = tmp_path / f"{dtype}.yaml"
        config.write_text(f"name: cache\nmodel:\n  base: {base}\n  adapters:\n    r1: {adapter}\n  dtype: {dtype}\n"
                          f"dataset:\n  path: {data}\n  prompt: '{{{{ q }}}}'\ngeneration:\n  max_new_tokens: 6\n")
        result = runner.invoke(cli, ["--database-url", f"sqlite:///{db}", "run", str(config)])
        assert result.exit_code == 0, result.output
    with sqlite3.connect(db) as conn:
        reused = dict(conn.execute("SELECT run_id, count(reused_from) FROM generations GROUP BY run_id").fetchall())
    assert reused == {1: 0, 2: 0, 3: 12}  # float32 after bfloat16: nothing; float32 again: everything


def test_5_gpt2_conv1d_and_lora_bias_adapters_are_accepted(tmp_path: Path) -> None:
    from contract.artifacts import base_model_shapes, check_adapter_fits, inspect_adapter

    for arch in ("gpt2", "llama"):
        base = make_model(arch, tmp_path / arch)
        shapes = base_model_shapes(base)
        # gpt2: c_fc is a non-square Conv1D ([64, 256] stored as [in, out]); both: lora_B carries a bias
        folder = make_adapter(base, arch, ADAPTERS["dropout_lora_bias"], tmp_path / f"{arch}-bias", seed=2)
        info = inspect_adapter("bias", folder)
        assert any(name.endswith("lora_B.bias") for name in info.shapes)
        check_adapter_fits(info, shapes, arch)  # no error


def test_5b_an_adapter_for_another_shape_is_still_refused(tmp_path: Path) -> None:
    from contract.artifacts import base_model_shapes, check_adapter_fits, inspect_adapter
    from contract.errors import AdapterError

    small, other = make_model("gpt2", tmp_path / "gpt2"), tmp_path / "wide"
    import transformers

    wide = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=384, n_embd=96, n_layer=2, n_head=4))
    wide.save_pretrained(str(other))
    folder = make_adapter(small, "gpt2", ADAPTERS["r1"], tmp_path / "a", seed=1)
    with pytest.raises(AdapterError, match="made for another base model"):
        check_adapter_fits(inspect_adapter("a", folder), base_model_shapes(other), "wide")


def test_4b_every_input_of_an_output_is_in_its_cache_key() -> None:
    from dataclasses import replace

    from worker.chunk import cache_key
    from worker.model_host import ModelIdentity

    model = ModelIdentity(base_hash="b", tokenizer_hash="t", dtype="float32", device="cpu", eos_ids=(2,))
    gen = GenerationConfig(max_new_tokens=8)
    key = cache_key(model, "a", [1, 2, 3], gen, path="mixed")
    changed = [
        cache_key(replace(model, base_hash="b2"), "a", [1, 2, 3], gen, path="mixed"),
        cache_key(replace(model, tokenizer_hash="t2"), "a", [1, 2, 3], gen, path="mixed"),
        cache_key(replace(model, dtype="bfloat16"), "a", [1, 2, 3], gen, path="mixed"),
        cache_key(replace(model, device="cuda"), "a", [1, 2, 3], gen, path="mixed"),
        cache_key(replace(model, eos_ids=(2, 3)), "a", [1, 2, 3], gen, path="mixed"),
        cache_key(model, "a", [1, 2, 3], gen, path="merged"),
        cache_key(model, None, [1, 2, 3], gen, path="mixed"),
        cache_key(model, "a", [1, 2, 4], gen, path="mixed"),
        cache_key(model, "a", [1, 2, 3], GenerationConfig(max_new_tokens=9), path="mixed"),
        cache_key(model, "a", [1, 2, 3], GenerationConfig(max_new_tokens=8, stop=("\n",)), path="mixed"),
    ]
    assert key is not None and len({key, *changed}) == len(changed) + 1
    assert cache_key(model, "a", [1, 2, 3], gen, path="mixed") == key  # and it is stable
    assert cache_key(model, "a", [1, 2, 3], GenerationConfig(do_sample=True), path="mixed") is None


def test_4c_the_model_identity_follows_the_tokenizer_files_and_generation_config(tmp_path: Path) -> None:
    import json

    from contract.settings import Settings
    from worker.model_host import ModelHost

    base = make_model("llama", tmp_path / "llama")

    def identity(dtype: str = "float32") -> Any:
        host = ModelHost(Settings.from_env(), device="cpu")
        host.ensure_base(str(base), dtype=dtype)
        return host.identity

    first = identity()
    assert identity() == first
    assert identity("bfloat16").dtype == "bfloat16" and first.dtype == "float32"
    config_file = base / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    config_file.write_text(json.dumps(config))
    after_template = identity()
    assert after_template.tokenizer_hash != first.tokenizer_hash and after_template.base_hash == first.base_hash
    generation = base / "generation_config.json"
    settings = json.loads(generation.read_text())
    settings["eos_token_id"] = [2]
    generation.write_text(json.dumps(settings))
    after_eos = identity()
    assert after_eos.eos_ids == (2,) and after_eos.tokenizer_hash != after_template.tokenizer_hash


def test_an_adapter_that_replaces_the_base_models_biases_is_refused_in_one_line(tmp_path: Path) -> None:
    """bias='all' saves new biases for base layers; PEFT loads them into the base layers, changing the
    base rows and every other adapter's: no path serves that exactly beside other variants."""
    import json

    from click.testing import CliRunner

    from producer.cli import cli
    from tests.tiny_models import AdapterSpec

    base = make_model("qwen2", tmp_path / "qwen2")  # q, k, v have biases
    spec = AdapterSpec("bias_all", lambda a: dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "v_proj"]))
    folder = make_adapter(base, "qwen2", spec, tmp_path / "bias_all", seed=1)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"q": "hello"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"name: bias\nmodel:\n  base: {base}\n  adapters:\n    tuned: {folder}\n"
                      f"dataset:\n  path: {data}\n  prompt: '{{{{ q }}}}'\n")
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'r.db'}", "run", str(config)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "adapter 'tuned' (model.adapters.tuned) was trained with bias='all'" in lines[0]
