"""The SQL around one chunk: claim it, read it, run it (`worker.planner.run_chunk`), write its outputs.

`process_chunk` commits the claim on its own first; from then on every path ends with the chunk done,
failed (with the reason) or given back to the queue with its error: no exception leaves it claimed.
A worker shutting down stops generating at the next decode step (`ChunkInterrupted`) and hands the
chunk back: `queued` again, the attempt not counted, a fresh message sent (`hand_back`).
The claim is a lease (db/leases.py) that a heartbeat renews while the chunk runs; every write carries
the claim's token, and is refused when another worker has taken the chunk over meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from contract.config import RunConfig
from contract.errors import ChunkInterrupted, ConfigError, FatalChunkError, RetryableChunkError
from db.leases import RECONCILE_AFTER_S, hold_lease
from db.outputs import CachedOutput, NewGeneration, cached_outputs, done_pairs, insert_generations
from db.runs import (
    ChunkClaim,
    chunk_prompts,
    claim_chunk,
    complete_chunk,
    fail_chunk,
    get_run,
    hand_back_chunk,
    run_variants,
)
from db.scores import NewScore, insert_scores

from .lease import Heartbeat
from .planner import (  # noqa: F401 - cache_key and CACHE_KEY_VERSION: their import path before the split
    CACHE_KEY_VERSION,
    ChunkExample,
    ChunkGenerator,
    ChunkOutcome,
    OutputRecord,
    Reusable,
    VariantSpec,
    cache_key,
    run_chunk,
)

log = logging.getLogger(__name__)


class Processed(str, Enum):
    """What `process_chunk` did with a chunk message."""

    DONE = "done"  # generated (or reused) and written; the chunk is done
    SKIPPED = "skipped"  # nothing to do: done, failed or cancelled already (a redelivered message), or
    # another worker holds its live lease, or took it over while this one worked (nothing written)
    RETRY = "retry"  # failed, counted, back in the queue: deliver the message again later
    FAILED = "failed"  # failed for good, the reason on the chunk
    REJECTED = "rejected"  # no such run: the message is dropped
    HANDED_BACK = "handed_back"  # the worker is shutting down: the chunk is queued again, uncounted

    def __str__(self) -> str:
        return self.value


# --- the SQL around it -------------------------------------------------------------------------

_TRANSIENT_DB_ERRORS = (OperationalError, PoolTimeoutError)
#: Seconds a worker keeps retrying to write a generated chunk while the database is unreachable,
#: holding the outputs in memory, before it gives the chunk back to the queue.
WRITE_RETRY_BUDGET_S = 600.0
#: Longest pause between two write attempts, in seconds.
WRITE_RETRY_MAX_DELAY_S = 10.0


def process_chunk(
    sessions: sessionmaker[Session],
    host: ChunkGenerator,
    run_id: int,
    chunk_id: int,
    *,
    worker: str,
    max_attempts: int,
    send: Callable[[int, int, str | None], None] | None = None,
) -> Processed:
    """Claim, generate, write, mark done; returns what happened.

    Raises RetryableChunkError when the database is unreachable (the message should be retried).
    `send(run_id, chunk_id, queue)`: sends a chunk's fresh message to its run's queue (None: the
    default queue), for a chunk handed back at shutdown; without it the sweeps' reconciliation does.
    """
    try:
        with sessions.begin() as session:  # the claim is committed on its own, before anything can fail
            claim = claim_chunk(session, run_id, chunk_id, worker=worker, max_attempts=max_attempts)
            if claim is None:
                if get_run(session, run_id) is None:
                    log.error("rejected a chunk message for run %s, which does not exist", run_id)
                    return Processed.REJECTED
                return Processed.SKIPPED
    except _TRANSIENT_DB_ERRORS as err:
        raise RetryableChunkError(f"database unreachable: {err}") from err
    try:
        with Heartbeat(sessions, run_id, chunk_id, claim.token):
            return _process_claimed(sessions, host, claim, worker=worker, max_attempts=max_attempts)
    except ChunkInterrupted:  # after the heartbeat stopped: it would take the hand-back for a takeover
        return hand_back(sessions, claim, worker=worker, send=send)
    except RetryableChunkError:
        raise
    except _TRANSIENT_DB_ERRORS as err:
        raise RetryableChunkError(f"database unreachable: {err}") from err
    except Exception as err:  # noqa: BLE001 - any step not handled below: recorded, never left claimed
        log.exception("run %s chunk %s failed", run_id, chunk_id)
        return _record_failure(sessions, run_id, chunk_id, f"{type(err).__name__}: {err}", final=True,
                               token=claim.token)


@dataclass(frozen=True)
class _ChunkWork:
    config: dict[str, Any]  # as stored
    examples: list[ChunkExample]
    variants: list[VariantSpec]
    skip: frozenset[tuple[int, str]]


def _read_chunk(sessions: sessionmaker[Session], claim: ChunkClaim) -> _ChunkWork:
    with sessions() as session:
        run = get_run(session, claim.run_id)
        if run is None:
            raise FatalChunkError(f"run {claim.run_id} disappeared after its chunk was claimed")
        return _ChunkWork(
            config=run.config,
            examples=[ChunkExample(idx, prompt, ref, None if choices is None else tuple(choices), answer)
                      for idx, prompt, ref, choices, answer in chunk_prompts(session, claim.run_id, claim.chunk_id)],
            variants=[VariantSpec(v.name, v.adapter_path, v.adapter_hash) for v in run_variants(session, claim.run_id)],
            skip=frozenset(done_pairs(session, claim.run_id, claim.start_idx, claim.end_idx)),
        )


def _process_claimed(
    sessions: sessionmaker[Session], host: ChunkGenerator, claim: ChunkClaim, *, worker: str, max_attempts: int
) -> Processed:
    """The steps after the claim. Any exception they let out is a fatal failure of the chunk
    (`process_chunk` records it), except a passing database fault."""
    run_id, chunk_id = claim.run_id, claim.chunk_id
    work = _read_chunk(sessions, claim)
    try:
        config = RunConfig.from_dict(work.config)
    except ConfigError as err:  # e.g. a key from a newer producer: no attempt can do better
        log.error("run %s chunk %s: the run's stored config is unusable: %s", run_id, chunk_id, err)
        return _record_failure(sessions, run_id, chunk_id, f"the run's stored config cannot be used by this worker "
                               f"(upgrade the worker if the run was submitted by a newer lora-compare): {err}",
                               final=True, token=claim.token)

    log.info("run %s chunk %s attempt %s: %d examples x %d variants", run_id, chunk_id, claim.attempt,
             len(work.examples), len(work.variants))
    try:
        with host.exclusive():
            outcome = run_chunk(
                host, config, work.examples, work.variants, skip=work.skip,
                seed=config.generation.seed * 1_000_003 + chunk_id, cached=lambda keys: _lookup(sessions, keys),
            )
    except FatalChunkError as err:
        return _record_failure(sessions, run_id, chunk_id, str(err), final=True, token=claim.token)
    except (ChunkInterrupted, RetryableChunkError, *_TRANSIENT_DB_ERRORS):
        raise
    except Exception as err:  # noqa: BLE001 - any other fault: counted, then retried up to the bound
        log.exception("run %s chunk %s failed", run_id, chunk_id)
        return _count_failure(sessions, claim, f"{type(err).__name__}: {err}", max_attempts)

    rows = [_row(run_id, chunk_id, worker, r) for r in outcome.records]
    try:
        if not _write_outputs(sessions, claim, rows, outcome):
            return Processed.SKIPPED  # taken over meanwhile: nothing written, the new holder finishes it
    except RetryableChunkError:
        raise
    except Exception as err:  # noqa: BLE001 - a write that fails for another reason: counted and retried
        log.exception("run %s chunk %s: writing outputs failed", run_id, chunk_id)
        return _count_failure(sessions, claim, f"writing outputs: {type(err).__name__}: {err}", max_attempts)
    log.info("run %s chunk %s done: %d rows in %.2fs of generation (%s)", run_id, chunk_id, len(outcome.records),
             outcome.generate_seconds, host.load_summary())
    return Processed.DONE


def _count_failure(sessions: sessionmaker[Session], claim: ChunkClaim, error: str, max_attempts: int) -> Processed:
    """A fault another attempt may not repeat: back to the queue, or failed once the attempts are used."""
    final = claim.attempt >= max_attempts
    outcome = _record_failure(sessions, claim.run_id, claim.chunk_id, error, final=final, token=claim.token)
    return outcome if outcome is Processed.SKIPPED or final else Processed.RETRY


def hand_back(sessions: sessionmaker[Session], claim: ChunkClaim, *, worker: str,
              send: Callable[[int, int, str | None], None] | None) -> Processed:
    """Give a chunk whose generation a shutdown stopped back to the queue at once (db.runs.hand_back_chunk:
    `queued`, the attempt not counted), then send its fresh message. HANDED_BACK, even when the database
    or the broker does not answer: then the lease expires and a sweep requeues the chunk (~35-45 s), or
    the sweeps' reconciliation sends the lost message again (db/leases.py)."""
    run_id, chunk_id = claim.run_id, claim.chunk_id
    note = f"handed back by worker {worker} at shutdown (attempt not counted)"
    try:
        with sessions.begin() as session:
            if not hand_back_chunk(session, run_id, chunk_id, claim.token, note):
                return Processed.SKIPPED  # taken over meanwhile: the new holder finishes it
            run = get_run(session, run_id)
            queue = run.queue if run is not None else None
    except _TRANSIENT_DB_ERRORS as err:
        log.warning("run %s chunk %s: could not hand the chunk back (%s); its lease expires and a sweep "
                    "requeues it", run_id, chunk_id, str(err).splitlines()[0])
        return Processed.HANDED_BACK
    log.warning("run %s chunk %s: %s", run_id, chunk_id, note)
    if send is not None:
        try:
            send(run_id, chunk_id, queue)
        except Exception as err:  # noqa: BLE001 - the broker is going away too: reconciliation re-sends it
            log.warning("run %s chunk %s: its message could not be sent (%s); a sweep sends it again once "
                        "the chunk has waited %ss", run_id, chunk_id, str(err).splitlines()[0] if str(err)
                        else type(err).__name__, int(RECONCILE_AFTER_S))
    return Processed.HANDED_BACK


