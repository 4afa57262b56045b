"""The forward passes of log-likelihood scoring, and the log-probabilities taken from them.

A `Piece` is one context and the continuations scored after it (a `ScoreRow`, or the part of one
whose continuations share a context once cut to the model's length). Two ways through the model:

- shared context (`prefill` then `continuation_pass`): the contexts of up to `capacity` pieces run
  once, left-padded, as one batch; the logits of each context's last token score the first token of
  all its continuations. Then the continuations (all but their last token), right-padded, run as a
  batch on top of their piece's context KV entries (copied per continuation from the prefill's
  cache), and the logits at their own positions score the rest of their tokens. Three savings on
  top, each giving the same inputs at the same positions: the leading tokens that all of a piece's
  continuations share (" " before every number) join its context, scored there for each of them
  (`fold`); continuations that differ only in their last token ("95", "96") run as one sequence
  (`tail_groups`, as the harness's own grouping by context + continuation[:-1]); and the leading
  tokens that every context of a pass shares ("Question: What is") run once per adapter
  (`shared_prefix`), the rest of each context on top of them. Without a shared prefix the real tokens
  of every sequence sit in consecutive columns (context padding on the far left, continuation padding
  on the far right), so a sliding-window mask, built from columns, sees what it sees for the sequence
  alone; with one, padding sits between the prefix and the rest, which is why `loglik.plan_score`
  shares no prefix where a window is shorter than the rows.
- whole sequences (`whole_pass`): each (context, continuation[:-1]) is its own left-padded sequence,
  as the harness runs it (the harness pads on the right; padding never changes a real position).

Needed positions only: the output projection (LM head) runs on the last context position of each
piece (and those before that predict its folded tokens) and on continuation positions, never on the
rest of a context, as one matrix (`cpu_head.flat_rows`), and the log-softmax over the vocabulary is
taken only at the positions that score a token. Each switched off, every position of
the pass goes through the head and the log-softmax, as the harness does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import DynamicCache

from .kv_cache import cache_layers
from .prefix import common_prefix

#: One forward pass: (adapter name of each row or None, the model's keyword arguments) -> its output.
Forward = Callable[[list[str] | None, dict[str, Any]], Any]


@dataclass(frozen=True)
class Piece:
    """One context and the continuations scored after it, through adapter `name` (None: the model as
    it is). `owners[j]` is the global index of continuation j's score (`Scores`). The context's last
    `folded` tokens are the leading tokens every continuation had (`fold`): each is scored for all of them."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    name: str | None
    folded: int = 0


def fold(piece: Piece) -> Piece:
    """`piece` with the leading tokens all its continuations share (" " before every number) moved to
    the end of its context, each continuation keeping at least one token of its own: the same tokens at
    the same positions, run once in the context's pass instead of once per continuation."""
    shortest = min(len(c) for c in piece.continuations)
    first, n = piece.continuations[0], 0
    while n < shortest - 1 and all(c[n] == first[n] for c in piece.continuations):
        n += 1
    if n == 0:
        return piece
    return Piece(piece.context + first[:n], tuple(c[n:] for c in piece.continuations), piece.owners, piece.name,
                 piece.folded + n)


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


@dataclass
class ScoredTokens:
    """The tokens one pass scores: per token, the row and column of the logits that predict it, the
    token, and the continuation it belongs to (`Scores` index). A position may score several tokens."""

    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)

    def add(self, row: int, cols: Sequence[int], targets: Sequence[int], owner: int) -> None:
        """Tokens `targets` of continuation `owner`, predicted at columns `cols` of row `row`."""
        self.rows += [row] * len(cols)
        self.cols += cols
        self.targets += targets
        self.owners += [owner] * len(cols)

    def score(self, logits: torch.Tensor, real: torch.Tensor, scores: Scores, needed_only: bool) -> None:
        """Add the tokens' log-probabilities from `logits` [rows, columns, vocab] to `scores`. `needed_only`:
        the log-softmax once per position in `real` [rows, columns] (every scored position), else on every
        position, as the harness."""
        row, col, targets, owners = (torch.tensor(v, dtype=torch.long, device=logits.device)  # each [tokens]
                                     for v in (self.rows, self.cols, self.targets, self.owners))
        if needed_only:
            index = torch.full(real.shape, -1, dtype=torch.long, device=real.device)  # [rows, columns]
            index[real] = torch.arange(int(real.sum()), device=real.device)
            log_probs = F.log_softmax(logits[real], dim=-1)  # [real positions, vocab]
            at = index[row, col]  # [tokens]
            chosen, greedy = log_probs[at, targets], log_probs.argmax(dim=-1)[at] == targets
        else:
            log_probs = F.log_softmax(logits, dim=-1)  # [rows, columns, vocab]
            chosen, greedy = log_probs[row, col, targets], log_probs.argmax(dim=-1)[row, col] == targets
        scores.add(owners, chosen, greedy)


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

    Invariants: row i of the cache and the mask is `pieces[i]`'s context: the batch's shared prefix
    (`shared` columns, none when it shares nothing), then the rest of the context right-aligned
    (padding between them, mask 0); `lengths[i]` its real tokens, which take positions 0 .. lengths[i] - 1."""

    pieces: list[Piece]
    cache: DynamicCache
    mask: torch.Tensor  # [pieces, shared + width]
    lengths: list[int]
    shared: int = 0


def shared_prefix(pieces: Sequence[Piece]) -> int:
    """How many leading context tokens every piece of a pass shares, worth running once per adapter:
    each piece keeps at least one of its own and all its folded ones, and sharing saves tokens (more
    pieces than adapters)."""
    length = min(common_prefix([p.context for p in pieces]), *(len(p.context) - 1 - p.folded for p in pieces))
    return length if len(pieces) > len({p.name for p in pieces}) else 0


def _prefix_cache(forward: Forward, pieces: list[Piece], length: int, device: torch.device, keep: dict[str, int]
                  ) -> DynamicCache:
    """The first `length` context tokens (the same in every piece) run once per adapter of the pass;
    a cache whose row i holds them for `pieces[i]`'s adapter."""
    names = list(dict.fromkeys(p.name for p in pieces))  # the pass's adapters, in order (None: the model as it is)
    ids = torch.tensor([list(pieces[0].context[:length])] * len(names), dtype=torch.long, device=device)
    once = DynamicCache()  # [adapters, heads, length, head_dim] per layer
    forward(_pass_names(names), dict(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=once,
                                     use_cache=True, **keep))
    rows = torch.tensor([names.index(p.name) for p in pieces], dtype=torch.long, device=device)  # [pieces]
    cache = DynamicCache()
    for index, layer in enumerate(cache_layers(once)):  # each piece's copy of its adapter's prefix
        cache.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), index)
    return cache


