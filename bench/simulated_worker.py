"""A simulated worker for bench/control_plane.py: the real `lora-compare worker` (Celery, solo pool, the
real task, queue, leases, sweeper and SQL) with an instant fake generator at the model boundary.

    python bench/simulated_worker.py --database-url URL --broker-url URL worker --queues Q --hostname NAME

Before the command line runs, this module (bench-only; no production module knows of it) replaces
`worker.runner.load_host`, which builds a worker's model host, with `FakeHost`, a
`worker.planner.ChunkGenerator` that loads no model and answers at once with outputs shaped like real
ones (a sentence, its token ids, a finish reason). Torch is never imported (checked at start).

With `LORA_COMPARE_BENCH_TIMINGS=folder`, each chunk the worker processes appends one JSON line to
`folder/<pid>.jsonl`: when it ended and the seconds (wall, and the worker thread's CPU) spent in each
phase of `worker.chunk.process_chunk`: the claim's statements, reading the chunk, the cache lookup, the
planner, the fake generation, writing the rows and completing the chunk, and the rest (the claim's
session and commit, the lease's heartbeat thread, parsing the run's config, building the rows).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.artifacts import inspect_adapter  # noqa: E402
from worker.generated import GenResult, GenRow, StopFlag  # noqa: E402

TIMINGS_ENV = "LORA_COMPARE_BENCH_TIMINGS"
#: Token ids of the chat template around a prompt (SmolLM2's system turn and markers are about this long).
TEMPLATE_IDS = tuple(range(1, 29))
WORDS = ("the", "sum", "of", "and", "is", "so", "answer", "we", "add", "numbers", "result", "which", "gives")


@dataclass(frozen=True)
class FakeIdentity:
    """What the planner reads of `worker.model_host.ModelIdentity` (its cache keys)."""

    base_hash: str = "f" * 64
    tokenizer_hash: str = "e" * 64
    dtype: str = "float32"
    device: str = "cpu"
    eos_ids: tuple[int, ...] = (2,)


class FakeHost:
    """A `ChunkGenerator` that generates nothing: each row's output is derived from its prompt ids and
    adapter, 8 to 31 tokens of about 5 characters, ending with EOS (or at `max_new_tokens`)."""

    device = "simulated"

    def __init__(self) -> None:
        self._hashes: dict[str, str] = {}
        self.generate_seconds = 0.0  # read by the timing wrapper
        self.stopping = StopFlag()  # a shutdown's flag (generation here is instant: nothing to stop)

    def load_base(self, model: Any) -> FakeIdentity:
        return FakeIdentity()

    def ensure_adapter(self, variant: str, folder: str) -> tuple[str, str]:
        if folder not in self._hashes:  # the real host re-hashes the files every chunk; the fake once
            self._hashes[folder] = inspect_adapter(variant, folder).sha256
        digest = self._hashes[folder]
        return f"a{digest[:16]}", digest

    def encode(self, prompts: Sequence[str], dataset: Any) -> list[list[int]]:
        return [[*TEMPLATE_IDS, *(100 + b for b in prompt.encode()[::2])] for prompt in prompts]

    def context_limit(self) -> int | None:
        return 8192

    def generate(self, rows: Sequence[GenRow], gen: Any, inference: Any, *, variants: int, seed: int,
                 options: Any) -> tuple[list[GenResult], list[str]]:
        started = time.perf_counter()
        results = [_fake_output(row, gen.max_new_tokens) for row in rows]
        self.generate_seconds += time.perf_counter() - started
        return results, []

    def device_name(self) -> str:
        return "cpu"

    def exclusive(self) -> AbstractContextManager[object]:
        return nullcontext()

    def load_summary(self) -> str:
        return "simulated: no model"


#: Outputs the fake picks from, by a hash of the row: built once per max_new_tokens, so generating costs
#: next to nothing (the benchmark measures everything but generation).
_OUTPUTS: dict[int, list[GenResult]] = {}


def _outputs(max_new_tokens: int) -> list[GenResult]:
    if max_new_tokens not in _OUTPUTS:
        made = []
        for k in range(97):
            n = min(8 + k % 24, max_new_tokens)
            words = [WORDS[(k * 31 + i * 7) % len(WORDS)] for i in range(n - 1)]
            ended = n < max_new_tokens
            ids = tuple(1000 + (k * 409 + 7 * i) % 40000 for i in range(n - 1 if ended else n))
            ids += (2,) if ended else ()
            made.append(GenResult(" ".join(words) + f" {k * 13 % 200}.", n, "eos" if ended else "length", ids))
        _OUTPUTS[max_new_tokens] = made
    return _OUTPUTS[max_new_tokens]


def _fake_output(row: GenRow, max_new_tokens: int) -> GenResult:
    outputs = _outputs(max_new_tokens)
    return outputs[hash((row.input_ids, row.adapter)) % len(outputs)]


# --- per-chunk phase timings --------------------------------------------------------------------------


class _Phases(threading.local):
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}


_phases = _Phases()


def _timed(name: str, func: Any) -> Any:
    """`func`, adding its wall seconds to the phase `name` and its CPU seconds (this thread's) to `name_cpu`."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            seconds = _phases.seconds
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            seconds[f"{name}_cpu"] = seconds.get(f"{name}_cpu", 0.0) + time.thread_time() - cpu
    return wrapper


def install_timings(folder: str) -> None:
    """Wrap the steps of `worker.chunk.process_chunk` (by their names in its module) and the task's call
    of it, and append each chunk's phases to `folder/<pid>.jsonl`."""
    from worker import chunk, tasks

    for name, attr in (("claim", "claim_chunk"), ("read", "_read_chunk"), ("lookup", "_lookup"),
                       ("planner", "run_chunk"), ("write", "_write_outputs")):
        setattr(chunk, attr, _timed(name, getattr(chunk, attr)))
    out = open(Path(folder) / f"{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115 - for the process's life
    process = tasks.process_chunk

    def timed_process(sessions: Any, host: Any, run_id: int, chunk_id: int, **kwargs: Any) -> Any:
        _phases.seconds = {}
        generated_before = getattr(host, "generate_seconds", 0.0)
        started, cpu = time.perf_counter(), time.thread_time()
        outcome = None
        try:
            outcome = process(sessions, host, run_id, chunk_id, **kwargs)
            return outcome
        finally:
            total, total_cpu = time.perf_counter() - started, time.thread_time() - cpu
            generated = getattr(host, "generate_seconds", 0.0) - generated_before
            record = {"end": time.time(), "run": run_id, "chunk": chunk_id, "outcome": str(outcome),
                      "total": total, "total_cpu": total_cpu, "gen": generated, "gen_cpu": generated,
                      **_phases.seconds}
            out.write(json.dumps(record) + "\n")

    tasks.process_chunk = timed_process  # type: ignore[assignment]


def install() -> None:
    from worker import runner

    runner.load_host = lambda settings, *, device, max_adapters=0: FakeHost()  # type: ignore[assignment,misc]
    folder = os.environ.get(TIMINGS_ENV)
    if folder:
        install_timings(folder)


def _refuse_model_libraries(**_: Any) -> None:
    """At the worker's start: the simulated worker must not have loaded a model library (it would not
    be the small process the benchmark claims to run by the hundred)."""
    heavy = [m for m in ("torch", "transformers", "peft") if m in sys.modules]
    if heavy:
        print(f"simulated worker: {', '.join(heavy)} imported; the worker path must stay torch-free", file=sys.stderr)
        os._exit(3)


if __name__ == "__main__":
    from celery.signals import worker_ready

    install()
    worker_ready.connect(_refuse_model_libraries, weak=False)
    from producer.cli import main

    sys.argv[0] = "lora-compare"
    main()
