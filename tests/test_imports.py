"""The producer and db packages never import torch, transformers or peft; the CLI starts fast."""

from __future__ import annotations

import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "peft")


def _imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_importing_producer_loads_no_model_library() -> None:
    statement = (
        "import producer, producer.cli, producer.config, producer.dataset, producer.templates, "
        "producer.adapters, producer.submit, producer.queue, producer.display"
    )
    assert _imported_after(statement) == []


def test_importing_db_loads_no_model_library() -> None:
    statement = "import db, db.schema, db.engine, db.migrate, db.runs, db.outputs, db.progress, db.readonly, db.views"
    assert _imported_after(statement) == []


def test_the_worker_does_import_them_which_proves_the_check_can_fail() -> None:
    assert "torch" in _imported_after("import worker.model_host")


def test_help_answers_in_under_a_second() -> None:
    exe = [sys.executable, "-c", "from producer.cli import main; main()", "--help"]
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        result = subprocess.run(exe, capture_output=True, text=True)
        timings.append(time.perf_counter() - started)
        assert result.returncode == 0
        assert "Commands:" in result.stdout
    assert sorted(timings)[1] < 1.0, timings
