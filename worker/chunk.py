"""Processing one chunk: the pure part (examples in, output records out) and the SQL around it.

`run_chunk` is what the tests exercise hardest: it renders nothing (the producer did), tokenizes
each prompt once, generates every missing (example, variant) row on the one resident model, and
scores the outputs. `process_chunk` claims the chunk in SQL, calls it, and writes the records
idempotently with the chunk's completion, in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from contract.config import GenerationConfig, RunConfig
from contract.errors import ConfigError, FatalChunkError, RetryableChunkError
from contract.scoring import score
from db.outputs import cached_outputs, done_pairs, insert_generations
from db.runs import chunk_examples, claim_chunk, complete_chunk, fail_chunk, get_run, run_variants

from .engine.call import DecodeOptions
from .engine.generation import GenResult, GenRow, generate_mixed, generate_separate
from .model_host import ModelHost, ModelIdentity
from .prompts import encode_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkExample:
    idx: int
    prompt: str
    reference: str | None


@dataclass(frozen=True)
class VariantSpec:
    """`base` (no folder) or an adapter's variant name and folder."""

    name: str
    adapter_path: str | None


@dataclass(frozen=True)
class OutputRecord:
    example_idx: int
    variant: str
    output: str
    prediction: str | None
    correct: bool | None
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    base_model_hash: str
    adapter_hash: str | None
    cache_key: str | None = None
    reused_from: int | None = None  # the generation this output was copied from
    output_ids: list[int] | None = None  # every generated token (None: not generated, or copied from a row without)


#: Looks up cache keys: key -> {"id", "output", "output_tokens", "finish_reason", "output_ids"} of an earlier output.
CacheLookup = Callable[[list[str]], dict[str, dict[str, Any]]]

#: Bumped whenever what goes into a cache key changes, so that older keys never match.
CACHE_KEY_VERSION = 2


def cache_key(model: ModelIdentity, adapter_hash: str | None, input_ids: Sequence[int], gen: GenerationConfig,
              *, path: str) -> str | None:
    """What determines a greedy output: the base weights and config, the tokenizer files and generation
    config (EOS ids), the dtype as resolved, the device type, the generation `path` (`mixed`: one copy of
    the weights with adapters applied per row; `merged`: each adapter merged in; not bit-identical), the
    adapter, the exact prompt tokens and the settings. None when sampling (a sampled output is not reused)."""
    if gen.do_sample:
        return None
    payload = {"v": CACHE_KEY_VERSION, "base": model.base_hash, "tokenizer": model.tokenizer_hash,
               "dtype": model.dtype, "device": model.device, "eos": list(model.eos_ids), "path": path,
               "adapter": adapter_hash, "ids": list(input_ids), "max_new_tokens": gen.max_new_tokens,
               "stop": list(gen.stop)}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ChunkOutcome:
    records: list[OutputRecord]
    generate_seconds: float
    device: str | None = None  # where it was generated (cpu, cuda:0, ...)
    dtype: str | None = None  # the weights' dtype as resolved
    engine: str | None = None  # the exact fallbacks taken instead of the fast path, and why; None: none


