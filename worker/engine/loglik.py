"""Log-likelihood scoring of base and adapter rows on one resident copy of the weights.

Each `ScoreRow` is a context and continuations; each continuation's score is lm-evaluation-harness's
(`HFLM._loglikelihood_tokens`): the model is given (context + continuation)[-(max_length + 1):][:-1],
and the continuation's log-probability is the sum, over its tokens, of the log-softmax of the logits
at the position before each; it is greedy when every token is the argmax there.

`score_rows` gets the same numbers with fewer operations (each switched off alone in `ScoreOptions`,
and tested to give the same log-probabilities to 1e-5 in float32):
- share_context: a row's context runs once, and all its continuations run on its KV entries
  (`loglik_pass.prefill` / `continuation_pass`): the leading tokens all of them share run with the
  context (`fold`), and those that differ only in their last token as one sequence; off: each
  (context, continuation) runs whole;
- share_prefix: the leading tokens that every context of a pass shares ("Question: What is") run
  once per adapter, the contexts' own tokens on top of them (`loglik_pass.shared_prefix`);
- route_lora: base and adapter rows of one pass through `lora_routing` (else PEFT's `adapter_names`);
- mixed_batches: the rows of every variant in the same passes (else one series of passes per variant,
  the adapter set the plain PEFT way);
- needed_positions_only: the LM head and the log-softmax only where a token is scored.

A continuation that does not fit after its whole context is scored after the context's tail, as the
harness cuts it (its own piece). The exact fallbacks, each named in the notes: plain scoring, one
(context, continuation) at a time (`score_plain`), for an architecture the engine is not proven on;
one pass per variant where no batch can mix the adapters (`lora_routing.mixing`); no shared prefix
where a sliding window is shorter than the longest sequence (the padding between a shared prefix and
a context's own tokens would count in a window built from columns). Otherwise a sequence's real
tokens sit in consecutive columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812

from contract.errors import ChunkInterrupted

from ..generated import ScoreResult, ScoreRow
from . import lora_routing, plain
from .cpu_head import flat_rows
from .fidelity import PROVEN_ARCHITECTURES, base_config, sliding_window
from .loglik_pass import Forward, Piece, Scores, continuation_pass, fold, prefill, tail_groups, whole_pass

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class ScoreOptions:
    """Which of the scoring engine's optimisations are on (all by default); each off alone gives the
    same log-probabilities."""

    share_context: bool = True
    share_prefix: bool = True
    route_lora: bool = True
    mixed_batches: bool = True
    needed_positions_only: bool = True


@dataclass(frozen=True)
class ScorePlan:
    """How one `score_rows` call runs: `plain` (every continuation alone, `score_plain`), else how
    rows of different variants share passes (`mixing`; None: the model has no adapters), with the
    exact fallbacks taken and why."""

    options: ScoreOptions
    mixing: lora_routing.Mixing | None
    plain: bool = False
    notes: tuple[str, ...] = ()


def is_peft(model: Any) -> bool:
    """Whether `model` is a PeftModel (adapters loaded), without importing peft."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def plan_score(model: Any, options: ScoreOptions, longest: int = 0) -> ScorePlan:
    """How `score_rows` runs on `model` with `options`, its longest sequence (context + continuation)
    `longest` tokens: as `fidelity.plan_decode` decides for generation."""
    model_type = str(getattr(base_config(model), "model_type", "unknown"))
    mixing: lora_routing.Mixing | None = None
    if is_peft(model):
        verdict = lora_routing.mixing(model)
        mixing = verdict.mode
        if mixing == "routed" and not options.route_lora:
            mixing = "peft" if verdict.peft_can_mix else "per_variant"
        if not options.mixed_batches:
            mixing = "per_variant"
    if model_type not in PROVEN_ARCHITECTURES:
        return ScorePlan(options, mixing, plain=True, notes=(
            f"plain scoring, one continuation at a time: architecture '{model_type}' is not one the fast path "
            "is proven on",))
    notes: tuple[str, ...] = ()
    window = sliding_window(model)
    if options.share_context and options.share_prefix and window is not None and longest > window:
        options = replace(options, share_prefix=False)
        notes += (f"no shared context prefix: the sliding-window attention ({window} tokens) is shorter than "
                  "the rows",)
    if mixing is not None and mixing != "routed" and options.route_lora and options.mixed_batches:
        verdict = lora_routing.mixing(model)
        if verdict.reason:
            how = "one pass per variant" if mixing == "per_variant" else "PEFT's mixed batches"
            notes += (f"{how}: {verdict.reason}",)
    return ScorePlan(options, mixing, notes=notes)


