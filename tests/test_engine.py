"""The decode engine's shape (`worker/engine/`): small modules and functions, the transformers range
it supports checked at import, and one host-device sync per decode step."""

from __future__ import annotations

import ast
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

ENGINE = Path(__file__).resolve().parent.parent / "worker" / "engine"


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


def test_no_engine_module_is_long_and_no_function_takes_more_than_six_parameters() -> None:
    """Parameters: positional, keyword-only, `self`, and *args / **kwargs (one each)."""
    modules = sorted(ENGINE.glob("*.py"))
    assert len(modules) >= 10
    too_long, too_many = [], []
    for path in modules:
        source = path.read_text()
        if len(source.splitlines()) > 350:
            too_long.append(path.name)
        for fn in _functions(ast.parse(source)):
            a = fn.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            count += (a.vararg is not None) + (a.kwarg is not None)
            if count > 6:
                too_many.append(f"{path.name}:{fn.lineno} ({count})")
    assert not too_long and not too_many, (too_long, too_many)


@pytest.mark.parametrize("version", ["4.56.0", "4.57.1", "5.0.0", "5.24.0", "5.39.2"])
def test_a_supported_transformers_passes_the_check(version: str) -> None:
    from worker.engine.compat import check_transformers

    check_transformers(version)


@pytest.mark.parametrize("version", ["4.55.4", "4.40.0", "5.40.0", "5.40.0.dev0", "6.0.0", "not-a-version"])
def test_an_unsupported_transformers_is_refused_naming_both_versions(version: str) -> None:
    from worker.engine.compat import UnsupportedTransformersError, check_transformers

    with pytest.raises(UnsupportedTransformersError) as caught:
        check_transformers(version)
    assert version in str(caught.value) and ">=4.56,<5.40" in str(caught.value)


def test_the_installed_transformers_is_supported_and_pinned_alike() -> None:
    from worker.engine import compat

    compat.check_transformers()  # what importing worker.engine did
    pyproject = (ENGINE.parent.parent / "pyproject.toml").read_text()
    pins = re.findall(r'^\s*"(transformers[^"]*)"', pyproject, flags=re.M)
    assert pins == [f"transformers>={compat.MINIMUM},<{compat.LIMIT}"], pins


#: What forces a host-device sync when called on a device tensor (CPU runs count the calls).
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
SYNCING_FUNCTIONS = ("equal", "nonzero", "allclose", "is_nonzero")


def test_the_decode_loop_reads_the_device_back_once_per_step(monkeypatch: Any) -> None:
    """A tiny Llama with two routed LoRA adapters, rows of different lengths sharing a prefix, a small
    batch that refills and drops finished rows: every call that forces a sync is counted while
    `decode_rows` runs, by where it is made. The engine's own: one per step (the sampled tokens), none
    in admission (prefill, joining rows, compaction). transformers' SDPA mask builder checks for
    padding once per forward pass (`padding_mask.all()`), which the engine cannot avoid without
    changing which attention kernel runs; it is bounded here so that a new one is noticed."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from contract.config import GenerationConfig
    from worker.engine import contention, cpu_attention, lora_routing, scheduler
    from worker.engine.batch import Batch
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest

    vocab = 128
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    peft: Any = None
    for name, targets in [("a", ["q_proj", "v_proj"]), ("b", ["up_proj", "down_proj"])]:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
        if peft is None:
            peft = get_peft_model(LlamaForCausalLM(config).eval(), lora, adapter_name=name)
        else:
            peft.add_adapter(name, lora)
    peft.eval()
    assert lora_routing.install(peft)
    rng = random.Random(2)
    head = [rng.randrange(40, vocab) for _ in range(6)]
    prompts = [head + [rng.randrange(40, vocab) for _ in range(rng.randrange(1, 7))] for _ in range(6)]
    rows = [(p, n) for p in prompts for n in ("__base__", "a", "b")]
    eos = set(range(3, 3 + vocab // 6))  # rows end at different steps

    counts: Counter[str] = Counter()
    calls = Counter[str]()

    def counted(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            counts["engine" if f"{ENGINE.name}" in Path(caller).parts and "worker" in Path(caller).parts
                   else "library"] += 1
            counts[f"{name} in {Path(caller).name}"] += 1
            return original(*args, **kwargs)
        return wrapper

    def tally(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(scheduler, "_prefill", tally("prefill", scheduler._prefill))
    monkeypatch.setattr(contention, "step", tally("loop", contention.step))  # once per pass of the loop
    monkeypatch.setattr(Batch, "step", tally("step", Batch.step))
    request = DecodeRequest(GenerationConfig(max_new_tokens=10), eos, 0, torch.device("cpu"))
    cpu_attention.available()  # the kernel's one-time load and probe, outside the count
    with monkeypatch.context() as syncs:
        for name in SYNCING_METHODS:
            syncs.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        for name in SYNCING_FUNCTIONS:
            syncs.setattr(torch, name, counted(name, getattr(torch, name)))
        got = scheduler.decode_rows(peft, [p for p, _ in rows], request, options=DecodeOptions(capacity=5),
                                    adapter_names=[n for _, n in rows])

    assert len({len(t) for t in got}) > 2 and calls["prefill"] >= 3  # rows ended apart; the batch refilled
    forwards = calls["step"] + calls["prefill"] + 1  # + the shared prefix's pass
    assert counts["engine"] == calls["loop"], counts  # one per step: the sampled tokens, read back once
    assert counts["tolist in scheduler.py"] == calls["loop"], counts
    assert counts["library"] <= forwards, (counts, calls)


def test_the_decode_steps_are_recorded_only_when_observed(monkeypatch: Any) -> None:
    """`worker.engine.steps`: off, nothing is recorded; on, one record per decode step (every
    `Batch.step`, timed sync to sync) with the rows it ran and the columns attention covered, and the
    same outputs as without it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from contract.config import GenerationConfig
    from worker.engine import scheduler, steps
    from worker.engine.batch import Batch
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=128, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 128) for _ in range(rng.randrange(3, 9))] for _ in range(5)]
    request = DecodeRequest(GenerationConfig(max_new_tokens=6), set(range(4, 20)), 0, torch.device("cpu"))
    stepped = Counter[str]()
    original = Batch.step

    def counted(self: Batch, *args: Any) -> None:
        stepped["step"] += 1
        original(self, *args)

    monkeypatch.setattr(Batch, "step", counted)
    plain = scheduler.decode_rows(model, prompts, request, options=DecodeOptions(capacity=3))
    assert steps.observer is None and stepped["step"] > 0
    seen: list[steps.DecodeStep] = []
    stepped.clear()
    with steps.observe(seen.append):
        with pytest.raises(RuntimeError, match="already observed"):
            with steps.observe(seen.append):
                pass
        observed = scheduler.decode_rows(model, prompts, request, options=DecodeOptions(capacity=3))
    assert steps.observer is None
    assert observed == plain
    assert len(seen) == stepped["step"], (seen, stepped)
    assert all(1 <= s.rows <= 3 and s.context >= 3 and s.seconds >= 0 for s in seen)
    assert any(s.prefill for s in seen)  # the batch refilled between two steps