def prefill(model: Any, forward: Forward, pieces: list[Piece], scores: Scores, *, needed_only: bool,
            share_prefix: bool = True) -> Prefill:
    """Run the contexts of `pieces` (left-padded) and score the first token of every continuation
    from the logits of its context's last token, and its folded tokens from those before. `share_prefix`:
    the leading tokens every context shares run once per adapter first (`shared_prefix`), the rest on
    top of them."""
    device = scores.logprob.device
    start = shared_prefix(pieces) if share_prefix else 0
    width = max(len(p.context) - start for p in pieces)
    ids = torch.zeros((len(pieces), width), dtype=torch.long)  # [pieces, width]; 0 pads (masked)
    mask = torch.zeros((len(pieces), start + width), dtype=torch.long)  # [pieces, start + width]; 1 = a real token
    mask[:, :start] = 1
    for i, piece in enumerate(pieces):
        ids[i, width - len(piece.context) + start:] = torch.tensor(piece.context[start:], dtype=torch.long)
        mask[i, start + width - len(piece.context) + start:] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, start:]  # [pieces, width]; pads are masked anyway
    keep = 1 + max(p.folded for p in pieces)  # the last columns, whose logits score a token
    cache = _prefix_cache(forward, pieces, start, device, logits_kwargs(model, 1)) if start else DynamicCache()
    out = forward(_pass_names([p.name for p in pieces]),
                  dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, **logits_kwargs(model, keep if needed_only else 0)))
    logits = out.logits[:, -keep:, :] if needed_only else out.logits  # [pieces, keep or width, vocab]
    last = logits.shape[1] - 1  # the column of every context's last token
    real = torch.zeros(logits.shape[:2], dtype=torch.bool)  # [pieces, columns]: those that score a token
    scored = ScoredTokens()
    for i, piece in enumerate(pieces):
        real[i, last - piece.folded:] = True
        shared = piece.context[len(piece.context) - piece.folded:]  # what every continuation began with
        for cont, whose in zip(piece.continuations, piece.owners):
            scored.add(i, range(last - piece.folded, last + 1), (*shared, cont[0]), whose)
    scored.score(logits, real.to(device), scores, needed_only)
    return Prefill(pieces, cache, mask, [len(p.context) for p in pieces], start)


def tail_groups(pieces: Sequence[Piece]) -> list[tuple[int, tuple[int, ...]]]:
    """The continuations of two or more tokens, as (piece index, continuation indices): those of one
    piece that share all but their last token in one group, in order of first appearance. A group runs
    as one sequence (its shared tokens), whose logits score every member's tokens 1..: the same inputs
    and positions as each member alone."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for p, piece in enumerate(pieces):
        for c, cont in enumerate(piece.continuations):
            if len(cont) > 1:
                groups.setdefault((p, cont[:-1]), []).append(c)
    return [(p, tuple(members)) for (p, _), members in groups.items()]


def continuation_pass(model: Any, forward: Forward, done: Prefill, items: Sequence[tuple[int, tuple[int, ...]]],
                      scores: Scores, *, needed_only: bool) -> None:
    """Score tokens 1.. of the continuations `items` ((piece index, indices of continuations with at
    least two tokens that share all but their last: `tail_groups`) on top of their pieces' context KV
    entries, one sequence per item, as one right-padded batch."""
    device = scores.logprob.device
    shared = [done.pieces[p].continuations[members[0]][:-1] for p, members in items]  # each item's input tokens
    width = max(len(s) for s in shared)
    ids = torch.zeros((len(items), width), dtype=torch.long)  # [items, width]: tokens 0 .. n-2, 0 pads
    real = torch.zeros((len(items), width), dtype=torch.bool)  # [items, width]
    scored = ScoredTokens()
    for i, ((p, members), tokens) in enumerate(zip(items, shared)):
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        real[i, :len(tokens)] = True
        for c in members:
            cont = done.pieces[p].continuations[c]
            scored.add(i, range(len(cont) - 1), cont[1:], done.pieces[p].owners[c])
    ids, real = ids.to(device), real.to(device)
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
    scored.score(out.logits, real, scores, needed_only)


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
