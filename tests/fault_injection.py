"""Test-only fault injection, loaded into a worker process by the crash tests; no production module
knows of it.

`tests.cluster.Worker` starts every worker as `python -c "import tests.fault_injection; ..."`. With
`LORA_COMPARE_FAULT_CRASH_MARKER` set in its environment, that worker kills itself (SIGKILL, as the
out-of-memory killer would) on a chunk one of whose prompts contains the marker, after it has claimed
the chunk and before generating it; without it, importing this module changes nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

MARKER_ENV = "LORA_COMPARE_FAULT_CRASH_MARKER"

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


install()
