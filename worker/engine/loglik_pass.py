"""The forward passes of log-likelihood scoring, and the log-probabilities taken from them.

A `Piece` is one context and the continuations scored after it (a `ScoreRow`, or the part of one
whose continuations share a context once cut to the model's length). Two ways through the model:

- shared context (`prefill` then `continuation_pass`): the contexts of up to `capacity` pieces run
  once, left-padded, as one batch; the logits of each context's last token score the first token of
  all its continuations. Then the continuations (all but their last token), right-padded, run as a
  batch on top of their piece's context KV entries (copied per continuation from the prefill's
  cache), and the logits at their own positions score the rest of their tokens. In every sequence
  the real tokens sit in consecutive columns (context padding on the far left, continuation padding
  on the far right), so their column distances are their token distances: a sliding-window mask,
  built from columns, sees what it sees for the sequence alone.
- whole sequences (`whole_pass`): each (context, continuation[:-1]) is its own left-padded sequence,
  as the harness runs it (the harness pads on the right; padding never changes a real position).

Needed positions only: the output projection (LM head) runs on the last context position of each
piece and on continuation positions, never on the rest of a context, and the log-softmax over the
vocabulary is taken only at the positions that score a token. Each switched off, every position of
the pass goes through the head and the log-softmax, as the harness does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import DynamicCache

from .kv_cache import cache_layers

#: One forward pass: (adapter name of each row or None, the model's keyword arguments) -> its output.
Forward = Callable[[list[str] | None, dict[str, Any]], Any]


@dataclass(frozen=True)
class Piece:
    """One context and the continuations scored after it, through adapter `name` (None: the model as
    it is). `owners[j]` is the global index of continuation j's score (`Scores`)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    name: str | None


class Scores:
    """Per continuation: the float64 sum of its tokens' log-probabilities and how many of its tokens
    were not the argmax. Filled in place, pass after pass, on the model's device."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.logprob = torch.zeros(count, dtype=torch.float64, device=device)  # [continuations]
        self.missed = torch.zeros(count, dtype=torch.long, device=device)  # [continuations]

    def add(self, owners: torch.Tensor, logprob: torch.Tensor, greedy: torch.Tensor) -> None:
        """Token k scored `logprob[k]` (argmax: `greedy[k]`) for continuation `owners[k]`; all [tokens]."""
        self.logprob.index_add_(0, owners, logprob.to(torch.float64))
        self.missed.index_add_(0, owners, (~greedy).to(torch.long))


def logits_kwargs(model: Any, keep: int) -> dict[str, int]:
    """`logits_to_keep=keep` (the last `keep` positions through the head; 0: all) where the model's
    forward takes it (every causal LM in transformers >= 4.50); else nothing (all positions)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


def _pass_names(names: Sequence[str | None]) -> list[str] | None:
    """The adapter name of each row of a pass, or None when the pass runs the model as it is."""
    if names[0] is None:
        assert all(name is None for name in names), "a pass names every row's adapter or none"
        return None
    return [str(name) for name in names]


def _log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [tokens, vocab], `targets` [tokens]: each target's log-probability (the harness's
    log-softmax, in the logits' dtype) and whether it is the argmax; both [tokens]."""
    log_probs = F.log_softmax(logits, dim=-1)  # [tokens, vocab]
    chosen = log_probs.gather(1, targets[:, None])[:, 0]
    return chosen, log_probs.argmax(dim=-1) == targets


def _score_positions(logits: torch.Tensor, real: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor,
                     scores: Scores, needed_only: bool) -> None:
    """Score the positions `real` [rows, columns] (bool) of `logits` [rows, columns, vocab]: position
    (r, c) predicts `targets[r, c]` for continuation `owners[r, c]` (both [rows, columns]).
    `needed_only`: the log-softmax on the real positions alone, else on every position first."""
    if needed_only:
        chosen, greedy = _log_probs(logits[real], targets[real])
    else:
        log_probs = F.log_softmax(logits, dim=-1)  # [rows, columns, vocab]: every position, as the harness
        chosen = log_probs.gather(2, targets[..., None])[..., 0][real]
        greedy = (log_probs.argmax(dim=-1) == targets)[real]
    scores.add(owners[real], chosen, greedy)


@dataclass
class Prefill:
    """The contexts of a batch of pieces, run once: their KV cache, attention mask and lengths.

    Invariants: row i of the cache and the mask is `pieces[i]`'s context, right-aligned (padding on
    the left, mask 0); `lengths[i]` its real tokens, which take positions 0 .. lengths[i] - 1."""

    pieces: list[Piece]
    cache: DynamicCache
    mask: torch.Tensor  # [pieces, width]
    lengths: list[int]