def check_rows(rows: Sequence[ScoreRow], max_length: int | None) -> None:
    """Refuse what the harness cannot score: an empty context or continuation, a continuation longer
    than the model's length (one line naming the row)."""
    for i, row in enumerate(rows):
        if not row.context_ids:
            raise ValueError(f"score row {i}: the context has no tokens (an empty context is the prefix token)")
        for j, cont in enumerate(row.continuations):
            if not cont:
                raise ValueError(f"score row {i}: continuation {j} has no tokens")
            if max_length is not None and len(cont) > max_length:
                raise ValueError(f"score row {i}: continuation {j} has {len(cont)} tokens, more than the model's "
                                 f"length ({max_length})")


def pieces_of(rows: Sequence[ScoreRow], names: Sequence[str | None], max_length: int | None) -> list[Piece]:
    """Each row's continuations grouped by the context they are scored after: the row's whole context,
    or (continuation too long for it) its last max_length + 1 - len(continuation) tokens, as the
    harness's left cut gives. Continuation j of row i scores into `owners` index sum of earlier rows'
    continuation counts + j."""
    pieces: list[Piece] = []
    first = 0
    for row, name in zip(rows, names):
        groups: dict[int, list[int]] = {}
        for j, cont in enumerate(row.continuations):
            over = 0 if max_length is None else max(0, len(row.context_ids) + len(cont) - (max_length + 1))
            groups.setdefault(over, []).append(j)
        for over, conts in groups.items():
            pieces.append(Piece(row.context_ids[over:], tuple(row.continuations[j] for j in conts),
                                tuple(first + j for j in conts), name))
        first += len(row.continuations)
    return pieces


def _results(rows: Sequence[ScoreRow], scores: Scores) -> list[ScoreResult]:
    logprob, greedy = scores.logprob.tolist(), (scores.missed == 0).tolist()
    results, first = [], 0
    for row in rows:
        n = len(row.continuations)
        results.append(ScoreResult(tuple(logprob[first:first + n]), tuple(greedy[first:first + n])))
        first += n
    return results


def _forward(model: Any, mixing: lora_routing.Mixing | None, stop: Callable[[], bool] | None) -> Forward:
    """One forward pass, row i through adapter `names[i]` (routed, or PEFT's `adapter_names`); the stop
    flag is read before each."""
    def forward(names: list[str] | None, inputs: dict[str, Any]) -> Any:
        if stop is not None and stop():
            raise ChunkInterrupted("the worker is shutting down: scoring stopped")
        if names is None:
            return model(**inputs)
        if mixing == "routed":
            with lora_routing.route(names):
                return model(**inputs)
        return model(**inputs, adapter_names=names)
    return forward


#: The most logits one pass computes ([sequences, positions, vocabulary] elements: 512 MiB in float32),
#: unless a single sequence needs more (it then runs alone, as the harness runs it).
LOGITS_PER_PASS = 2**27


def _batches(items: Sequence[_T], *, length: Callable[[_T], int], positions: Callable[[_T], int], capacity: int,
             vocab: int, name: Callable[[_T], str | None]) -> Iterator[list[_T]]:
    """`items`, longest first by `length`, cut into passes of at most `capacity` sequences whose
    logits (sequences x the most `positions` of one x `vocab`) stay within `LOGITS_PER_PASS`; each
    pass's items grouped by adapter (stable)."""
    batch: list[_T] = []
    widest = 0
    for item in sorted(items, key=lambda i: -length(i)):
        wider = max(widest, positions(item))
        if batch and (len(batch) == capacity or (len(batch) + 1) * wider * vocab > LOGITS_PER_PASS):
            yield sorted(batch, key=lambda i: name(i) or "")
            batch, wider = [], positions(item)
        batch.append(item)
        widest = wider
    if batch:
        yield sorted(batch, key=lambda i: name(i) or "")


def _vocab(model: Any) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(base_config(model).vocab_size)


def _passes(model: Any, forward: Forward, pieces: list[Piece], scores: Scores, options: ScoreOptions,
            capacity: int) -> None:
    """Every piece through the model, at most `capacity` sequences per pass, longest first (a pass
    pads little), each pass's rows grouped by adapter (one contiguous range each)."""
    needed, vocab = options.needed_positions_only, _vocab(model)
    if not options.share_context:
        items = [(piece, c) for piece in pieces for c in range(len(piece.continuations))]

        def whole(item: tuple[Piece, int]) -> int:
            return len(item[0].context) + len(item[0].continuations[item[1]]) - 1

        def scored(item: tuple[Piece, int]) -> int:  # the positions the head runs on
            return len(item[0].continuations[item[1]]) if needed else whole(item)

        for sequences in _batches(items, length=whole, positions=scored, capacity=capacity, vocab=vocab,
                                  name=lambda item: item[0].name):
            whole_pass(model, forward, sequences, scores, needed_only=needed)
        return
    folded = [fold(piece) for piece in pieces]
    for batch in _batches(folded, length=lambda p: len(p.context),
                          positions=lambda p: 1 + p.folded if needed else len(p.context),
                          capacity=capacity, vocab=vocab, name=lambda p: p.name):
        done = prefill(model, forward, batch, scores, needed_only=needed, share_prefix=options.share_prefix)
        tails = tail_groups(batch)

        def tail(item: tuple[int, tuple[int, ...]], of: list[Piece] = batch) -> int:
            return len(of[item[0]].continuations[item[1][0]]) - 1

        def name(item: tuple[int, tuple[int, ...]], of: list[Piece] = batch) -> str | None:
            return of[item[0]].name

        for group in _batches(tails, length=tail, positions=tail, capacity=capacity, vocab=vocab, name=name):
            continuation_pass(model, forward, done, group, scores, needed_only=needed)


