"""The scoring engine gives the harness's log-probabilities, with every optimisation on and each off alone.

On tiny random models of the common architectures (`tiny_models`), with random PEFT adapters, rows
of base and two adapters mixed (uneven context and continuation lengths, one-token and many-token
continuations, an empty context as the prefix token, continuations cut on the left by the model's
length) go through `score_rows` and are compared, continuation by continuation, with `score_plain`:
each (context, continuation) alone through plain transformers + PEFT, a full log-softmax, the
harness's way. Float32 on CPU; to 1e-5.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.errors import ChunkInterrupted
from tests.tiny_models import ADAPTERS, ARCHITECTURES, VOCAB, make_adapter, make_model
from worker.engine import lora_routing
from worker.engine.loglik import ScoreOptions, score_plain, score_rows
from worker.generated import ScoreResult, ScoreRow

TOLERANCE = 1e-5
FAST = ScoreOptions()
OPTIONS = {
    "fast path": FAST,
    "shared context off": replace(FAST, share_context=False),
    "shared prefix off": replace(FAST, share_prefix=False),
    "routed LoRA off": replace(FAST, route_lora=False),
    "mixed batches off": replace(FAST, mixed_batches=False),
    "needed positions off": replace(FAST, needed_positions_only=False),
}
PREFIX = 1  # the tiny tokenizer's BOS (<|im_start|>): the context of an empty context
#: The model's length for the cut rows: short enough that long rows lose tokens on the left.
MAX_LENGTH = 24


def tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, VOCAB) for _ in range(n))


def greedy_tokens(model: Any, context: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The base model's `n` greedy tokens after `context` (a continuation every token of which is the argmax)."""
    ids = list(context)
    with torch.inference_mode(), (model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()):
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return tuple(ids[len(context):])


def make_rows(model: Any, adapters: list[str | None], seed: int = 3) -> list[ScoreRow]:
    """Per example, one row per variant (same context and continuations): contexts of 1 to 40 tokens,
    2 to 5 random continuations of 1 to 12 tokens, then the base model's greedy 3 tokens; example 0
    has an empty context (the prefix token)."""
    rng = random.Random(seed)
    rows = []
    for example in range(7):
        context = (PREFIX,) if example == 0 else tokens(rng, rng.choice([2, 5, 9, 17, 40]))
        conts = tuple(tokens(rng, rng.choice([1, 1, 2, 4, 12])) for _ in range(rng.randrange(2, 6)))
        conts += (greedy_tokens(model, context, 3),)
        rows += [ScoreRow(context, conts, adapter) for adapter in adapters]
    return rows


def load(base: Path, adapters: dict[str, Path]) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if not adapters:
        return model
    items = list(adapters.items())
    model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, folder in items[1:]:
        model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    lora_routing.install(model)
    return model


def differences(got: list[ScoreResult], expected: list[ScoreResult], rows: list[ScoreRow]) -> list[str]:
    wrong = []
    for i, (g, e, row) in enumerate(zip(got, expected, rows, strict=True)):
        for j, (a, b) in enumerate(zip(g.logprobs, e.logprobs, strict=True)):
            if abs(a - b) > TOLERANCE or g.greedy[j] != e.greedy[j]:
                wrong.append(f"row {i} ({row.adapter}, context {len(row.context_ids)}) continuation {j} "
                             f"({len(row.continuations[j])} tokens): {a:.7f} {g.greedy[j]} != {b:.7f} {e.greedy[j]}")
    return wrong


class Family:
    """One architecture's model with two adapters, its rows and their plain reference (lazily)."""

    def __init__(self, arch: str, root: Path, adapters: tuple[str, ...] = ("r1", "dropout_lora_bias")) -> None:
        base = make_model(arch, root / arch)
        folders = {name: make_adapter(base, arch, ADAPTERS[name], root / f"{arch}-{name}", seed=10 + i)
                   for i, name in enumerate(adapters)}
        self.model = load(base, folders)
        self.rows = make_rows(self.model, [None, *adapters])
        self._reference: dict[int | None, list[ScoreResult]] = {}

    def reference(self, max_length: int | None) -> list[ScoreResult]:
        if max_length not in self._reference:
            self._reference[max_length] = score_plain(self.model, self.rows, max_length=max_length)
        return self._reference[max_length]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loglik")


_FAMILIES: dict[tuple[str, tuple[str, ...]], Family] = {}


def family(root: Path, arch: str, adapters: tuple[str, ...] = ("r1", "dropout_lora_bias")) -> Family:
    if (arch, adapters) not in _FAMILIES:
        _FAMILIES[(arch, adapters)] = Family(arch, root, adapters)
    return _FAMILIES[(arch, adapters)]


