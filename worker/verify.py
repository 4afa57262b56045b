"""`lora-compare verify`: regenerate a sample of a run's rows with plain transformers + PEFT and count
how many the run reproduced, per variant.

The engine promises greedy float32 outputs equal, token for token, to plain PEFT generating each
prompt alone (see `worker.engine.fidelity`). In bfloat16 or float16 that cannot be exact: batching, padding and
other kernels round differently, and where two tokens are nearly tied the greedy choice can flip.
So fidelity is measured here, not assumed. The reference is independent of the engine: the base model
is loaded with plain transformers, each adapter with PEFT's own loader (not the model host's, not
`lora_routing`), and each prompt goes alone through `model.generate` (`engine.plain.generate_one`) on the
device and in the dtype the run's chunks recorded.

For a disagreement the figure is the logit gap at the first differing token: the reference's
logits[its token] - logits[the run's token] at that step. The tokens before it agree, so the step
saw the run's input; the reference chose greedily, so the gap is >= 0. A gap of a few hundredths in
bfloat16 is a near-tie that rounding flipped; a gap of whole units is a bug. Rows stored without
their token ids (older runs) are compared by their finished text, without a gap.

Sampled runs (`generation.do_sample: true`) are refused: their outputs cannot be reproduced.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session

from contract.artifacts import adapter_changed, inspect_adapter
from contract.config import RunConfig
from contract.errors import VerifyError
from contract.settings import Settings
from db.runs import get_run, run_variants
from db.verifications import (
    ChunkSetting,
    StoredRow,
    add_verification,
    done_chunk_settings,
    example_prompts,
    stored_rows,
    verifiable_examples,
)

from .engine.generation import finish
from .engine.plain import PlainRow, generate_one, variant
from .engine.request import DecodeRequest
from .model_host import ModelHost, pick_device, pick_dtype
from .prompts import encode_prompts
from .reference import load_reference

log = logging.getLogger(__name__)

#: Examples regenerated per variant when `--sample` is not given.
DEFAULT_SAMPLE = 20


@dataclass(frozen=True)
class Target:
    """One variant of the run: `base` (no folder) or an adapter's name, folder and recorded hash."""

    name: str
    adapter_path: str | None
    adapter_hash: str | None


@dataclass(frozen=True)
class SampledExample:
    idx: int
    prompt: str  # rendered by the producer, before the chat template
    rows: dict[str, StoredRow]  # variant -> the run's row


@dataclass(frozen=True)
class VerifyPlan:
    """What to regenerate, where and how: everything `run_verification` needs, read from SQL once."""

    run_id: int
    config: RunConfig
    base_folder: Path
    base_hashes: frozenset[str]  # of the base model, as the sampled rows recorded it
    targets: tuple[Target, ...]
    examples: tuple[SampledExample, ...]
    device: str  # cpu, cuda:0, ...
    dtype: str  # float32, bfloat16, float16


@dataclass(frozen=True)
class Disagreement:
    """One sampled row that plain PEFT did not reproduce, at its first differing token."""

    variant: str
    example_idx: int
    position: int | None  # index of the first differing generated token; None: compared by text
    plain_token: int | None  # None: the reference ended before this position (or no ids are stored)
    run_token: int | None  # None: the run ended before this position (or no ids are stored)
    plain_text: str | None  # the token's text, or the whole output when compared by text
    run_text: str | None
    gap: float | None  # logits[plain_token] - logits[run_token] at `position`; None when either is missing

    def to_json(self) -> dict[str, Any]:
        return {"example_idx": self.example_idx, "position": self.position, "plain_token": self.plain_token,
                "run_token": self.run_token, "plain_text": self.plain_text, "run_text": self.run_text,
                "gap": self.gap}


@dataclass(frozen=True)
class VariantResult:
    variant: str
    sampled: int
    disagreements: tuple[Disagreement, ...]

    @property
    def agreed(self) -> int:
        return self.sampled - len(self.disagreements)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.sampled if self.sampled else None

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "sampled": self.sampled, "agreed": self.agreed, "agreement": self.agreement,
                "disagreements": [d.to_json() for d in self.disagreements]}


