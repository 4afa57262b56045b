"""The queue contract shared by producer and worker: task name, message shape and Celery settings.

Messages are JSON `{"run_id": int, "chunk_id": int, "version": int}` (keyword arguments of the task),
sent by name, so the producer never imports the worker. A message without `version` is version 1; a
worker that meets a newer version fails the chunk and says to upgrade.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import BrokerUnavailableError

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
#: Seconds to open a TCP connection to the broker (kombu's connect timeout and Redis's
#: `socket_connect_timeout`): a closed or unreachable host fails within it.
BROKER_CONNECT_TIMEOUT_S = 3.0
#: Seconds any one Redis command waits for its reply (`socket_timeout`): a broker that accepts the
#: connection and never answers fails within it instead of hanging (longer than the 1 s BRPOP poll).
BROKER_SOCKET_TIMEOUT_S = 5.0
#: How a publish retries a lost connection: once more, at once. With the timeouts above, a send to a
#: dead broker fails within about 10 s, never retries for ever.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 1, "interval_max": 1}


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
            "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
        },
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT_S,
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_track_started": False,
    }


def chunk_message(run_id: int, chunk_id: int) -> dict[str, int]:
    """The keyword arguments of one chunk's task."""
    return {"run_id": run_id, "chunk_id": chunk_id, "version": MESSAGE_VERSION}


def enqueue_chunks(app: Any, run_id: int, chunk_ids: Iterable[int], *, queue: str = DEFAULT_QUEUE) -> int:
    """Send one message per chunk, by task name, on one connection. Returns how many were sent.

    Raises BrokerUnavailableError (one line naming the broker) when the broker cannot be reached or
    does not answer within the timeouts above; some messages may have been sent by then.
    """
    sent = 0
    with _broker_errors(app), app.producer_or_acquire() as producer:
        for chunk_id in chunk_ids:
            app.send_task(TASK_NAME, kwargs=chunk_message(run_id, chunk_id), queue=queue, producer=producer,
                          retry=True, retry_policy=PUBLISH_RETRY_POLICY)
            sent += 1
    return sent


def check_broker(app: Any) -> None:
    """Connect to the broker and have it answer (Redis: PING), within the timeouts above; raises
    BrokerUnavailableError otherwise. A producer calls it before recording anything."""
    with _broker_errors(app), app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=1, interval_max=1,
                               timeout=BROKER_CONNECT_TIMEOUT_S)
        conn.default_channel  # noqa: B018 - opening the channel makes Redis answer a PING


def queue_depth(app: Any, queue: str) -> int | None:
    """How many messages wait on `queue` (Redis: LLEN of its list and of its priority sub-lists, the
    keys kombu's Redis transport uses); None for a broker of another kind. Raises
    BrokerUnavailableError when the broker does not answer. Messages delivered but not acknowledged
    (kombu's `unacked` hash) are not counted."""
    with _broker_errors(app), app.pool.acquire(block=True, timeout=BROKER_SOCKET_TIMEOUT_S) as conn:
        if conn.transport.driver_type != "redis":
            return None
        channel = conn.default_channel
        keys = {queue if not pri else f"{queue}{channel.sep}{pri}" for pri in channel.priority_steps}
        with channel.conn_or_acquire() as client, client.pipeline() as pipe:
            for key in sorted(keys):
                pipe.llen(key)
            return sum(int(size) for size in pipe.execute())


def broker_label(url: str) -> str:
    """The broker URL without its password."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url, mask="***"))


@contextmanager
def _broker_errors(app: Any) -> Iterator[None]:
    """Turn a connection failure of kombu or redis into one BrokerUnavailableError line."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    try:
        yield
    except (KombuOperationalError, OSError, TimeoutError) as err:
        raise BrokerUnavailableError(_unavailable(app, err)) from None
    except Exception as err:
        if type(err).__module__.startswith("redis"):  # redis.exceptions.ConnectionError and TimeoutError
            raise BrokerUnavailableError(_unavailable(app, err)) from None
        raise


def _unavailable(app: Any, err: BaseException) -> str:
    reason = " ".join(str(err).split()) or type(err).__name__
    return (f"broker {broker_label(app.conf.broker_url)} is unreachable or not answering ({reason}); check that "
            "Redis is running there and that --broker-url / LORA_COMPARE_BROKER_URL points to it")


def make_client(broker_url: str) -> Any:
    """A Celery app that only sends (no tasks registered, no worker code imported)."""
    from celery import Celery

    app = Celery("lora-compare-producer", broker=broker_url, set_as_current=False)
    app.conf.update(celery_settings())
    return app
