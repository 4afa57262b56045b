"""`lora-compare demo` from a wheel installed non-editable, run from another folder: the demo's config,
dataset and adapter must travel inside the package (no checkout, no examples/ next to it). The whole
demo runs (about 20 s on an idle 2-core machine once the model is cached; minutes on a loaded one).

The fresh venv gets the wheel alone (`--no-deps`, `--no-index`); a .pth file written after the install
lends it the current environment's dependencies (torch, transformers, ...), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: What a wheel is built from (pyproject's packages and package data, and the readme it names).
SOURCES = ("pyproject.toml", "README.md", "contract", "db", "producer", "worker")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def test_demo_runs_from_a_non_editable_install(tmp_path: Path) -> None:
    # Nothing that would put the checkout on sys.path or point at another database; the model cache
    # (LORA_COMPARE_CACHE or the default) stays shared, so the demo model is converted at most once.
    dropped = {"PYTHONPATH", "PYTHONHOME", "LORA_COMPARE_DATABASE_URL", "LORA_COMPARE_BROKER_URL"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PIP_NO_INDEX"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # 1. A wheel, built from a copy of the sources (the checkout gets no build/ or egg-info).
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
          str(src)], cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("lora_compare-*.whl")

    # 2. A fresh venv with the wheel alone, then the current environment's packages behind it.
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path, env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=env).stdout.strip())
    (site / "_lora_compare_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # 3. From another folder: the package and its demo come from the venv, not from the checkout.
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = _run([str(python), "-c", "import producer.cli as c; print(c.__file__); print(c.DEMO_CONFIG)"],
                 cwd=away, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    demo_files = {p.relative_to(site / "producer" / "demo").as_posix()
                  for p in (site / "producer" / "demo").rglob("*") if p.is_file()}
    assert demo_files == {"demo.yaml", "arith.jsonl", "adapters/arith/adapter_config.json",
                          "adapters/arith/adapter_model.safetensors"}

    db = away / "demo.db"
    result = _run([str(target / "bin" / "lora-compare"), "--database-url", f"sqlite:///{db}", "demo",
                   "--device", "cpu", "-q"], cwd=away, env=env, timeout=900)
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"run {lines[-1]} (demo-arith): completed"), result.stdout
    assert any(line.startswith("base ") for line in lines) and any(line.startswith("arith ") for line in lines)
    with sqlite3.connect(db) as conn:
        counts = dict(conn.execute("SELECT variant, count(*) FROM outputs GROUP BY variant").fetchall())
        (dataset,) = conn.execute("SELECT dataset_path FROM runs").fetchone()
    assert counts == {"base": 60, "arith": 60}
    assert Path(dataset).is_relative_to(site)  # the packaged dataset, not examples/arith.jsonl
