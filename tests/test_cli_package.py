"""The CLI package's structure: errors translated by the group for every command (those added later
included), options shared rather than redeclared, and one copy of the demo, shipped in the package."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import click
import pytest
from click.testing import CliRunner
from sqlalchemy.exc import OperationalError, ProgrammingError

from contract.errors import RunNotFoundError, UserError
from db.readonly import QueryError
from producer.cli import DEMO_CONFIG, cli

ROOT = Path(__file__).resolve().parent.parent
CLI_PACKAGE = ROOT / "producer" / "cli"

#: What each raised error becomes: the whole output, one line.
RAISED = {
    "user": (UserError("config.yaml: model.base: missing"), "Error: config.yaml: model.base: missing"),
    "not-found": (RunNotFoundError("no run with id 7"), "Error: no run with id 7"),
    "sql": (QueryError("only one statement"), "Error: sql: only one statement"),
    "unreachable": (OperationalError("SELECT 1", {}, Exception("unable to open database file\nmore detail")),
                    "Error: database error: unable to open database file"),
    "no-schema": (ProgrammingError("SELECT 1", {}, Exception('relation "runs" does not exist\nLINE 1')),
                  'Error: database error: relation "runs" does not exist '
                  "(is the schema created? run `lora-compare db upgrade`)"),
}


@pytest.fixture
def late_commands() -> Iterator[None]:
    """A command and a nested group's command added after the package is imported, as a later change
    would add them: no decorator for errors on either."""

    @cli.command("raise-for-test")
    @click.argument("kind")
    def raise_for_test(kind: str) -> None:
        if kind == "bug":
            raise RuntimeError("a bug keeps its traceback")
        raise RAISED[kind][0]

    @cli.group("group-for-test")
    def group_for_test() -> None:
        pass

    @group_for_test.command("raise")
    @click.argument("kind")
    def nested(kind: str) -> None:
        raise RAISED[kind][0]

    try:
        yield
    finally:
        cli.commands.pop("raise-for-test")
        cli.commands.pop("group-for-test")


@pytest.mark.parametrize("kind", sorted(RAISED))
@pytest.mark.parametrize("where", [["raise-for-test"], ["group-for-test", "raise"]])
def test_every_command_gets_one_line_errors(late_commands: None, tmp_path: Path, where: list[str],
                                            kind: str) -> None:
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'x.db'}", *where, kind])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.output.strip() == RAISED[kind][1]


def test_other_exceptions_are_not_hidden(late_commands: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'x.db'}", "raise-for-test", "bug"])
    assert isinstance(result.exception, RuntimeError)


def test_no_command_carries_its_own_error_decorator() -> None:
    for module in CLI_PACKAGE.glob("*.py"):
        assert not re.search(r"^@\w*errors", module.read_text(), flags=re.MULTILINE), module.name


@pytest.mark.parametrize("option", ["--device", "--format", "--queue", "--quiet"])
def test_shared_options_are_declared_once(option: str) -> None:
    declared = sum(len(re.findall(rf"""["']{option}["']""", m.read_text())) for m in CLI_PACKAGE.glob("*.py"))
    assert declared == 1, option


def test_only_the_embedded_module_imports_the_worker() -> None:
    for module in CLI_PACKAGE.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import) worker\b", module.read_text(), flags=re.MULTILINE)
        assert not imports or module.name == "embedded.py", module.name


def test_the_demo_config_is_in_the_package() -> None:
    assert DEMO_CONFIG == ROOT / "producer" / "demo" / "demo.yaml"
    assert DEMO_CONFIG.is_file()


@pytest.mark.parametrize("path", ["demo.yaml", "arith.jsonl", "adapters/arith/adapter_config.json",
                                  "adapters/arith/adapter_model.safetensors"])
def test_examples_are_the_packaged_demo_files_not_copies(path: str) -> None:
    """examples/ keeps the paths users and docs know; they lead to the one copy in producer/demo/."""
    assert (ROOT / "examples" / path).resolve() == (DEMO_CONFIG.parent / path).resolve()


def test_package_data_lists_every_demo_file() -> None:
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["producer"]
    files = [PurePosixPath(p.relative_to(ROOT / "producer").as_posix())
             for p in DEMO_CONFIG.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 4
    for file in files:
        assert any(file.match(g) and len(file.parts) == len(PurePosixPath(g).parts) for g in globs), file
