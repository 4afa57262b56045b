"""The chunk task: a thin shell over `worker.chunk.process_chunk`.

The worker's resources (session factory, model host) are built once per process by `configure`
(at worker start, after any fork) and read back by every task. `request_stop` asks the chunk in
progress to stop at its next decode step and hand itself back (the worker is shutting down).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import RetryableChunkError
from contract.queue import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, MESSAGE_VERSION, TASK_NAME, enqueue_chunks
from db.enums import EMBEDDED_QUEUE

from .chunk import Processed, process_chunk, refuse_chunk
from .planner import ChunkGenerator

log = logging.getLogger(__name__)

#: Seconds before a chunk is tried again after a passing fault (database or model error).
RETRY_DELAY_S = 5


@dataclass
class WorkerContext:
    sessions: sessionmaker[Session]
    host: ChunkGenerator  # the resident model (`worker.model_host.ModelHost`)
    name: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


_context: WorkerContext | None = None


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def configure(context: WorkerContext) -> None:
    """Install this process's worker resources (call before the worker consumes anything)."""
    global _context
    _context = context


def request_stop() -> None:
    """The worker is shutting down: the chunk in progress stops at its next decode step and is handed
    back (`worker.chunk.hand_back`). Safe in a signal handler: it only sets a flag."""
    if _context is not None:
        _context.host.stopping.set()


def current_context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("the worker is not configured: call worker.tasks.configure() at start")
    return _context


def run_chunk_task(self: Task, *args: Any, **kwargs: Any) -> str:
    """Process chunk `chunk_id` of run `run_id` (ids only; everything else is in SQL).

    Any other message shape is logged and dropped (acknowledged, so never redelivered). Returns the
    `Processed` value (a plain string, for Celery's result).
    """
    run_id, chunk_id = kwargs.pop("run_id", None), kwargs.pop("chunk_id", None)
    version = kwargs.pop("version", 1)
    if args or kwargs or not _is_id(run_id) or not _is_id(chunk_id) or not _is_id(version):
        log.error("rejected a malformed chunk message: args=%r run_id=%r chunk_id=%r version=%r extra=%r",
                  args[:4], run_id, chunk_id, version, sorted(kwargs)[:8])
        return Processed.REJECTED.value
    ctx = current_context()
    if version > MESSAGE_VERSION:
        reason = (f"the chunk's queue message has version {version}, newer than this worker reads "
                  f"({MESSAGE_VERSION}): upgrade lora-compare on the workers")
        log.error("run %s chunk %s: %s", run_id, chunk_id, reason)
        refuse_chunk(ctx.sessions, run_id, chunk_id, reason, worker=ctx.name)
        return Processed.FAILED.value
    if ctx.host.stopping.is_set():  # a message delivered while the worker shuts down: left to another worker
        raise Reject("the worker is shutting down", requeue=True)
    try:
        outcome = process_chunk(
            ctx.sessions, ctx.host, run_id, chunk_id, worker=ctx.name, max_attempts=ctx.max_attempts,
            send=lambda run, chunk, queue: _send_again(self.app, run, chunk, queue),
        )
    except RetryableChunkError as err:
        log.warning("run %s chunk %s: %s; retrying in %ss", run_id, chunk_id, err, RETRY_DELAY_S)
        raise self.retry(exc=err, countdown=RETRY_DELAY_S, max_retries=None) from err
    if outcome is Processed.RETRY:
        raise self.retry(countdown=RETRY_DELAY_S, max_retries=None)
    return outcome.value


def _send_again(app: Celery, run_id: int, chunk_id: int, queue: str | None) -> None:
    """A handed-back chunk's fresh message, on its run's queue. Not for a run generated in-process
    (embedded mode): `lora-compare retry RUN --here` resumes it from SQL."""
    if queue != EMBEDDED_QUEUE:
        enqueue_chunks(app, run_id, [chunk_id], queue=queue or DEFAULT_QUEUE)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def register_tasks(app: Celery) -> None:
    app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)(run_chunk_task)