@torch.inference_mode()
def score_rows(model: Any, rows: Sequence[ScoreRow], *, options: ScoreOptions | None = None, capacity: int,
               stop: Callable[[], bool] | None = None,
               max_length: int | None = None) -> tuple[list[ScoreResult], list[str]]:
    """Each row's continuation scores, in order, and the exact fallbacks taken (in words). `capacity`:
    the most sequences in one forward pass; `max_length`: the harness's (None: nothing is cut);
    `stop()`: asked before every forward pass (true: `ChunkInterrupted`). On a PeftModel, row
    adapter None is the base model; on a plain model every row's adapter must be None."""
    options = options or ScoreOptions()
    check_rows(rows, max_length)
    if not rows:
        return [], []
    plan = plan_score(model, options, max(len(r.context_ids) + len(c) for r in rows for c in r.continuations))
    for note in plan.notes:
        log.warning("exact fallback: %s", note)
    if plan.plain:
        return score_plain(model, rows, max_length=max_length, stop=stop), list(plan.notes)
    names = _names(model, rows)
    pieces = pieces_of(rows, names, max_length)
    scores = Scores(sum(len(r.continuations) for r in rows), next(model.parameters()).device)
    capacity, options = max(1, capacity), plan.options
    with flat_rows(model):
        if names[0] is None:
            _passes(model, _forward(model, None, stop), pieces, scores, options, capacity)
        elif plan.mixing == "per_variant":
            for name in sorted({p.name for p in pieces if p.name is not None}):
                with plain.variant(model, name):
                    alone = [Piece(p.context, p.continuations, p.owners, None) for p in pieces if p.name == name]
                    _passes(model, _forward(model, None, stop), alone, scores, options, capacity)
        else:
            _passes(model, _forward(model, plan.mixing, stop), pieces, scores, options, capacity)
    return _results(rows, scores), list(plan.notes)


def _names(model: Any, rows: Sequence[ScoreRow]) -> list[str | None]:
    """Each row's adapter as the forward pass names it: PEFT's `__base__` for the base on a PeftModel;
    None for every row of a model without adapters."""
    if is_peft(model):
        return [row.adapter or lora_routing.BASE for row in rows]
    adapters = sorted({row.adapter for row in rows if row.adapter is not None})
    if adapters:
        raise ValueError(f"score rows name adapter {adapters[0]!r}, but the model has no adapters loaded")
    return [None] * len(rows)


@torch.inference_mode()
def score_plain(model: Any, rows: Sequence[ScoreRow], *, max_length: int | None = None,
                stop: Callable[[], bool] | None = None) -> list[ScoreResult]:
    """The reference: each (context, continuation) alone through plain transformers + PEFT (the
    adapter set with `set_adapter`, disabled for the base), the harness's way: the model given
    (context + continuation)[-(max_length + 1):][:-1], the log-softmax of every position's logits,
    the continuation's tokens picked from its last positions."""
    check_rows(rows, max_length)
    device = next(model.parameters()).device
    names = _names(model, rows)
    results: list[ScoreResult | None] = [None] * len(rows)
    by_variant: dict[str | None, list[int]] = {}
    for i, name in enumerate(names):
        by_variant.setdefault(name, []).append(i)
    for name, indices in by_variant.items():
        with plain.variant(model, name):
            for i in indices:
                logprobs, greedy = [], []
                for cont in rows[i].continuations:
                    if stop is not None and stop():
                        raise ChunkInterrupted("the worker is shutting down: scoring stopped")
                    whole = list(rows[i].context_ids) + list(cont)
                    ids = whole[-(max_length + 1):][:-1] if max_length is not None else whole[:-1]
                    inputs = torch.tensor([ids], dtype=torch.long, device=device)  # [1, tokens]
                    log_probs = F.log_softmax(model(input_ids=inputs).logits[0], dim=-1)  # [tokens, vocab]
                    picked = log_probs[-len(cont):]  # [continuation, vocab]
                    targets = torch.tensor(cont, dtype=torch.long, device=device)  # [continuation]
                    chosen = picked.gather(1, targets[:, None])[:, 0]
                    logprobs.append(float(chosen.to(torch.float64).sum()))
                    greedy.append(bool((picked.argmax(dim=-1) == targets).all()))
                results[i] = ScoreResult(tuple(logprobs), tuple(greedy))
    return [r for r in results if r is not None]
