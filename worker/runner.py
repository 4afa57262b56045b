"""How a worker runs: in this process for embedded mode, or as a long-lived Celery worker service."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun, worker_shutting_down
from sqlalchemy.orm import Session, sessionmaker

from contract.queue import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    TASK_NAME,
    enqueue_chunks,
    make_client,
)
from contract.settings import DEFAULT_MAX_ADAPTERS, Settings
from db.enums import FINAL_RUN_STATUSES, ChunkStatus
from db.progress import RunProgress, run_progress
from db.runs import chunk_ids

from .app import create_app
from .lease import Sweeper
from .solo import SoloPool
from .tasks import WorkerContext, configure, default_worker_name, request_stop

if TYPE_CHECKING:
    from .model_host import ModelHost

log = logging.getLogger(__name__)

#: Seconds between progress polls in embedded mode (the end of a chunk also ends the wait).
POLL_S = 0.5
#: Seconds between polls of the in-memory queue by the embedded worker.
MEMORY_POLL_S = 0.01
#: The no-op task that wakes the embedded worker's consumer loop when the run is over.
WAKE_TASK = "lora_compare.wake"


def _shutting_down(sender: object = None, **_: object) -> None:
    """Celery's `worker_shutting_down`, sent from its SIGTERM, SIGINT and SIGQUIT handlers: the chunk in
    progress stops at its next decode step and is handed back, so the worker exits in seconds."""
    request_stop()


def load_host(settings: Settings, *, device: str | None, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> ModelHost:
    """The worker's model host. Imported here, not at the top: the model libraries load only when a
    worker starts, so the task, the queue and SQL code import without them."""
    from .model_host import ModelHost

    return ModelHost(settings, device=device, max_adapters=max_adapters)


def run_embedded(
    sessions: sessionmaker[Session],
    settings: Settings,
    run_id: int,
    *,
    device: str | None = None,
    on_progress: Callable[[RunProgress], None] | None = None,
    host: ModelHost | None = None,
) -> RunProgress:
    """Run every queued chunk of `run_id` through the real Celery task, on an in-process worker
    over Celery's in-memory transport; returns the final progress."""
    host = host or load_host(settings, device=device)
    app = create_app("memory://localhost/")
    # kombu's in-memory queue is polled (1 s by default): poll it often, it is only a deque.
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "polling_interval": MEMORY_POLL_S}
    app.task(name=WAKE_TASK)(_wake)
    host.stopping.clear()
    configure(WorkerContext(sessions=sessions, host=host, name=f"embedded:{default_worker_name()}"))
    finished = threading.Event()

    def chunk_ended(sender: object = None, **_: object) -> None:
        if getattr(sender, "name", None) == TASK_NAME:
            finished.set()

    task_postrun.connect(chunk_ended, weak=False)
    try:
        with start_worker(app, pool=SoloPool, concurrency=1, perform_ping_check=False, shutdown_timeout=600,
                          loglevel="WARNING", queues=[DEFAULT_QUEUE]):
            with sessions.begin() as session:
                queued = chunk_ids(session, run_id, [ChunkStatus.QUEUED])
            enqueue_chunks(app, run_id, queued)
            try:
                while True:
                    with sessions() as session:
                        progress = run_progress(session, run_id)
                    assert progress is not None
                    if on_progress is not None:
                        on_progress(progress)
                    if progress.status in FINAL_RUN_STATUSES:
                        return progress
                    finished.wait(POLL_S)  # a chunk's end wakes us at once
                    finished.clear()
            except KeyboardInterrupt:  # Ctrl-C: the chunk in progress is handed back at its next step
                host.stopping.set()
                raise
            finally:
                _stop_soon(app)
    finally:
        task_postrun.disconnect(chunk_ended)


def _wake() -> None:
    """Does nothing: its message makes the worker's consumer loop turn, so that it sees the stop."""


def _stop_soon(app: Celery) -> None:
    """Ask the in-process worker to stop, and wake its consumer loop so that leaving `start_worker`
    does not wait for it. The loop waits up to 2 s for a message before it looks at the stop flag,
    and waits once more after seeing it (Celery's synloop runs a cycle in a `finally`): two wakes."""
    from celery.worker import state

    state.should_terminate = 0
    for _ in range(2):
        app.send_task(WAKE_TASK, queue=DEFAULT_QUEUE)


def _freeze_startup_objects() -> None:
    """Leave what the worker built to start (modules, the app, the host) out of the garbage collector's
    full passes. A chunk creates thousands of objects that live as long as it does (its rows and their
    records), so they reach the oldest generation and full passes follow every few chunks; each one
    walked every object of the process (a few milliseconds a chunk on average, of 30-80 ms of CPU in
    a simulated worker). The frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def serve(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    device: str | None,
    queues: Sequence[str],
    max_adapters: int = DEFAULT_MAX_ADAPTERS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S,
    hostname: str | None = None,
    loglevel: str = "INFO",
) -> None:
    """A long-lived worker: one process, solo pool (CUDA is not fork-safe), the model resident.

    Beside it, a sweeper thread requeues chunks whose worker died (their lease expired: db/leases.py).
    On SIGTERM, SIGINT or SIGQUIT the chunk in progress stops at its next decode step and is handed
    back to the queue, uncounted, and the worker exits (warm shutdown: exit code 0; cold: 1)."""
    from celery.utils.nodenames import default_nodename, host_format

    nodename = host_format(default_nodename(hostname))
    host = load_host(settings, device=device, max_adapters=max_adapters)
    configure(WorkerContext(sessions=sessions, host=host, name=nodename, max_attempts=max_attempts))
    app = create_app(settings.broker_url, visibility_timeout_s=visibility_timeout_s)
    log.info("worker %s on %s, queues %s", nodename, host.device, ",".join(queues))
    worker = app.Worker(pool=SoloPool, concurrency=1, queues=list(queues), hostname=nodename, loglevel=loglevel,
                        without_gossip=True, without_mingle=True)
    sweeper = Sweeper(sessions, make_client(settings.broker_url)).start()
    worker_shutting_down.connect(_shutting_down, weak=False)
    _freeze_startup_objects()
    try:
        worker.start()
    finally:
        worker_shutting_down.disconnect(_shutting_down)
        sweeper.stop()
