"""One CPU thread instead of several while the cores are taken by other work (issue 16, acceptance 4).

torch's CPU operators split each product over its OpenMP threads, which meet at a barrier at its
end. On a quiet machine the threads arrive together; on a busy one the scheduler deschedules one of
them for a whole time slice, and the others wait for it, spinning GOMP_SPINCOUNT iterations before
they sleep (`worker.threads`), once per operator, hundreds of times per decode step. That is CPU time
spent on nothing: a run at load 10 took 2.2-2.6x the CPU time of the same run on quiet cores
(bench/contention.py). With one thread there is no barrier and nothing to wait for.

`Governor` watches the process's CPU time against the wall time of its decode steps: a process whose
threads get their cores uses about one core-second per wall second per thread; one that is
descheduled gets far less. Over windows of `WINDOW` seconds it drops to one thread when the ratio
falls under `LOW` per thread, and goes back to the threads it started with when, on one thread, it
gets more than `HIGH` of a core (the cores came free). On a quiet machine it never acts. Each decode
call has its own governor and leaves the threads as it found them; a call that starts just after one
that ended on one thread starts on one.

A decode step's products give the same bits on 1 and 2 threads (tests/test_contention.py: the demo
model's linear shapes through oneDNN and MKL; tests/test_attention.py: the attention kernel, one
thread's whole sum per output), and tests/test_decoding.py switches the threads at every step and gets
single-prompt generation's tokens: a switch changes the time, not the answer.

Only on CPU, and only where torch's threads are more than one. `LORA_COMPARE_THREAD_GOVERNOR=0` turns
it off (the thread count then stays as torch has it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

log = logging.getLogger(__name__)

ENV = "LORA_COMPARE_THREAD_GOVERNOR"
#: Seconds of decode steps a decision looks at.
WINDOW = 2.0
#: Below this share of a core per thread (CPU seconds per wall second / threads): the cores are taken.
LOW = 0.6
#: On one thread, above this share of a core: the cores are free again.
HIGH = 0.85
#: A call that starts within this many seconds of a call that ended on one thread starts on one (the
#: cores were taken a moment ago: a chunk's calls follow each other closely).
REMEMBER = 10.0

#: (time.perf_counter() when the last governed call ended, whether it ended on one thread).
_last_end: tuple[float, bool] | None = None


class Governor:
    """Call `step()` once per decode step (cheap: two clock reads); `close()` restores the threads."""

    def __init__(self, enabled: bool = True) -> None:
        self.threads = torch.get_num_threads()
        self.enabled = enabled and self.threads > 1 and os.environ.get(ENV, "1") != "0"
        self.switches = 0
        if self.enabled and _last_end is not None and _last_end[1] and time.perf_counter() - _last_end[0] < REMEMBER:
            torch.set_num_threads(1)  # as the last call ended, a moment ago
        self._start()

    def _start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def step(self) -> None:
        if not self.enabled:
            return
        wall = time.perf_counter() - self._wall
        if wall < WINDOW:
            return
        share = (time.process_time() - self._cpu) / wall  # cores' worth of CPU this process used
        now = torch.get_num_threads()
        if now > 1 and share < LOW * now:
            self._set(1, share)
        elif now == 1 and share > HIGH:
            self._set(self.threads, share)
        self._start()

    def _set(self, threads: int, share: float) -> None:
        log.info("decode: %s (%.2f cores used over the last %.0f s): %d CPU thread(s)",
                 "cores taken by other work" if threads == 1 else "cores free again", share, WINDOW, threads)
        torch.set_num_threads(threads)
        self.switches += 1

    def close(self) -> None:
        global _last_end
        if self.enabled:
            _last_end = (time.perf_counter(), torch.get_num_threads() == 1)
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)


#: The governor of the decode call under way; None: none (not on CPU, switched off, one thread).
_CURRENT: ContextVar[Governor | None] = ContextVar("thread_governor", default=None)


@contextmanager
def governed(on: bool) -> Iterator[Governor]:
    """Within the block, `step()` feeds a `Governor` (`on`: on CPU and not switched off); the threads
    are what they were before it on the way out."""
    governor = Governor(on)
    token = _CURRENT.set(governor if governor.enabled else None)
    try:
        yield governor
    finally:
        _CURRENT.reset(token)
        governor.close()


def step() -> None:
    """One decode step done (the decode loop calls it at each step's sync)."""
    governor = _CURRENT.get()
    if governor is not None:
        governor.step()