def refuse_chunk(sessions: sessionmaker[Session], run_id: int, chunk_id: int, reason: str, *,
                 worker: str | None = None) -> None:
    """Fail a chunk this worker cannot serve at all (a message from a newer producer), in one attempt
    (recorded `refused` in its history, by `worker`)."""
    _record_failure(sessions, run_id, chunk_id, reason, final=True, refused_by=worker or "?")


class _LeaseLost(Exception):
    """The claim's lease moved on before its outputs committed: the transaction is rolled back."""


def _write_outputs(
    sessions: sessionmaker[Session], claim: ChunkClaim, rows: list[NewGeneration], outcome: ChunkOutcome
) -> bool:
    """Write the chunk's outputs and mark it done, retrying while the database is unreachable.

    False, with nothing written, when the claim's lease has moved on. The rows go in first, unseen until
    the commit; then the lease is checked with the run and the chunk locked until that commit (a lost
    lease rolls the rows back), so a stale writer's rows cannot land after a new claim. Inserting before
    taking the run's lock keeps the lock for the few statements that need it: every claim and every
    completion of the run waits for it, the insert of a thousand rows need not."""
    run_id, chunk_id = claim.run_id, claim.chunk_id
    deadline = time.monotonic() + WRITE_RETRY_BUDGET_S
    delay = 0.5
    while True:
        try:
            with sessions.begin() as session:
                insert_generations(session, rows)
                insert_scores(session, [NewScore(run_id, **score.__dict__) for score in outcome.scores])
                held = hold_lease(session, run_id, chunk_id, claim.token)
                if held is None:
                    raise _LeaseLost
                complete_chunk(session, run_id, chunk_id, generate_seconds=outcome.generate_seconds,
                               device=outcome.device, dtype=outcome.dtype, engine=outcome.engine, held=held)
            return True
        except _LeaseLost:
            return False
        except _TRANSIENT_DB_ERRORS as err:
            if time.monotonic() + delay > deadline:
                raise RetryableChunkError(f"database unreachable while writing outputs: {err}") from err
            log.warning("run %s chunk %s: database unreachable while writing (%s); trying again in %.1fs",
                        run_id, chunk_id, str(err).splitlines()[0], delay)
            time.sleep(delay)
            delay = min(delay * 2, WRITE_RETRY_MAX_DELAY_S)