@dataclass(frozen=True)
class VerifyResult:
    run_id: int
    device: str
    dtype: str
    examples: tuple[int, ...]  # the sampled example_idx, the same for every variant
    variants: tuple[VariantResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "device": self.device, "dtype": self.dtype, "examples": list(self.examples),
                "variants": [v.to_json() for v in self.variants]}


# --- planning: what to regenerate, where ---------------------------------------------------------


def pick_sample(candidates: Sequence[int], size: int, *, seed: int) -> list[int]:
    """Up to `size` of `candidates`, drawn with `seed` (the same draw every time), in order."""
    return sorted(random.Random(seed).sample(list(candidates), min(size, len(candidates))))


@dataclass(frozen=True)
class Recorded:
    """Where most of the run's examples were generated, and the chunks generated there."""

    device: str | None  # as a chunk recorded it (cuda:1, ...); None: not recorded
    dtype: str | None
    chunk_ids: list[int]


def _kind(chunk: ChunkSetting) -> tuple[str | None, str | None]:
    """(device type, dtype): what changes the kernels, so what the reference must match."""
    return None if chunk.device is None else torch.device(chunk.device).type, chunk.dtype


def recorded_setting(chunks: Sequence[ChunkSetting]) -> Recorded:
    examples: Counter[tuple[str | None, str | None]] = Counter()
    for c in chunks:
        examples[_kind(c)] += c.examples
    kind, _ = examples.most_common(1)[0]
    chosen = [c for c in chunks if _kind(c) == kind]
    if len(examples) > 1:
        log.warning("the run's chunks ran on several devices or dtypes; verifying only the %d chunk(s) on %s, %s",
                    len(chosen), kind[0] or "an unrecorded device", kind[1] or "an unrecorded dtype")
    return Recorded(chosen[0].device, kind[1], [c.chunk_id for c in chosen])


