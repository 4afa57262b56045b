"""Waiting in tests for something to happen: poll a condition until it holds, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.2) -> None:
    """Return as soon as `predicate()` is true; AssertionError naming `what` if it is still false after
    `timeout` seconds (it is asked once more at the deadline, so a slow last poll is not lost)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(interval, left))