def _lookup(sessions: sessionmaker[Session], keys: list[str]) -> dict[str, Reusable]:
    """Earlier outputs for these cache keys; none when the database cannot say (then we generate)."""
    try:
        with sessions() as session:
            found = cached_outputs(session, keys)
    except _TRANSIENT_DB_ERRORS as err:
        log.warning("generation cache unavailable (%s); generating everything", str(err).splitlines()[0])
        return {}
    return {key: _reusable(hit) for key, hit in found.items()}


# The two places that know the shapes of db.outputs' records.

def _reusable(hit: CachedOutput) -> Reusable:
    """The planner's view of db.outputs.cached_outputs' record of an earlier output."""
    ids = hit.output_ids
    return Reusable(hit.id, hit.output, hit.output_tokens, hit.finish_reason, None if ids is None else tuple(ids))


def _row(run_id: int, chunk_id: int, worker: str, record: OutputRecord) -> NewGeneration:
    """db.outputs.insert_generations' row for one output record (its fields as they are, from the
    instance's `__dict__`, which holds exactly them: `asdict` deep-copied every row's token ids, a fifth
    of a chunk's write path)."""
    return NewGeneration(run_id=run_id, chunk_id=chunk_id, worker=worker, **record.__dict__)


def _record_failure(sessions: sessionmaker[Session], run_id: int, chunk_id: int, error: str, *, final: bool,
                    token: int | None = None, refused_by: str | None = None) -> Processed:
    """FAILED once recorded; SKIPPED when `token` (the claim's) lost the lease (nothing written)."""
    try:
        with sessions.begin() as session:
            if token is not None and hold_lease(session, run_id, chunk_id, token) is None:
                return Processed.SKIPPED
            fail_chunk(session, run_id, chunk_id, error=error, final=final, refused_by=refused_by)
    except _TRANSIENT_DB_ERRORS as err:
        raise RetryableChunkError(f"database unreachable while recording a failure: {err}") from err
    return Processed.FAILED