@pytest.mark.parametrize("label", list(OPTIONS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_equal_plain_scoring_alone(root: Path, arch: str, label: str) -> None:
    fam = family(root, arch)
    got, _notes = score_rows(fam.model, fam.rows, options=OPTIONS[label], capacity=5)
    assert not differences(got, fam.reference(None), fam.rows)


@pytest.mark.parametrize("label", list(OPTIONS))
@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_continuations_cut_on_the_left_as_the_harness_cuts_them(root: Path, arch: str, label: str) -> None:
    fam = family(root, arch)
    got, _notes = score_rows(fam.model, fam.rows, options=OPTIONS[label], capacity=4, max_length=MAX_LENGTH)
    cut = fam.reference(MAX_LENGTH)
    assert not differences(got, cut, fam.rows)
    assert cut != fam.reference(None)  # the cut really changed some scores


#: Adapters whose layers the engine mixes another way, and the note that says so (None: routed, no note).
MIXING: dict[tuple[str, ...], str | None] = {
    ("saves_norm", "r1"): None,
    ("embedding", "lm_head"): "PEFT's mixed batches",
    ("dora", "r1"): "one pass per variant: a LoRA variant",
}


@pytest.mark.parametrize("adapters", list(MIXING), ids="+".join)
def test_other_adapter_kinds_are_mixed_exactly_and_say_how(root: Path, adapters: tuple[str, ...]) -> None:
    fam = family(root, "llama", adapters)
    got, notes = score_rows(fam.model, fam.rows, capacity=6)
    assert not differences(got, fam.reference(None), fam.rows)
    expected = MIXING[adapters]
    assert (expected is None and not notes) or (expected is not None and any(expected in n for n in notes)), notes


def test_an_unproven_architecture_is_scored_plainly_with_a_note(root: Path) -> None:
    fam = family(root, "olmo2", ("r1",))
    got, notes = score_rows(fam.model, fam.rows, capacity=4)
    assert got == fam.reference(None)
    assert any("plain scoring" in n and "olmo2" in n for n in notes)


def test_the_scores_are_not_vacuous(root: Path) -> None:
    """Adapters change the scores, continuations differ, some are greedy and some are not."""
    fam = family(root, "llama")
    results = fam.reference(None)
    by_variant = [results[i::3] for i in range(3)]  # rows alternate base, r1, dropout_lora_bias
    assert by_variant[0] != by_variant[1] and by_variant[0] != by_variant[2]
    flat = [lp for r in results for lp in r.logprobs]
    assert len(set(flat)) == len(flat) and all(lp < 0 for lp in flat)
    greedy = [g for r in results for g in r.greedy]
    assert any(greedy) and not all(greedy)


def test_a_model_without_adapters_scores_base_rows(root: Path) -> None:
    base = make_model("qwen2", root / "plain-qwen2")
    model = load(base, {})
    rows = make_rows(model, [None])
    got, notes = score_rows(model, rows, capacity=3)
    assert not differences(got, score_plain(model, rows), rows) and notes == []
    with pytest.raises(ValueError, match="no adapters loaded"):
        score_rows(model, [ScoreRow((1,), ((2,),), "a")], capacity=1)


def test_rows_the_harness_cannot_score_are_refused_naming_them(root: Path) -> None:
    model = family(root, "llama").model
    for row, message in [(ScoreRow((), ((2,),), None), "score row 1: the context has no tokens"),
                         (ScoreRow((1,), ((2,), ()), None), "score row 1: continuation 1 has no tokens"),
                         (ScoreRow((1,), ((2,) * 30,), None), "continuation 0 has 30 tokens, more than")]:
        with pytest.raises(ValueError, match=message):
            score_rows(model, [ScoreRow((1,), ((2,),), None), row], capacity=2, max_length=MAX_LENGTH)


def test_a_stop_request_interrupts_between_forward_passes(root: Path) -> None:
    fam = family(root, "llama")
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(ChunkInterrupted):
        score_rows(fam.model, fam.rows, capacity=4, stop=stop)
    assert len(asked) == 3  # once per forward pass, until it said stop


@pytest.mark.parametrize("label", ["fast path", "shared context off", "needed positions off"])
def test_passes_over_the_logits_budget_are_split_down_to_one_sequence(root: Path, label: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine import loglik

    fam = family(root, "llama")
    monkeypatch.setattr(loglik, "LOGITS_PER_PASS", 1)  # any two sequences are over it
    passes = []

    def count() -> bool:  # asked once per forward pass
        passes.append(1)
        return False

    got, _notes = score_rows(fam.model, fam.rows, options=OPTIONS[label], capacity=8, stop=count)
    assert not differences(got, fam.reference(None), fam.rows)
    conts = [c for row in fam.rows for c in row.continuations]
    if label == "shared context off":
        assert len(passes) == len(conts)  # each (context, continuation) alone
    else:  # each context alone, then each continuation of more than one token alone
        assert len(passes) == len(fam.rows) + sum(len(c) > 1 for c in conts)


def stem_rows(adapters: list[str | None], seed: int = 5) -> list[ScoreRow]:
    """Per example, three continuations that share all but their last token (as " 95" and " 96" share
    " 9"), beside one of the same length that does not, a one-token one and the shared stem alone."""
    rng = random.Random(seed)
    rows = []
    for _example in range(4):
        context = tokens(rng, rng.choice([3, 9, 17]))
        stem = tokens(rng, rng.choice([1, 2, 4]))
        conts = tuple(stem + tokens(rng, 1) for _ in range(3)) + (tokens(rng, len(stem) + 1), tokens(rng, 1), stem)
        rows += [ScoreRow(context, conts, adapter) for adapter in adapters]
    return rows


@pytest.mark.parametrize("label", ["fast path", "routed LoRA off", "needed positions off"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_continuations_that_differ_only_in_their_last_token_run_as_one_sequence(
        root: Path, arch: str, label: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine import loglik

    fam = family(root, arch)
    rows = stem_rows([None, "r1", "dropout_lora_bias"])
    expected = score_plain(fam.model, rows)
    got, _notes = score_rows(fam.model, rows, options=OPTIONS[label], capacity=5)
    assert not differences(got, expected, rows)
    monkeypatch.setattr(loglik, "LOGITS_PER_PASS", 1)  # one sequence per pass: the passes count the sequences
    passes: list[int] = []

    def count() -> bool:  # asked once per forward pass
        passes.append(1)
        return False

    got, _notes = score_rows(fam.model, rows, options=OPTIONS[label], capacity=8, stop=count)
    assert not differences(got, expected, rows)
    groups = sum(len({c[:-1] for c in row.continuations if len(c) > 1}) for row in rows)
    alone = sum(len(c) > 1 for row in rows for c in row.continuations)
    assert len(passes) == len(rows) + groups < len(rows) + alone  # each context, then each group once


def prefix_rows(adapters: list[str | None], seed: int = 7) -> list[ScoreRow]:
    """Contexts that all start with the same 6 tokens (a question's fixed words), then 1, 4 or 9 of
    their own; three continuations of 1 to 3 tokens each."""
    rng = random.Random(seed)
    stem = tokens(rng, 6)
    rows = []
    for own in (1, 4, 9, 4, 9):
        context, conts = stem + tokens(rng, own), tuple(tokens(rng, rng.choice([1, 2, 3])) for _ in range(3))
        rows += [ScoreRow(context, conts, adapter) for adapter in adapters]
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_the_prefix_every_context_shares_runs_once_per_adapter(root: Path, arch: str) -> None:
    fam = family(root, arch)
    rows = prefix_rows([None, "r1", "dropout_lora_bias"])
    seen: list[tuple[int, ...]] = []  # the shape of every forward pass's input ids
    hook = fam.model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        got, notes = score_rows(fam.model, rows, capacity=64)
    finally:
        hook.remove()
    assert not differences(got, score_plain(fam.model, rows), rows)
    if arch == "gemma2":  # a window of 16 tokens, rows of up to 18: padding after a shared prefix would count in it
        assert seen[0] == (15, 15) and any("no shared context prefix" in n for n in notes)
    else:  # the 6 shared tokens once per adapter, then each context's own tokens
        assert seen[:2] == [(3, 6), (15, 9)] and notes == []


@pytest.mark.parametrize("label", ["fast path", "routed LoRA off", "needed positions off", "shared prefix off"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_leading_tokens_every_continuation_shares_run_with_the_context(root: Path, arch: str, label: str) -> None:
    """Continuations that all begin with the same 2 tokens (as every number after " "), and a row of one
    6-token continuation (a perplexity window): those tokens run in the context's pass, once."""
    fam = family(root, arch)
    rng = random.Random(11)
    rows = []
    for _example in range(3):
        context, lead = tokens(rng, 9), tokens(rng, 2)
        conts = tuple(lead + tokens(rng, rng.choice([1, 2, 3])) for _ in range(4))
        rows += [ScoreRow(context, conts, adapter) for adapter in (None, "r1", "dropout_lora_bias")]
    rows.append(ScoreRow(tokens(rng, 9), (tokens(rng, 6),), "r1"))
    seen: list[int] = []  # the width of every forward pass's input ids
    hook = fam.model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        got, _notes = score_rows(fam.model, rows, options=OPTIONS[label], capacity=1)
    finally:
        hook.remove()
    assert not differences(got, score_plain(fam.model, rows), rows)
    assert {w for w in seen if w > 3} == {9 + 2, 9 + 5}  # each context with the shared tokens; the rest is short
