"""The embedded worker (Celery over the in-memory transport) picks chunks up and stops promptly:
kombu polls an in-memory queue once a second by default, and Celery's consumer loop waits up to
2 s for a message, twice, before it notices a stop, which was 3 s added to every `run`."""

from __future__ import annotations

import time

from celery.contrib.testing.worker import start_worker

from contract.queue import DEFAULT_QUEUE
from worker.app import create_app
from worker.runner import MEMORY_POLL_S, WAKE_TASK, _stop_soon, _wake


def test_the_embedded_worker_stops_without_waiting_for_its_poll_timeout() -> None:
    app = create_app("memory://localhost/")
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "polling_interval": MEMORY_POLL_S}
    app.task(name=WAKE_TASK)(_wake)
    with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=30,
                      loglevel="WARNING", queues=[DEFAULT_QUEUE]):
        time.sleep(0.3)  # the consumer is now inside its 2 s wait for a message
        started = time.monotonic()
        _stop_soon(app)
    assert time.monotonic() - started < 1.0  # 2 to 3 s without the wake messages
