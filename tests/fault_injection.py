"""Test-only fault injection, loaded into a worker process by the crash tests; no production module
knows of it.

`tests.cluster.Worker` starts every worker as `python -c "import tests.fault_injection; ..."`. With
`LORA_COMPARE_FAULT_CRASH_MARKER` set in its environment, that worker kills itself (SIGKILL, as the
out-of-memory killer would) on a chunk one of whose prompts contains the marker, after it has claimed
the chunk and before generating it. With `LORA_COMPARE_FAULT_HOLD_FILE` set, a worker that has
generated a chunk holds its rows, before writing them, for as long as that file exists (the silent-cut
test cuts the database meanwhile). With `LORA_COMPARE_FAULT_SLOW_STEP_S` set, every decode step takes
that many seconds longer (a slow model: the graceful-stop tests make a chunk last minutes). Without
any of them, importing this module changes nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

MARKER_ENV = "LORA_COMPARE_FAULT_CRASH_MARKER"
HOLD_ENV = "LORA_COMPARE_FAULT_HOLD_FILE"
SLOW_STEP_ENV = "LORA_COMPARE_FAULT_SLOW_STEP_S"

log = logging.getLogger(__name__)


def install(marker: str | None = os.environ.get(MARKER_ENV)) -> None:
    """Wrap `worker.chunk.run_chunk` (which `process_chunk` calls once the chunk is claimed)."""
    if not marker:
        return
    from worker import chunk

    generate = chunk.run_chunk

    def run_chunk(host: Any, config: Any, examples: Any, variants: Any, **kwargs: Any) -> Any:
        if any(marker in ex.prompt for ex in examples):
            log.error("fault injection: killing this worker on a chunk with %r", marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return generate(host, config, examples, variants, **kwargs)

    chunk.run_chunk = run_chunk  # type: ignore[assignment]


def install_hold(hold_file: str | None = os.environ.get(HOLD_ENV)) -> None:
    """Wrap `worker.chunk.run_chunk`: after generating, wait while `hold_file` exists."""
    if not hold_file:
        return
    import time
    from pathlib import Path

    from worker import chunk

    generate = chunk.run_chunk

    def run_chunk(*args: Any, **kwargs: Any) -> Any:
        outcome = generate(*args, **kwargs)
        if Path(hold_file).exists():
            log.error("fault injection: holding a generated chunk while %s exists", hold_file)
            while Path(hold_file).exists():
                time.sleep(0.1)
        return outcome

    chunk.run_chunk = run_chunk  # type: ignore[assignment]


def install_slow_step(seconds: str | None = os.environ.get(SLOW_STEP_ENV)) -> None:
    """Wrap the decode loop's once-per-step hook (`worker.engine.contention.step`, called at each step's
    sync): sleep first."""
    if not seconds:
        return
    import time

    from worker.engine import contention

    step = contention.step
    said = False

    def slow_step() -> None:
        nonlocal said
        if not said:
            log.error("fault injection: every decode step is %ss slower", seconds)
            said = True
        time.sleep(float(seconds))
        step()

    contention.step = slow_step  # type: ignore[assignment]


install()
install_hold()
install_slow_step()
