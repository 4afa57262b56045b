"""The worker's side of chunk leases (db/leases.py): the heartbeat of a claimed chunk, and the sweep
that requeues chunks whose worker died, without waiting for the broker's visibility timeout, and
sends again the messages of `queued` chunks that a broker lost (its queue is empty, they wait).

Both are daemon threads with short sessions of their own; neither ever raises into the worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from contract.queue import DEFAULT_QUEUE, enqueue_chunks, queue_depth
from db.leases import (
    HEARTBEAT_S,
    LEASE_GRACE_S,
    RECONCILE_AFTER_S,
    SWEEP_S,
    Expired,
    Stale,
    bump_queued,
    expire_leases,
    renew_lease,
    stale_queued,
    stale_queues,
)

log = logging.getLogger(__name__)


class Heartbeat:
    """While in its `with` block, renews a claim's lease every `interval_s`; `lost` once it is not ours."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, chunk_id: int, token: int, *,
                 interval_s: float = HEARTBEAT_S) -> None:
        self.sessions, self.run_id, self.chunk_id, self.token = sessions, run_id, chunk_id, token
        self.interval_s = interval_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}-{chunk_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.sessions.begin() as session:
                    held = renew_lease(session, self.run_id, self.chunk_id, self.token)
            except Exception as err:  # noqa: BLE001 - a passing database fault: the next beat tries again
                log.warning("run %s chunk %s: lease renewal failed (%s)", self.run_id, self.chunk_id,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                continue
            if not held:
                log.warning("run %s chunk %s: lease token %s was taken over; this worker's writes will be "
                            "refused", self.run_id, self.chunk_id, self.token)
                self.lost.set()
                return


def sweep_once(sessions: sessionmaker[Session], send: Callable[[Expired], None], *,
               grace_s: float = LEASE_GRACE_S) -> list[Expired]:
    """Requeue the chunks whose lease expired and send each a fresh message; returns them.

    The messages are sent before the requeue commits: if a send fails, nothing is requeued (the next
    sweep tries again); if the commit fails after a send, the message's claim takes the expired
    lease over itself. So a requeued chunk never lacks a message.
    """
    with sessions.begin() as session:
        expired = expire_leases(session, grace_s=grace_s)
        for item in expired:
            send(item)
    return expired


def reconcile_once(sessions: sessionmaker[Session], depth: Callable[[str], int | None],
                   send: Callable[[Stale], None], *, after_s: float = RECONCILE_AFTER_S) -> list[Stale]:
    """Send again the message of each chunk `queued` for over `after_s` whose run's queue is empty
    (`depth` of it is 0; None: the broker cannot tell, nothing is sent); returns them.

    Each one's `queued_at` is bumped, guarded so that of two sweepers one sends it, and the message
    goes out before that commits (a failed send leaves it stale for the next sweep).
    """
    with sessions.begin() as session:  # which queues first (a row each): their chunks are read only if empty
        queues = stale_queues(session, older_than_s=after_s)
    if not queues:
        return []
    empty = {q for q in {queue or DEFAULT_QUEUE for queue in queues} if depth(q) == 0}
    if not empty:
        return []  # the usual case while a run's chunks wait their turn: nothing read, nothing sent
    sent: list[Stale] = []
    with sessions.begin() as session:
        stale = stale_queued(session, older_than_s=after_s,
                             queues={queue for queue in queues if (queue or DEFAULT_QUEUE) in empty})
        for item in stale:
            if bump_queued(session, item, older_than_s=after_s):
                send(item)
                sent.append(item)
    return sent


class Sweeper:
    """A worker's daemon thread: `sweep_once` every `interval_s`, sending through a broker client."""

    def __init__(self, sessions: sessionmaker[Session], client: Any, *, interval_s: float = SWEEP_S) -> None:
        self.sessions, self.client, self.interval_s = sessions, client, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-sweeper", daemon=True)
        self._blind = False  # the broker cannot count a queue's messages: no reconciliation

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _send(self, item: Expired) -> None:
        enqueue_chunks(self.client, item.run_id, [item.chunk_id], queue=item.queue or DEFAULT_QUEUE)
        log.warning("run %s chunk %s: lease of %s expired; requeued on '%s'", item.run_id, item.chunk_id,
                    item.worker, item.queue or DEFAULT_QUEUE)

    def _depth(self, queue: str) -> int | None:
        depth = queue_depth(self.client, queue)
        if depth is None and not self._blind:
            self._blind = True
            log.warning("the broker is not Redis: queued chunks whose messages it lost are not sent again "
                        "(lora-compare retry RUN does it)")
        return depth

    def _resend(self, item: Stale) -> None:
        queue = item.queue or DEFAULT_QUEUE
        enqueue_chunks(self.client, item.run_id, [item.chunk_id], queue=queue)
        log.warning("run %s chunk %s: queued for over %ss while queue '%s' is empty (its message was lost); "
                    "sent again", item.run_id, item.chunk_id, int(RECONCILE_AFTER_S), queue)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, step in (("lease sweep", lambda: sweep_once(self.sessions, self._send)),
                               ("queue reconciliation", lambda: reconcile_once(
                                   self.sessions, self._depth, self._resend))):
                try:
                    step()
                except Exception as err:  # noqa: BLE001 - database or broker down: the next sweep tries again
                    log.warning("%s failed (%s)", name,
                                str(err).splitlines()[0] if str(err) else type(err).__name__)
