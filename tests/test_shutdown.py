"""A worker asked to stop hands its chunk back: the engine's stop check, the hand-back's SQL on SQLite
and PostgreSQL, `process_chunk`'s path, and the solo pool's cold-shutdown cancel. Fast, no real model;
the real worker processes (SIGTERM, SIGQUIT mid-chunk) are in test_graceful_stop.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from contract.config import GenerationConfig
from contract.errors import ChunkInterrupted
from contract.settings import Settings
from db.enums import EMBEDDED_QUEUE
from db.runs import cancel_run, complete_chunk, hand_back_chunk
from db.schema import Chunk, ChunkAttempt, Run
from tests.fake_generator import FakeGenerator
from tests.test_chunk import _fake_run
from tests.test_leases import _chunk, _claim, _setup
from worker.chunk import Processed, process_chunk
from worker.engine.call import DecodeOptions
from worker.engine.plain import generate_plain
from worker.engine.request import DecodeRequest
from worker.engine.scheduler import decode_rows
from worker.model_host import StopFlag
from worker.runner import run_embedded

CPU = torch.device("cpu")
NEW_TOKENS = 10


class StopAfter:
    """A stop callback that turns true on its `n`-th call and counts the calls."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.fixture(scope="module")
def tiny() -> Any:
    """A tiny random Llama that never emits its EOS (none is set): every row runs NEW_TOKENS steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=None, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 10], [11, 12]]


def _request(stop: Any = None) -> DecodeRequest:
    return DecodeRequest(GenerationConfig(max_new_tokens=NEW_TOKENS), set(), 0, CPU, stop=stop)


def test_the_decode_loop_stops_at_the_step_the_flag_is_set(tiny: Any) -> None:
    unchanged = decode_rows(tiny, PROMPTS, _request(), options=DecodeOptions(capacity=4))
    assert [len(r) for r in unchanged] == [NEW_TOKENS] * 3
    never = StopAfter(10**9)
    assert decode_rows(tiny, PROMPTS, _request(never), options=DecodeOptions(capacity=4)) == unchanged
    assert never.calls == NEW_TOKENS  # asked once per step, no more
    stop = StopAfter(4)
    with pytest.raises(ChunkInterrupted):
        decode_rows(tiny, PROMPTS, _request(stop), options=DecodeOptions(capacity=4))
    assert stop.calls == 4  # it stopped at the fourth step, not at the end


def test_the_plain_path_stops_too(tiny: Any) -> None:
    stop = StopAfter(3)
    with pytest.raises(ChunkInterrupted):
        generate_plain(tiny, PROMPTS, _request(stop), None)
    assert stop.calls <= 4  # within transformers' generate, at its third step (then once more, after it)
    assert generate_plain(tiny, PROMPTS[:1], _request(StopAfter(10**9)), None) == \
        generate_plain(tiny, PROMPTS[:1], _request(), None)


def _row(sessions: sessionmaker[Session], run_id: int, chunk_id: int) -> tuple[Any, ...]:
    chunk = _chunk(sessions, run_id, chunk_id)
    return chunk.status, chunk.attempts, chunk.lease_expires_at, chunk.error


def test_a_handed_back_chunk_is_queued_uncounted_under_its_token_only(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    claim = _claim(sessions, run_id, 0, "w1")
    assert claim.attempt == 1
    with sessions.begin() as session:
        assert hand_back_chunk(session, run_id, 0, claim.token, "handed back by worker w1 at shutdown")
    status, attempts, lease, error = _row(sessions, run_id, 0)
    assert (status, attempts, lease, error) == ("queued", 0, None, "handed back by worker w1 at shutdown")
    with sessions.begin() as session:  # a second hand-back, or any write, of that claim: refused
        assert not hand_back_chunk(session, run_id, 0, claim.token, "again")
        assert not complete_chunk(session, run_id, 0, generate_seconds=1.0, token=claim.token)
    again = _claim(sessions, run_id, 0, "w2")
    assert again.attempt == 1 and again.token > claim.token + 1  # the hand-back moved the token on too
    with sessions() as session:
        run = session.scalar(select(Run).where(Run.id == run_id))
        assert run is not None and run.status == "running"
    # A chunk another claim took over meanwhile is not the stale holder's to hand back.
    with sessions.begin() as session:
        assert not hand_back_chunk(session, run_id, 0, claim.token, "stale")
    assert _row(sessions, run_id, 0)[:2] == ("running", 1)
    with sessions() as session:  # the history: the handed-back attempt, then the running one
        history = session.execute(select(ChunkAttempt.n, ChunkAttempt.worker, ChunkAttempt.outcome).where(
            ChunkAttempt.run_id == run_id, ChunkAttempt.chunk_id == 0).order_by(ChunkAttempt.n)).all()
    assert [tuple(h) for h in history] == [(1, "w1", "handed_back"), (2, "w2", "running")]
    engine.dispose()


def test_a_chunk_handed_back_after_its_run_was_cancelled_is_cancelled_not_queued(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    claim = _claim(sessions, run_id, 0, "w1")
    with sessions.begin() as session:
        assert cancel_run(session, run_id) == 1  # chunk 1, queued; chunk 0 runs on
        assert hand_back_chunk(session, run_id, 0, claim.token, "handed back")
    assert _row(sessions, run_id, 0)[:2] == ("cancelled", 0)
    engine.dispose()


def test_a_chunk_interrupted_mid_generation_is_handed_back_and_its_message_sent(any_db_url: str) -> None:
    engine, sessions, run_id = _fake_run(any_db_url)
    sent: list[tuple[int, int, str | None]] = []
    outcome = process_chunk(sessions, FakeGenerator(fail=ChunkInterrupted("stopping")), run_id, 0, worker="w1",
                            max_attempts=1, send=lambda *args: sent.append(args))
    assert outcome is Processed.HANDED_BACK and sent == [(run_id, 0, None)]
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None and (chunk.status, chunk.attempts) == ("queued", 0)
        assert chunk.error == "handed back by worker w1 at shutdown (attempt not counted)"
    # max_attempts=1: the handed-back attempt did not use it up; the next one completes the chunk.
    assert process_chunk(sessions, FakeGenerator(), run_id, 0, worker="w2", max_attempts=1) is Processed.DONE
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None and (chunk.status, chunk.attempts, chunk.error) == ("done", 1, None)
    engine.dispose()


def test_a_hand_back_whose_message_cannot_be_sent_still_leaves_the_chunk_queued(sqlite_url: str) -> None:
    """The broker is going away too: the sweeps' reconciliation sends the message again later."""
    engine, sessions, run_id = _fake_run(sqlite_url)

    def broker_gone(*_: Any) -> None:
        raise ConnectionError("broker unreachable")

    assert process_chunk(sessions, FakeGenerator(fail=ChunkInterrupted("stopping")), run_id, 0, worker="w1",
                         max_attempts=3, send=broker_gone) is Processed.HANDED_BACK
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None and (chunk.status, chunk.attempts) == ("queued", 0) and chunk.queued_at
    engine.dispose()