def run_chunk(
    host: ModelHost,
    config: RunConfig,
    examples: Sequence[ChunkExample],
    variants: Sequence[VariantSpec],
    *,
    skip: frozenset[tuple[int, str]] = frozenset(),
    seed: int = 0,
    cached: CacheLookup | None = None,
    options: DecodeOptions | None = None,
) -> ChunkOutcome:
    """Generate and score every (example, variant) of the chunk not in `skip`; outputs that `cached`
    already knows (same weights, prompt tokens and settings) are reused instead of generated.
    `options`: the decode engine's switches (default: every fast path the model allows)."""
    host.ensure_base(config.model.base, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
    adapters: dict[str, tuple[str | None, str | None]] = {}  # variant -> (PEFT name, adapter hash)
    for variant in variants:
        if variant.adapter_path is None:
            adapters[variant.name] = (None, None)
        else:
            adapters[variant.name] = host.ensure_adapter(variant.name, variant.adapter_path)

    todo = [(ex, v) for ex in examples for v in variants if (ex.idx, v.name) not in skip]
    if not todo:
        return ChunkOutcome([], 0.0)
    # Tokenize each prompt once for all its variants.
    needed = sorted({ex.idx for ex, _ in todo})
    by_idx = {ex.idx: ex for ex in examples}
    token_ids = encode_prompts(
        host.tokenizer,
        [by_idx[i].prompt for i in needed],
        system_prompt=config.dataset.system_prompt,
        chat_template=config.dataset.chat_template,
    )
    ids_of = {i: tuple(ids) for i, ids in zip(needed, token_ids)}
    rows = [GenRow(ids_of[ex.idx], adapters[v.name][0]) for ex, v in todo]
    # Rows that cannot be generated get their reason; the rest of the chunk goes on.
    refused = {k: r for k, r in ((k, _unservable(ex, rows[k], host.max_positions, config)) for k, (ex, _v)
                                 in enumerate(todo)) if r is not None}
    identity = host.identity
    assert identity is not None  # ensure_base set it
    path = "mixed" if config.inference.use_peft_directly else "merged"
    keys = [cache_key(identity, adapters[v.name][1], rows[k].input_ids, config.generation, path=path)
            for k, (_ex, v) in enumerate(todo)]
    hits = cached([k for k in keys if k]) if cached is not None else {}
    reused = {k: hits[key] for k, key in enumerate(keys) if key in hits and k not in refused}
    runnable = [k for k in range(len(rows)) if k not in refused and k not in reused]

    if config.generation.do_sample:
        torch.manual_seed(seed)
    started = time.perf_counter()
    batch = [rows[k] for k in runnable]
    notes: list[str] = []
    if not batch:
        generated: list[GenResult] = []
    elif config.inference.use_peft_directly:
        generated = generate_mixed(
            host.model, host.tokenizer, batch, config.generation, batch_size=config.inference.batch_size,
            device=host.device, variants=len(variants), options=options, notes=notes,
        )
    else:
        generated = generate_separate(
            host.peft_model, host.tokenizer, batch, config.generation, batch_size=config.inference.batch_size,
            device=host.device, layers_of=host.adapted_layers, options=options, notes=notes,
        )
    elapsed = time.perf_counter() - started
    by_row: dict[int, GenResult] = dict(zip(runnable, generated))
    by_row.update(refused)
    by_row.update({k: GenResult(h["output"], int(h["output_tokens"]), h["finish_reason"],
                                None if h.get("output_ids") is None else tuple(h["output_ids"]))
                   for k, h in reused.items()})
    results = [by_row[k] for k in range(len(rows))]

    records = []
    for k, ((ex, variant), row, result) in enumerate(zip(todo, rows, results)):
        scored = score(result.text, ex.reference, config.scoring)
        records.append(
            OutputRecord(
                example_idx=ex.idx,
                variant=variant.name,
                output=result.text,
                prediction=scored.prediction,
                correct=scored.correct,
                prompt_tokens=len(row.input_ids),
                output_tokens=result.output_tokens,
                finish_reason=result.finish_reason,
                base_model_hash=host.base_hash,
                adapter_hash=adapters[variant.name][1],
                cache_key=keys[k] if k not in refused else None,
                reused_from=reused[k]["id"] if k in reused else None,
                output_ids=None if result.token_ids is None else list(result.token_ids),
            )
        )
    for variant_name, (peft_name, _hash) in adapters.items():  # notes name adapters as the user does
        if peft_name is not None:
            notes = [note.replace(peft_name, f"'{variant_name}'") for note in notes]
    return ChunkOutcome(records, elapsed, device=str(host.device), dtype=identity.dtype,
                        engine="; ".join(dict.fromkeys(notes)) or None)


def _unservable(ex: ChunkExample, row: GenRow, max_positions: int | None, config: RunConfig) -> GenResult | None:
    """Why a row cannot be generated (an empty prompt, a prompt too long for the model), or None."""
    if not ex.prompt.strip():
        return GenResult("", 0, "empty_prompt")
    if max_positions is not None and len(row.input_ids) + config.generation.max_new_tokens > max_positions:
        return GenResult("", 0, "prompt_too_long")
    return None


# --- the SQL around it -------------------------------------------------------------------------

_TRANSIENT_DB_ERRORS = (OperationalError, PoolTimeoutError)
#: Seconds a worker keeps retrying to write a generated chunk while the database is unreachable,
#: holding the outputs in memory, before it gives the chunk back to the queue.
WRITE_RETRY_BUDGET_S = 600.0
#: Longest pause between two write attempts, in seconds.
WRITE_RETRY_MAX_DELAY_S = 10.0


def process_chunk(
    sessions: sessionmaker[Session],
    host: ModelHost,
    run_id: int,
    chunk_id: int,
    *,
    worker: str,
    max_attempts: int,
) -> str:
    """Claim, generate, write, mark done. Returns what happened: done | skipped | retry | failed.

    Raises RetryableChunkError when the database is unreachable (the message should be retried).
    """
    try:
        with sessions.begin() as session:  # the claim is committed on its own, before anything can fail
            claim = claim_chunk(session, run_id, chunk_id, worker=worker, max_attempts=max_attempts)
            if claim is None:
                if get_run(session, run_id) is None:
                    log.error("rejected a chunk message for run %s, which does not exist", run_id)
                    return "rejected"
                return "skipped"
        with sessions() as session:
            run = get_run(session, run_id)
            assert run is not None
            variants = [VariantSpec(v.name, v.adapter_path) for v in run_variants(session, run_id)]
            examples = [ChunkExample(e.idx, e.prompt, e.reference) for e in chunk_examples(session, run_id, chunk_id)]
            skip = frozenset(done_pairs(session, run_id, claim.start_idx, claim.end_idx))
            stored = run.config
    except _TRANSIENT_DB_ERRORS as err:
        raise RetryableChunkError(f"database unreachable: {err}") from err
    try:
        config = RunConfig.from_dict(stored)
    except ConfigError as err:  # e.g. a key from a newer producer: no attempt can do better
        log.error("run %s chunk %s: the run's stored config is unusable: %s", run_id, chunk_id, err)
        _record_failure(sessions, run_id, chunk_id, f"the run's stored config cannot be used by this worker "
                        f"(upgrade the worker if the run was submitted by a newer lora-compare): {err}", final=True)
        return "failed"

    log.info("run %s chunk %s attempt %s: %d examples x %d variants", run_id, chunk_id, claim.attempt,
             len(examples), len(variants))
    try:
        with host.lock:
            outcome = run_chunk(
                host, config, examples, variants, skip=skip, seed=config.generation.seed * 1_000_003 + chunk_id,
                cached=lambda keys: _lookup(sessions, keys),
            )
    except FatalChunkError as err:
        _record_failure(sessions, run_id, chunk_id, str(err), final=True)
        return "failed"
    except Exception as err:  # noqa: BLE001 - any other fault: counted, then retried up to the bound
        log.exception("run %s chunk %s failed", run_id, chunk_id)
        final = claim.attempt >= max_attempts
        _record_failure(sessions, run_id, chunk_id, f"{type(err).__name__}: {err}", final=final)
        return "failed" if final else "retry"

    rows = [_row(run_id, chunk_id, worker, r) for r in outcome.records]
    try:
        _write_outputs(sessions, run_id, chunk_id, rows, outcome)
    except RetryableChunkError:
        raise
    except Exception as err:  # noqa: BLE001 - a write that fails for another reason: counted and retried
        log.exception("run %s chunk %s: writing outputs failed", run_id, chunk_id)
        final = claim.attempt >= max_attempts
        _record_failure(sessions, run_id, chunk_id, f"writing outputs: {type(err).__name__}: {err}", final=final)
        return "failed" if final else "retry"
    stats = host.stats
    log.info("run %s chunk %s done: %d rows in %.2fs of generation (model loads so far: base %d, adapters %d; "
             "resident adapters %d)", run_id, chunk_id, len(outcome.records), outcome.generate_seconds,
             stats.base_loads, stats.adapter_loads, len(stats.resident_adapters))
    return "done"


def refuse_chunk(sessions: sessionmaker[Session], run_id: int, chunk_id: int, reason: str) -> None:
    """Fail a chunk this worker cannot serve at all (a message from a newer producer), in one attempt."""
    _record_failure(sessions, run_id, chunk_id, reason, final=True)


def _write_outputs(
    sessions: sessionmaker[Session], run_id: int, chunk_id: int, rows: list[dict[str, Any]], outcome: ChunkOutcome
) -> None:
    """Write the chunk's outputs and mark it done, retrying while the database is unreachable."""
    deadline = time.monotonic() + WRITE_RETRY_BUDGET_S
    delay = 0.5
    while True:
        try:
            with sessions.begin() as session:
                insert_generations(session, rows)
                complete_chunk(session, run_id, chunk_id, generate_seconds=outcome.generate_seconds,
                               device=outcome.device, dtype=outcome.dtype, engine=outcome.engine)
            return
        except _TRANSIENT_DB_ERRORS as err:
            if time.monotonic() + delay > deadline:
                raise RetryableChunkError(f"database unreachable while writing outputs: {err}") from err
            log.warning("run %s chunk %s: database unreachable while writing (%s); trying again in %.1fs",
                        run_id, chunk_id, str(err).splitlines()[0], delay)
            time.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_DELAY_S)


def _lookup(sessions: sessionmaker[Session], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Earlier outputs for these cache keys; none when the database cannot say (then we generate)."""
    try:
        with sessions() as session:
            return cached_outputs(session, keys)
    except _TRANSIENT_DB_ERRORS as err:
        log.warning("generation cache unavailable (%s); generating everything", str(err).splitlines()[0])
        return {}


def _row(run_id: int, chunk_id: int, worker: str, record: OutputRecord) -> dict[str, Any]:
    return {"run_id": run_id, "chunk_id": chunk_id, "worker": worker, **asdict(record)}


def _record_failure(sessions: sessionmaker[Session], run_id: int, chunk_id: int, error: str, *, final: bool) -> None:
    try:
        with sessions.begin() as session:
            fail_chunk(session, run_id, chunk_id, error=error, final=final)
    except _TRANSIENT_DB_ERRORS as err:
        raise RetryableChunkError(f"database unreachable while recording a failure: {err}") from err
