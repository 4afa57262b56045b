"""The layer contracts in pyproject.toml ([tool.importlinter]) hold, checked by import-linter itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(config: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (it is in the dev extras: pip install -e '.[dev]')")
    args = [exe, "--no-cache"] + (["--config", str(config)] if config else [])
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def test_the_layer_contracts_hold() -> None:
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_broken_layer_is_caught(tmp_path: Path) -> None:
    """The same tool with one contract that the code breaks (the worker does import db): it must fail."""
    config = tmp_path / "layers.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["contract", "db", "producer", "worker"]\n'
        '[[tool.importlinter.contracts]]\nname = "worker never imports db"\ntype = "forbidden"\n'
        'source_modules = ["worker"]\nforbidden_modules = ["db"]\n'
    )
    result = _lint_imports(config)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


#: The most lines a module of ours may have (tests and benchmarks aside): past it, split by concept.
MAX_MODULE_LINES = 350


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_no_module_is_over_the_line_bound() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules("contract", "db", "producer", "worker")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"

