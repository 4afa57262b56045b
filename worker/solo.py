"""The worker's Celery pool: Celery's solo pool (one process, the task in the main thread: CUDA is not
fork-safe), with a cold shutdown that stops the chunk instead of raising into it. Its own module so
that Celery's banner still says `(solo)`."""

from __future__ import annotations

from celery.concurrency.solo import TaskPool as SoloTaskPool

from .tasks import request_stop


class SoloPool(SoloTaskPool):
    """Celery's solo pool: the task runs in the worker's main thread, which also receives the signals.

    A cold shutdown (SIGQUIT, or a second Ctrl-C) cancels the running task with `terminate_job`,
    which the solo pool does not implement: its NotImplementedError was raised from inside the signal
    handler into the chunk, and recorded as the chunk's error with an attempt used. Here it asks the
    chunk to stop at its next decode step instead, and the chunk is handed back (`worker.chunk`)."""

    def terminate_job(self, pid: object, signal: object = None) -> None:
        request_stop()
