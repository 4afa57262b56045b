"""The queue contract shared by producer and worker: task name, message shape and Celery settings.

Messages are JSON `{"run_id": int, "chunk_id": int, "version": int}` (keyword arguments of the task),
sent by name, so the producer never imports the worker. A message without `version` is version 1; a
worker that meets a newer version fails the chunk and says to upgrade.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: The registered name of the chunk task.
TASK_NAME = "lora_compare.run_chunk"
#: The version of the message's shape; bump it when a field is added or changes meaning.
MESSAGE_VERSION = 1
#: The queue chunks go to unless a run names another.
DEFAULT_QUEUE = "lora-compare"
#: Seconds Redis waits for an unacknowledged message before redelivering it. Must exceed the
#: slowest chunk: a worker holds its message until the chunk's outputs are written (late acks).
DEFAULT_VISIBILITY_TIMEOUT_S = 3600
#: Seconds between a worker's scans for messages whose worker died (redelivered after the visibility timeout).
UNACKED_RESTORE_INTERVAL_S = 5
#: How many times a chunk may be started before it is failed (crashes included).
DEFAULT_MAX_ATTEMPTS = 3


def celery_settings(*, visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S) -> dict[str, Any]:
    """Celery configuration for both sides (DESIGN.md: JSON only, late acks, prefetch 1)."""
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,  # results live in SQL, not in a result backend
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": DEFAULT_QUEUE,
        # A message whose worker died comes back `visibility_timeout` after delivery; the consumers
        # scan for such messages every `unacked_restore_interval` seconds (a cheap ZRANGE; kombu's
        # default scans only every 100 s).
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": UNACKED_RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_track_started": False,
    }


def chunk_message(run_id: int, chunk_id: int) -> dict[str, int]:
    """The keyword arguments of one chunk's task."""
    return {"run_id": run_id, "chunk_id": chunk_id, "version": MESSAGE_VERSION}


def enqueue_chunks(app: Any, run_id: int, chunk_ids: Iterable[int], *, queue: str = DEFAULT_QUEUE) -> int:
    """Send one message per chunk, by task name. Returns how many were sent."""
    sent = 0
    for chunk_id in chunk_ids:
        app.send_task(TASK_NAME, kwargs=chunk_message(run_id, chunk_id), queue=queue)
        sent += 1
    return sent


def make_client(broker_url: str) -> Any:
    """A Celery app that only sends (no tasks registered, no worker code imported)."""
    from celery import Celery

    app = Celery("lora-compare-producer", broker=broker_url, set_as_current=False)
    app.conf.update(celery_settings())
    return app
