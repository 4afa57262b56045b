"""One log-likelihood chunk without SQL (`task: choice`, `task: perplexity`): the rows to score, how
they are tokenized, and their records.

The definitions are lm-evaluation-harness's (`multiple_choice` and `loglikelihood_rolling`):
- choice: each choice is the continuation `target_delimiter + choice` of the context, tokenized as the
  harness's `_encode_pair` does (`ChunkGenerator.encode_pairs`); its score is the sum of its tokens'
  log-probabilities; the prediction is the argmax (`acc`), and `acc_norm` divides each score by the
  choice's length in characters (the report reads that from the stored scores).
- perplexity: the document's tokens (no special tokens) cut into the harness's rolling windows
  (`worker.windows`), each window's tokens scored after its context; the document's log-likelihood is
  their sum, with its tokens, bytes and words beside it.
Base and every adapter go to the generator in one call, so it can score them in the same passes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from contract.config import RunConfig
from db.enums import FinishReason

from .generated import ScoreResult, ScoreRow
from .planner import (
    ChunkExample,
    ChunkGenerator,
    ChunkOutcome,
    OutputRecord,
    PlannedRow,
    RowState,
    VariantSpec,
    load_adapters,
    plan_rows,
    prompts_to_encode,
    user_notes,
)
from .windows import harness_max_length, rolling_windows

_WORDS = re.compile(r"\s+")


@dataclass(frozen=True)
class ScoreRecord:
    """One stored score (`loglikelihoods`): a choice of an (example, variant), or a whole document."""

    example_idx: int
    variant: str
    choice_idx: int
    logprob: float
    tokens: int
    bytes: int
    chars: int
    words: int | None = None
    greedy: bool | None = None


def argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, the harness's choice among ties)."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def count_words(text: str) -> int:
    """The harness's word count for word perplexity (`len(re.split(r"\\s+", doc))`)."""
    return len(_WORDS.split(text))


def run_loglik_chunk(host: ChunkGenerator, config: RunConfig, examples: Sequence[ChunkExample],
                     variants: Sequence[VariantSpec], *, skip: frozenset[tuple[int, str]] = frozenset()
                     ) -> ChunkOutcome:
    """Score every (example, variant) of the chunk not in `skip`: one output record (the chosen answer)
    and its scores per row."""
    identity = host.load_base(config.model)
    adapters = load_adapters(host, variants)
    rows = [row for row in plan_rows(examples, variants, skip) if row.state is not RowState.SKIP]
    needed = prompts_to_encode(rows)
    if not needed:
        return ChunkOutcome([], 0.0)
    for row in rows:
        row.adapter, row.adapter_hash = adapters[row.variant.name]
    if config.task == "choice":
        requests = _choice_requests(host, config, needed, rows)
    else:
        requests = _document_requests(host, needed, rows)
    flat = [request for per_row in requests for request in per_row]
    started = time.perf_counter()
    results, notes = host.score(flat, config.inference, variants=len(variants), options=None)
    elapsed = time.perf_counter() - started
    if len(results) != len(flat):
        raise RuntimeError(f"the generator returned {len(results)} scores for {len(flat)} requests")
    records: list[OutputRecord] = []
    scores: list[ScoreRecord] = []
    at = 0
    for row, per_row in zip(rows, requests):
        got = results[at:at + len(per_row)]
        at += len(per_row)
        record, row_scores = (_choice_records if config.task == "choice" else _document_records)(
            row, per_row, got, identity.base_hash)
        records.append(record)
        scores.extend(row_scores)
    return ChunkOutcome(records, elapsed, device=host.device_name(), dtype=identity.dtype,
                        engine=user_notes(notes, adapters), scores=scores)


def _choice_requests(host: ChunkGenerator, config: RunConfig, needed: Sequence[ChunkExample],
                     rows: Sequence[PlannedRow]) -> list[list[ScoreRow]]:
    """One request per row: its context and every choice after it."""
    delimiter = config.choice_delimiter
    pairs = host.encode_pairs([ex.prompt for ex in needed], [[delimiter + c for c in ex.choices or ()]
                                                              for ex in needed], config.dataset)
    encoded = {ex.idx: pair for ex, pair in zip(needed, pairs)}
    out = []
    for row in rows:
        context, continuations = encoded[row.example.idx]
        row.input_ids = tuple(context)
        out.append([ScoreRow(tuple(context), tuple(tuple(c) for c in continuations), row.adapter)])
    return out


def _document_requests(host: ChunkGenerator, needed: Sequence[ChunkExample],
                       rows: Sequence[PlannedRow]) -> list[list[ScoreRow]]:
    """One request per rolling window of each row's document."""
    tokens = dict(zip((ex.idx for ex in needed), host.encode_text([ex.prompt for ex in needed])))
    max_len = harness_max_length(host.context_limit())
    windows = {idx: rolling_windows(ids, host.prefix_token_id(), max_len) for idx, ids in tokens.items()}
    out = []
    for row in rows:
        row.input_ids = tuple(tokens[row.example.idx])
        out.append([ScoreRow(tuple(context), (tuple(continuation),), row.adapter)
                    for context, continuation in windows[row.example.idx]])
    return out


def _choice_records(row: PlannedRow, requests: Sequence[ScoreRow], results: Sequence[ScoreResult],
                    base_hash: str) -> tuple[OutputRecord, list[ScoreRecord]]:
    (request,), (result,) = requests, results
    choices = row.example.choices or ()
    if len(result.logprobs) != len(choices):
        raise RuntimeError(f"the generator scored {len(result.logprobs)} choices of example {row.example.idx}, "
                           f"which has {len(choices)}")
    chosen = argmax(result.logprobs)
    gold = row.example.answer
    record = OutputRecord(
        example_idx=row.example.idx, variant=row.variant.name, output=choices[chosen], prediction=choices[chosen],
        correct=None if gold is None else chosen == gold, prompt_tokens=len(request.context_ids), output_tokens=0,
        finish_reason=FinishReason.SCORED, base_model_hash=base_hash, adapter_hash=row.adapter_hash)
    scores = [ScoreRecord(row.example.idx, row.variant.name, i, float(lp), len(request.continuations[i]),
                          len(choice.encode("utf-8")), len(choice), None, bool(result.greedy[i]))
              for i, (choice, lp) in enumerate(zip(choices, result.logprobs))]
    return record, scores


def _document_records(row: PlannedRow, requests: Sequence[ScoreRow], results: Sequence[ScoreResult],
                      base_hash: str) -> tuple[OutputRecord, list[ScoreRecord]]:
    text = row.example.prompt
    total = 0.0
    for result in results:
        total += float(result.logprobs[0])
    record = OutputRecord(
        example_idx=row.example.idx, variant=row.variant.name, output="", prediction=None, correct=None,
        prompt_tokens=len(row.input_ids), output_tokens=0, finish_reason=FinishReason.SCORED,
        base_model_hash=base_hash, adapter_hash=row.adapter_hash)
    score = ScoreRecord(row.example.idx, row.variant.name, 0, total, len(row.input_ids), len(text.encode("utf-8")),
                        len(text), count_words(text), all(r.greedy[0] for r in results) if results else None)
    return record, [score]
