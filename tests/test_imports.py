"""The producer and db packages never import torch, transformers or peft; the CLI starts light."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft")
#: Libraries `lora-compare --help` must not load: the model stack and the numeric libraries under it.
ML_LIBRARIES = (*HEAVY, "numpy", "safetensors", "tokenizers", "huggingface_hub", "accelerate", "gguf", "scipy")
#: Most modules (standard library included) that `lora-compare --help` may leave in `sys.modules`.
#: Measured: 444 on CPython 3.11 (torch alone adds over a thousand, numpy about 90).
HELP_MODULE_BOUND = 600

_HELP = """
import json, sys
sys.argv = ["lora-compare", "--help"]
from producer.cli import main
try:
    main()
except SystemExit as stop:
    print(json.dumps({"code": stop.code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _libraries_in(modules: set[str], libraries: tuple[str, ...]) -> list[str]:
    """The `libraries` (top-level packages) that have a module among `modules`."""
    return sorted({m.split(".")[0] for m in modules} & set(libraries))


def _imported_after(statement: str) -> list[str]:
    return _libraries_in(_modules_after(statement), HEAVY)


def test_importing_producer_loads_no_model_library() -> None:
    statement = (
        "import producer, producer.cli, contract.config, producer.dataset, producer.templates, "
        "contract.artifacts, producer.submit, contract.queue, producer.display"
    )
    assert _imported_after(statement) == []


def test_importing_db_loads_no_model_library() -> None:
    statement = "import db, db.schema, db.engine, db.migrate, db.runs, db.outputs, db.progress, db.readonly, db.views"
    assert _imported_after(statement) == []


def test_the_task_queue_and_sql_path_of_a_worker_loads_no_model_library() -> None:
    """The Celery task, the chunk's SQL, leases and the worker service import without the model stack:
    it loads when a worker builds its model host (`worker.runner.load_host`), so a worker over another
    `ChunkGenerator` (bench/control_plane.py's simulated workers) stays small."""
    statement = ("import worker.runner, worker.tasks, worker.app, worker.chunk, worker.lease, worker.planner, "
                 "worker.generated, worker.windows, worker.harness_encoding, producer.cli.embedded")
    assert _imported_after(statement) == []


def test_the_worker_does_import_them_which_proves_the_check_can_fail() -> None:
    modules = _modules_after("import worker.model_host")
    assert "torch" in _libraries_in(modules, HEAVY)
    assert len(modules) > HELP_MODULE_BOUND  # the bound below would catch a CLI that imported the model stack


def test_help_loads_no_ml_library_and_few_modules() -> None:
    """What `lora-compare --help` imports, not how long it takes (a timing flakes on a loaded machine).

    Measured when written: 444 modules in `sys.modules` after `--help`, none of them from ML_LIBRARIES."""
    result = subprocess.run([sys.executable, "-c", _HELP], capture_output=True, text=True)
    assert "Commands:" in result.stdout, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None)
    modules = set(report["modules"])
    assert _libraries_in(modules, ML_LIBRARIES) == []
    assert len(modules) < HELP_MODULE_BOUND, len(modules)
