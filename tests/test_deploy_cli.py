"""What the Docker deployment needs from the CLI (issue 14): the demo laid out for /data, reports on
stdout, one-line file errors, submit refusing what the workers would refuse, passwords kept out of URLs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from contract.config import load_config
from contract.settings import DEMO_MODEL_FOLDER
from producer.cli import DEMO_CONFIG, cli
from producer.demo_export import demo_layout, write_layout, write_tar
from tests.test_doc_sql import _scored_run


def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / ".converted").write_text("ok\n")
    return folder


def test_the_demo_export_is_a_data_folder_whose_config_names_only_its_own_files(tmp_path: Path) -> None:
    files = demo_layout(_fake_model(tmp_path / "cache" / DEMO_MODEL_FOLDER), DEMO_CONFIG)
    data = tmp_path / "data"
    write_layout(files, data)
    assert {p.relative_to(data).parts[0] for p in data.rglob("*") if p.is_file()} == {
        "models", "adapters", "datasets", "configs"}
    assert not (data / "models" / DEMO_MODEL_FOLDER / ".converted").exists()
    config = load_config(data / "configs" / "demo.yaml")
    assert Path(config.model.base).resolve() == (data / "models" / DEMO_MODEL_FOLDER).resolve()
    adapters = [(n, Path(p).resolve()) for n, p in config.model.adapters]
    assert adapters == [("arith", (data / "adapters" / "arith").resolve())]
    assert Path(config.dataset.path).resolve() == (data / "datasets" / "arith.jsonl").resolve()
    original, exported = (yaml.safe_load(p.read_text()) for p in (DEMO_CONFIG, data / "configs" / "demo.yaml"))
    for key in ("name", "generation", "inference", "scoring"):
        assert exported[key] == original[key]
    assert exported["dataset"]["prompt"] == original["dataset"]["prompt"]

    stream = io.BytesIO()
    write_tar(files, stream)
    stream.seek(0)
    with tarfile.open(fileobj=stream) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {name for name, m in members.items() if m.isfile()} == set(files)
        assert all(m.mode == (0o755 if m.isdir() else 0o644) for m in members.values())
        got = tar.extractfile("configs/demo.yaml")
        assert got is not None and got.read() == (data / "configs" / "demo.yaml").read_bytes()


def _invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def _one_error_line(code: int, stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert all(needle in lines[0] for needle in needles), (needles, lines[0])


def test_submit_refuses_an_adapter_outside_the_workers_folders(tmp_path: Path) -> None:
    """The image's /app/examples/demo.yaml was accepted by submit, then every chunk failed on the workers."""
    db = f"sqlite:///{tmp_path / 'r.db'}"
    code, _, err = _invoke("--database-url", db, "--broker-url", "redis://127.0.0.1:1/0", "submit", str(DEMO_CONFIG),
                           env={"LORA_COMPARE_MODEL_ROOTS": str(tmp_path / "data")})
    _one_error_line(code, err, "demo.yaml", "model.adapters.arith", "outside the folders the workers load from",
                    str(tmp_path / "data"))


def test_report_html_to_stdout_and_a_file_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    _scored_run(db)
    code, out, _ = _invoke("--database-url", db, "report", "1", "--html", "-")
    assert code == 0 and out.lstrip().lower().startswith("<!doctype html") and out.rstrip().endswith("</html>")
    (tmp_path / "a-file").write_text("")  # (a read-only /data in the container is the same OSError path)
    for path in (tmp_path / "a-file" / "report.html", tmp_path / "missing" / "report.html"):
        code, _, err = _invoke("--database-url", db, "report", "1", "--html", str(path))
        _one_error_line(code, err, str(path))


def test_the_password_variables_take_any_character(pg_url: str) -> None:
    """`@/#$%` in a password used to turn `postgresql://lora:p@ss/w#rd@host/db` into host `ss`; in its own
    variable it is percent-encoded into the URL (the local PostgreSQL trusts: the host, user and
    database are what this proves)."""
    env = {"LORA_COMPARE_DATABASE_PASSWORD": "p@ss/w#rd$%:1", "LORA_COMPARE_BROKER_PASSWORD": "r@d/s#$%:2"}
    code, _, err = _invoke("--database-url", pg_url, "db", "upgrade", env=env)
    assert code == 0, err
    code, out, err = _invoke("--database-url", pg_url, "sql", "SELECT count(*) AS n FROM runs", env=env)
    assert code == 0 and "0" in out, err


@pytest.mark.slow
def test_demo_export_from_the_cli(demo_model: Path, tmp_path: Path) -> None:
    """The command the README gives (`docker compose run --rm -T cli demo --export - | tar -x -C data`),
    here into a folder; the model comes from the prepared cache."""
    code, _, err = _invoke("demo", "--export", str(tmp_path / "data"))
    assert code == 0 and "submit" in err, err
    exported = tmp_path / "data" / "models" / DEMO_MODEL_FOLDER
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in demo_model.iterdir()
                                                                if p.name != ".converted")
    assert load_config(tmp_path / "data" / "configs" / "demo.yaml").model.is_demo is False
