"""Outputs equal to plain PEFT across PEFT's LoRA options and the common architectures, or a refusal.

For each architecture of `tiny_models` (Llama, Qwen2 with q/k/v biases, Qwen3, Qwen2-MoE with LoRA on
the shared expert, Mistral with an 8-token sliding window, Gemma, Gemma 2, Gemma 3 text, Phi3's
fused projections, GPT-2's Conv1D), groups of adapters go through `run_chunk` together, as a
user's run would put them: plain LoRA options (rank 1 and 64, rslora, rank/alpha patterns,
layers_to_transform, dropout, lora_bias), LoRA on the embedding and on the LM head, modules_to_save,
and DoRA. Every row (base included) must equal, token for token, plain transformers + PEFT generating
that prompt alone with that adapter alone (float32, greedy), with the fast path on, with each of its
optimisations off alone, and in merged mode. Prompts run from a few tokens to over 300, behind a
shared system prompt (a shared prefix), in batches small enough to refill.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from contract.config import RunConfig
from contract.settings import Settings
from tests.tiny_models import ADAPTERS, ARCHITECTURES, make_adapter, make_model, plain_reference
from worker.chunk import ChunkExample, VariantSpec, run_chunk
from worker.engine import attention
from worker.engine.call import DecodeOptions
from worker.model_host import ModelHost

NEW_TOKENS = 8
GROUPS = {
    "lora options": ["r1", "r64_rslora", "patterns", "dropout_lora_bias"],
    "embedding and head": ["embedding", "lm_head"],
    "modules_to_save": ["saves_norm", "r1"],
    "dora": ["dora", "r1"],
}
FAST = DecodeOptions(capacity=0)  # capacity comes from batch_size x variants in run_chunk
OPTIONS = {
    "fast path": None,
    "refill off": replace(FAST, refill=False),
    "shared prefix off": replace(FAST, share_prefix=False),
    "routed LoRA off": replace(FAST, route_lora=False),
    "all logits": replace(FAST, last_logits_only=False),
    "head on real rows": replace(FAST, pad_output_rows=False),
}
#: Each optimisation switched off alone: the slower part of the matrix.
SLOW_OPTIONS = {"refill off", "shared prefix off", "routed LoRA off", "all logits", "head on real rows"}


def _prompts() -> list[str]:
    rng = random.Random(7)
    words = "the quick brown fox lora adapter base model sliding window expert shared prefix tokens".split()
    lengths = [1, 3, 6, 12, 25, 160]  # the last is over 300 tokens once templated
    return [" ".join(rng.choice(words) for _ in range(n)) for n in lengths]


PROMPTS = _prompts()
SYSTEM = "You answer briefly."


class Family:
    """One architecture's model folder, adapters, and plain-PEFT reference outputs (computed lazily)."""

    def __init__(self, arch: str, root: Path) -> None:
        self.arch, self.base = arch, make_model(arch, root / arch)
        self.adapters = {name: make_adapter(self.base, arch, spec, root / f"{arch}-{name}", seed=10 + i)
                         for i, (name, spec) in enumerate(ADAPTERS.items())}
        self._reference: dict[str | None, list[list[int]]] = {}
        self.hosts: dict[str, ModelHost] = {}
        from transformers import AutoTokenizer

        from worker.prompts import encode_prompts

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        self.ids = encode_prompts(self.tokenizer, PROMPTS, system_prompt=SYSTEM, chat_template=True)

    def reference(self, adapter: str | None) -> list[list[int]]:
        """Each prompt alone through plain transformers (+ PEFT with this adapter alone)."""
        if adapter not in self._reference:
            folder = None if adapter is None else self.adapters[adapter]
            self._reference[adapter] = plain_reference(self.base, folder, self.ids, NEW_TOKENS)
        return self._reference[adapter]

    def host(self, group: str) -> ModelHost:
        if group not in self.hosts:
            self.hosts[group] = ModelHost(Settings.from_env(), device="cpu")
        return self.hosts[group]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("fidelity")
    return {arch: Family(arch, root) for arch in ARCHITECTURES}


def run_group(family: Family, group: str, options: DecodeOptions | None, *, merged: bool = False,
              batch_size: int = 2) -> tuple[dict[tuple[int, str], list[int] | None], str | None]:
    names = GROUPS[group]
    config = RunConfig.from_dict({
        "name": "fidelity", "model": {"base": str(family.base), "adapters": {n: str(family.adapters[n]) for n in names},
                                      "dtype": "float32"},
        "dataset": {"path": "unused.jsonl", "prompt": "{{ q }}", "system_prompt": SYSTEM},
        "generation": {"max_new_tokens": NEW_TOKENS},
        "inference": {"batch_size": batch_size, "use_peft_directly": not merged},
    })
    examples = [ChunkExample(i, p, None) for i, p in enumerate(PROMPTS)]
    variants = [VariantSpec("base", None)] + [VariantSpec(n, str(family.adapters[n])) for n in names]
    outcome = run_chunk(family.host(group), config, examples, variants, options=options)
    return {(r.example_idx, r.variant): r.output_ids for r in outcome.records}, outcome.engine


CASES = [pytest.param(arch, group, label, marks=[pytest.mark.slow] if label in SLOW_OPTIONS else [],
                      id=f"{arch}-{group}-{label}".replace(" ", "_"))
         for arch in ARCHITECTURES for group in GROUPS for label in [*OPTIONS, "merged"]]