def test_the_solo_pools_cold_shutdown_cancel_asks_the_chunk_to_stop_instead_of_raising() -> None:
    """Celery's solo pool raised NotImplementedError from its SIGQUIT handler into the running chunk."""
    from worker import tasks
    from worker.model_host import ModelHost
    from worker.solo import SoloPool

    host = ModelHost(Settings.from_env(), device="cpu")
    saved = tasks._context
    tasks.configure(tasks.WorkerContext(sessions=None, host=host, name="w"))  # type: ignore[arg-type]
    try:
        assert not host.stopping.is_set()
        SoloPool(limit=1).terminate_job(1234, "SIGTERM")
        assert host.stopping.is_set()
    finally:
        tasks._context = saved


@dataclass
class _StoppableFake(FakeGenerator):
    """Generates until the host is asked to stop, then stops as the engine does."""

    stopping: StopFlag = field(default_factory=StopFlag)
    started: threading.Event = field(default_factory=threading.Event)

    def generate(self, rows: Any, gen: Any, inference: Any, **kwargs: Any) -> Any:
        self.started.set()
        deadline = time.monotonic() + 30
        while not self.stopping.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ChunkInterrupted("the worker is shutting down: generation stopped")


def test_ctrl_c_in_embedded_mode_hands_the_chunk_back(sqlite_url: str) -> None:
    engine, sessions, run_id = _fake_run(sqlite_url)
    with sessions.begin() as session:
        session.execute(update(Run).where(Run.id == run_id).values(queue=EMBEDDED_QUEUE))
    host = _StoppableFake()

    def ctrl_c(_: Any) -> None:
        if host.started.wait(30):
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_embedded(sessions, Settings.from_env(), run_id, host=host, on_progress=ctrl_c)  # type: ignore[arg-type]
    assert time.monotonic() - started < 10
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None and (chunk.status, chunk.attempts) == ("queued", 0)
        assert chunk.error is not None and "at shutdown" in chunk.error
    engine.dispose()