def _usable_device(run_id: int, requested: str | None, recorded: str | None) -> torch.device:
    device = pick_device(requested or recorded)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        if requested:
            raise VerifyError(f"--device {requested}: this machine has no GPU")
        raise VerifyError(f"run {run_id} was generated on {recorded} and this machine has no GPU; pass --device cpu "
                          "to verify on the CPU (a few near-tied tokens may then differ)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        if requested:
            raise VerifyError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda")  # another worker's GPU index: the same kind of device here
    return device


def plan_verification(session: Session, settings: Settings, run_id: int, *, sample: int = DEFAULT_SAMPLE,
                      device: str | None = None, seed: int = 0) -> VerifyPlan:
    """Read the run, refuse what cannot be reproduced, pick the device, dtype and sampled examples."""
    run = get_run(session, run_id)
    if run is None:
        raise VerifyError(f"no run with id {run_id}")
    config = RunConfig.from_dict(run.config)
    if config.loglik:
        raise VerifyError(f"run {run_id} is a task: {config.task} run: it scored its rows by log-likelihood and "
                          "generated nothing, so there is no output to regenerate (its scoring is held to plain "
                          "PEFT by the test suite: tests/test_loglik_engine.py)")
    if config.generation.do_sample:
        raise VerifyError(f"run {run_id} sampled its outputs (generation.do_sample: true); sampled outputs cannot "
                          "be reproduced, so there is nothing to verify")
    chunks = done_chunk_settings(session, run_id)
    if not chunks:
        raise VerifyError(f"run {run_id} has no finished chunk to verify")
    recorded = recorded_setting(chunks)
    chosen = _usable_device(run_id, device, recorded.device)
    dtype = recorded.dtype or str(pick_dtype(config.model.dtype, chosen)).removeprefix("torch.")

    targets = tuple(Target(v.name, v.adapter_path, v.adapter_hash) for v in run_variants(session, run_id))
    for target in targets:
        found = None if target.adapter_path is None else inspect_adapter(target.name, target.adapter_path).sha256
        if found is not None and found != target.adapter_hash:
            changed = adapter_changed(target.name, target.adapter_path, target.adapter_hash, found, run=f"run {run_id}")
            raise VerifyError(f"{changed}; its outputs cannot be reproduced from these files: restore the adapter's "
                              "files as they were to verify the run")
    candidates = verifiable_examples(session, run_id, chunk_ids=recorded.chunk_ids, variants=len(targets))
    if not candidates:
        raise VerifyError(f"run {run_id} has no generated rows to verify")
    idxs = pick_sample(candidates, sample, seed=seed)
    rows: dict[int, dict[str, StoredRow]] = {i: {} for i in idxs}
    for row in stored_rows(session, run_id, idxs):
        rows[row.example_idx][row.variant] = row
    prompts = example_prompts(session, run_id, idxs)
    host = ModelHost(settings, device="cpu")  # for the demo's folder and the model-root policy; loads nothing
    return VerifyPlan(
        run_id=run_id, config=config, base_folder=host.base_folder(config.model.base),
        base_hashes=frozenset(r.base_model_hash for by_variant in rows.values() for r in by_variant.values()),
        targets=targets, examples=tuple(SampledExample(i, prompts[i], rows[i]) for i in idxs),
        device=str(chosen), dtype=dtype,
    )



# --- comparing -----------------------------------------------------------------------------------


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where `a` and `b` differ (the shorter one's length if one extends the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_row(name: str, stored: StoredRow, plain: PlainRow, *, tokenizer: Any, eos: set[int],
                stop: Sequence[str]) -> Disagreement | None:
    """None when the reference reproduced the run's row, else where and by how much they part."""
    if stored.output_ids is None:
        output = finish(tokenizer, plain.tokens, eos_ids=eos, stop=stop).text
        if output == stored.output:
            return None
        return Disagreement(name, stored.example_idx, None, None, None, output, stored.output, None)
    i = first_difference(plain.tokens, stored.output_ids)
    if i is None:
        return None
    ours = plain.tokens[i] if i < len(plain.tokens) else None
    theirs = stored.output_ids[i] if i < len(stored.output_ids) else None
    gap = None
    if ours is not None and theirs is not None:
        logits = plain.logits[i].float()  # [vocab]
        if 0 <= theirs < logits.numel():
            gap = float(logits[ours] - logits[theirs])

    def text(token: int | None) -> str | None:
        return None if token is None else str(tokenizer.decode([token], skip_special_tokens=False))

    return Disagreement(name, stored.example_idx, i, ours, theirs, text(ours), text(theirs), gap)


def run_verification(plan: VerifyPlan, *,
                     on_variant: Callable[[VariantResult], None] | None = None) -> VerifyResult:
    """Regenerate every sampled (example, variant) alone with plain PEFT and compare it with the run's row."""
    ref = load_reference(plan)
    gen = plan.config.generation
    prompts = encode_prompts(ref.tokenizer, [ex.prompt for ex in plan.examples],
                             system_prompt=plan.config.dataset.system_prompt,
                             chat_template=plan.config.dataset.chat_template)
    for ex, ids in zip(plan.examples, prompts):
        recorded = {row.prompt_tokens for row in ex.rows.values()}
        if recorded != {len(ids)}:
            log.warning("example %d: %d prompt tokens here, %s in the run (has the tokenizer changed?)",
                        ex.idx, len(ids), ", ".join(map(str, sorted(recorded))))
    request = DecodeRequest(gen, ref.eos_ids, ref.pad_id, ref.device, ref.tokenizer)
    results = []
    for target in plan.targets:
        found = []
        with variant(ref.model, ref.names[target.name]):
            for ex, ids in zip(plan.examples, prompts):
                row = generate_one(ref.model, ids, request)
                differs = compare_row(target.name, ex.rows[target.name], row, tokenizer=ref.tokenizer,
                                      eos=ref.eos_ids, stop=gen.stop)
                if differs is not None:
                    found.append(differs)
        result = VariantResult(target.name, len(plan.examples), tuple(found))
        if on_variant is not None:
            on_variant(result)
        results.append(result)
    return VerifyResult(plan.run_id, plan.device, plan.dtype, tuple(ex.idx for ex in plan.examples), tuple(results))


def record_verification(session: Session, result: VerifyResult) -> None:
    """One `verifications` row per variant."""
    for v in result.variants:
        add_verification(session, run_id=result.run_id, variant=v.variant, sampled=v.sampled, agreed=v.agreed,
                         device=result.device, dtype=result.dtype, details=[d.to_json() for d in v.disagreements])