@pytest.mark.parametrize(("arch", "group", "label"), CASES)
def test_every_row_equals_plain_peft_alone(families: dict[str, Family], arch: str, group: str, label: str) -> None:
    family = families[arch]
    got, _engine = run_group(family, group, OPTIONS.get(label), merged=label == "merged")
    wrong = []
    for variant in ["base", *GROUPS[group]]:
        expected = family.reference(None if variant == "base" else variant)
        for i in range(len(PROMPTS)):
            if got[(i, variant)] != expected[i]:
                tokens = len(family.ids[i])
                wrong.append(f"{variant} prompt {i} ({tokens} tokens): {got[(i, variant)]} != {expected[i]}")
    assert not wrong, "\n".join(wrong)


#: Architectures whose tiny model shares no prompt prefix here (a sliding window shorter than the rows).
NO_SHARED_PREFIX = {"mistral", "gemma2", "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decode_steps_attend_in_place_wherever_a_prefix_is_shared(families: dict[str, Family], arch: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix above proves the outputs; this, that it proves them with the in-place attention on:
    every decode step with a shared prefix takes the split attention, none the copying fallback."""
    calls = {"split": 0, "assembled": 0}
    split, assemble = attention.split_attention, attention.assemble

    def counted_split(*args: Any) -> Any:
        calls["split"] += 1
        return split(*args)

    def counted_assemble(*args: Any) -> Any:
        calls["assembled"] += 1
        return assemble(*args)

    monkeypatch.setattr(attention, "split_attention", counted_split)
    monkeypatch.setattr(attention, "assemble", counted_assemble)
    got, _engine = run_group(families[arch], "lora options", None)
    assert calls["assembled"] == 0
    assert (calls["split"] > 0) == (arch not in NO_SHARED_PREFIX), calls
    assert got[(5, "r1")] == families[arch].reference("r1")[5]


#: The exact fallback each case must say it took (a substring of the chunk's `engine` note), or None.
FALLBACKS = {
    ("llama", "lora options"): None,
    ("llama", "modules_to_save"): None,  # routed: the saved module per row range
    ("gpt2", "lora options"): None,
    ("mistral", "lora options"): "no shared prompt prefix: the sliding-window attention (16 tokens)",
    ("gemma2", "lora options"): "no shared prompt prefix",
    ("gemma3_text", "lora options"): "no shared prompt prefix",
    ("qwen2_moe", "lora options"): "one pass per variant: model.layers.0.mlp.shared_expert",
    ("llama", "dora"): "one pass per variant: a LoRA variant",
    ("llama", "embedding and head"): "PEFT's mixed batches: model.embed_tokens is a LoRA layer of kind Embedding",
}


@pytest.mark.parametrize(("arch", "group"), list(FALLBACKS))
def test_each_fallback_is_taken_where_needed_and_said(families: dict[str, Family], arch: str, group: str) -> None:
    _got, engine = run_group(families[arch], group, None)
    expected = FALLBACKS[(arch, group)]
    if expected is None:
        assert engine is None
    else:
        assert engine is not None and expected in engine, engine


def test_a_model_of_an_unproven_architecture_is_generated_plainly_and_says_so(tmp_path: Path) -> None:
    family = Family.__new__(Family)
    family.arch, family.base = "olmo2", make_model("olmo2", tmp_path / "olmo2")
    family.adapters = {name: make_adapter(family.base, "olmo2", ADAPTERS[name], tmp_path / name, seed=i)
                       for i, name in enumerate(["r1", "patterns"])}
    family._reference, family.hosts = {}, {}
    from transformers import AutoTokenizer

    from worker.prompts import encode_prompts

    family.tokenizer = AutoTokenizer.from_pretrained(str(family.base))
    family.ids = encode_prompts(family.tokenizer, PROMPTS, system_prompt=SYSTEM, chat_template=True)
    GROUPS["unproven"] = ["r1", "patterns"]
    try:
        got, engine = run_group(family, "unproven", None)
    finally:
        del GROUPS["unproven"]
    assert engine is not None and "plain generation, one prompt at a time: architecture 'olmo2'" in engine
    for variant in ["base", "r1", "patterns"]:
        expected = family.reference(None if variant == "base" else variant)
        assert [got[(i, variant)] for i in range(len(PROMPTS))] == expected


def test_status_shows_the_fallbacks_a_run_took(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from producer.cli import cli

    base = make_model("mistral", tmp_path / "mistral")
    moe = make_model("qwen2_moe", tmp_path / "moe")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": " ".join(["tokens"] * (i * 7 + 1))}) + "\n" for i in range(4)))
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    runner = CliRunner()
    for model, adapter in ((base, "r1"), (moe, "r64_rslora")):
        folder = make_adapter(model, "mistral" if model == base else "qwen2_moe", ADAPTERS[adapter],
                              tmp_path / f"{model.name}-{adapter}", seed=4)
        config = tmp_path / f"{model.name}.yaml"
        config.write_text(f"name: fallbacks\nmodel:\n  base: {model}\n  adapters:\n    a: {folder}\n  dtype: float32\n"
                          f"dataset:\n  path: {data}\n  prompt: '{{{{ q }}}}'\n  system_prompt: Be brief.\n"
                          "generation:\n  max_new_tokens: 4\ninference:\n  chunk_size: 2\n")
        assert runner.invoke(cli, ["--database-url", db, "run", str(config)]).exit_code == 0
    shown = runner.invoke(cli, ["--database-url", db, "status", "1"]).output
    assert "exact fallback (2 chunks): no shared prompt prefix: the sliding-window attention (16 tokens)" in shown
    as_json = json.loads(runner.invoke(cli, ["--database-url", db, "status", "2", "--format", "json"]).output)
    (note, chunks), = as_json["engine_notes"].items()
    assert note.startswith("one pass per variant: model.layers.0.mlp.shared_expert") and chunks == 2
