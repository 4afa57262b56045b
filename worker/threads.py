"""How torch's CPU threads wait: set before torch is imported (libgomp reads it when it loads).

torch's CPU kernels run on OpenMP threads (libgomp). A thread that finishes its share of an operator
first waits at the barrier by spinning GOMP_SPINCOUNT iterations before it sleeps; libgomp's default
is 300,000 (about a millisecond here). On a quiet machine the wait is short and spinning makes it
fast; on a busy one the other thread is often descheduled, and the spinning is CPU time spent on
nothing, once per operator, thousands of times per decode step: a run's CPU time grew 3-4x at load 10
(bench/contention.py). A short spin keeps the quiet speed and bounds the waste. A user's own
GOMP_SPINCOUNT or OMP_WAIT_POLICY wins. Under a heavy load the decode loop also drops to one thread
(`worker.engine.contention`), where no thread waits for another at all.
"""

from __future__ import annotations

import os

#: Iterations a waiting OpenMP thread spins before it sleeps (bench/contention.py chose it).
SPINCOUNT = "10000"


def apply(environ: dict[str, str] | None = None) -> None:
    """Set the worker's OpenMP wait policy unless the user set one."""
    env = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = SPINCOUNT