def prefill(model: Any, forward: Forward, pieces: list[Piece], scores: Scores, *, needed_only: bool) -> Prefill:
    """Run the contexts of `pieces` (left-padded) and score the first token of every continuation
    from the logits of its context's last token."""
    device = scores.logprob.device
    width = max(len(p.context) for p in pieces)
    ids = torch.zeros((len(pieces), width), dtype=torch.long)  # [pieces, width]; 0 pads (masked)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)  # [pieces, width]; 1 = a real token
    for i, piece in enumerate(pieces):
        ids[i, width - len(piece.context):] = torch.tensor(piece.context, dtype=torch.long)
        mask[i, width - len(piece.context):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [pieces, width]; pads are masked anyway
    cache = DynamicCache()
    out = forward(_pass_names([p.name for p in pieces]),
                  dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, **logits_kwargs(model, 1 if needed_only else 0)))
    if needed_only:  # every context ends in the last column: its logits, then the log-softmax of that row
        log_probs = F.log_softmax(out.logits[:, -1, :], dim=-1)  # [pieces, vocab]
    else:
        log_probs = F.log_softmax(out.logits, dim=-1)[:, -1, :]  # every position's, as the harness; the last kept
    rows = [i for i, piece in enumerate(pieces) for _ in piece.continuations]
    first = [c[0] for piece in pieces for c in piece.continuations]
    owners = [o for piece in pieces for o in piece.owners]
    row_index = torch.tensor(rows, dtype=torch.long, device=device)  # [continuations]: each one's piece
    targets = torch.tensor(first, dtype=torch.long, device=device)  # [continuations]
    picked = log_probs[row_index, targets]  # [continuations]
    greedy = log_probs.argmax(dim=-1)[row_index] == targets
    scores.add(torch.tensor(owners, dtype=torch.long, device=device), picked, greedy)
    return Prefill(pieces, cache, mask, [len(p.context) for p in pieces])


def continuation_pass(model: Any, forward: Forward, done: Prefill, items: Sequence[tuple[int, int]], scores: Scores,
                      *, needed_only: bool) -> None:
    """Score tokens 1.. of the continuations `items` ((piece index, continuation index), each with at
    least two tokens) on top of their pieces' context KV entries, as one right-padded batch."""
    device = scores.logprob.device
    conts = [done.pieces[p].continuations[c] for p, c in items]
    width = max(len(c) - 1 for c in conts)
    ids = torch.zeros((len(items), width), dtype=torch.long)  # [items, width]: tokens 0 .. n-2, 0 pads
    targets = torch.zeros((len(items), width), dtype=torch.long)  # [items, width]: tokens 1 .. n-1
    owners = torch.zeros((len(items), width), dtype=torch.long)  # [items, width]
    real = torch.zeros((len(items), width), dtype=torch.bool)  # [items, width]
    for i, ((p, c), cont) in enumerate(zip(items, conts)):
        n = len(cont) - 1
        ids[i, :n] = torch.tensor(cont[:-1], dtype=torch.long)
        targets[i, :n] = torch.tensor(cont[1:], dtype=torch.long)
        owners[i, :n] = done.pieces[p].owners[c]
        real[i, :n] = True
    ids, targets, owners, real = ids.to(device), targets.to(device), owners.to(device), real.to(device)
    rows = torch.tensor([p for p, _ in items], dtype=torch.long, device=device)  # [items]: each one's piece
    cache = DynamicCache()
    for index, layer in enumerate(cache_layers(done.cache)):  # each item's copy of its piece's context
        cache.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), index)
    mask = torch.cat([done.mask.index_select(0, rows), real.to(torch.long)], dim=1)  # [items, context + width]
    lengths = torch.tensor(done.lengths, dtype=torch.long, device=device).index_select(0, rows)  # [items]
    positions = lengths[:, None] + torch.arange(width, device=device)[None, :]  # [items, width]
    out = forward(_pass_names([done.pieces[p].name for p, _ in items]),
                  dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, **logits_kwargs(model, 0)))
    _score_positions(out.logits, real, targets, owners, scores, needed_only)


def whole_pass(model: Any, forward: Forward, items: Sequence[tuple[Piece, int]], scores: Scores, *,
               needed_only: bool) -> None:
    """Score the continuations `items` ((piece, continuation index)), each run whole after its
    context as its own left-padded sequence; only the last positions go through the head when
    `needed_only`."""
    device = scores.logprob.device
    seqs = [list(piece.context) + list(piece.continuations[c][:-1]) for piece, c in items]
    width = max(len(s) for s in seqs)
    keep = max(len(piece.continuations[c]) for piece, c in items) if needed_only else width
    ids = torch.zeros((len(items), width), dtype=torch.long)  # [items, width]; 0 pads (masked)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # [items, width]
    targets = torch.zeros((len(items), keep), dtype=torch.long)  # [items, keep]: the last `keep` columns
    owners = torch.zeros((len(items), keep), dtype=torch.long)  # [items, keep]
    real = torch.zeros((len(items), keep), dtype=torch.bool)  # [items, keep]
    for i, ((piece, c), seq) in enumerate(zip(items, seqs)):
        cont = piece.continuations[c]
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
        targets[i, keep - len(cont):] = torch.tensor(cont, dtype=torch.long)
        owners[i, keep - len(cont):] = piece.owners[c]
        real[i, keep - len(cont):] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [items, width]
    out = forward(_pass_names([piece.name for piece, _ in items]),
                  dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       **logits_kwargs(model, keep if needed_only else 0)))
    logits = out.logits[:, -keep:, :]  # [items, keep, vocab] (all of them when the model kept every position)
    _score_positions(logits, real.to(device), targets.to(device), owners.to(device), scores, needed_only)
