"""Bad input: a non-zero exit, one line naming the file, key, row or line, no traceback, nothing queued."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from producer.cli import cli
from tests.conftest import write_arith_dataset

#: No broker listens here: if anything were queued, the command would fail differently.
NO_BROKER = "redis://127.0.0.1:1/0"

GOOD = """
model:
  base: {base}
  adapters:
    attn: {attn}
dataset:
  path: data.jsonl
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
"""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama made here (not the demo model: these cases never generate) and a LoRA adapter for it."""
    from tests.tiny_models import ADAPTERS, make_adapter, make_model

    root = tmp_path_factory.mktemp("tiny")
    base = make_model("llama", root / "base")
    return base, make_adapter(base, "llama", ADAPTERS["r1"], root / "attn", seed=1)


@pytest.fixture
def workdir(tmp_path: Path, tiny: tuple[Path, Path]) -> Path:
    write_arith_dataset(tmp_path / "data.jsonl")
    base, adapter = tiny
    (tmp_path / "good.yaml").write_text(GOOD.format(base=base, attn=adapter))
    return tmp_path


@pytest.fixture(scope="session")
def foreign_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter made for another tiny Llama: its shapes do not fit the base of `tiny`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    model = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("foreign") / "adapter"
    model.save_pretrained(str(out))
    return out


def _invoke(workdir: Path, *args: str) -> tuple[int, str]:
    db = workdir / "results.db"
    result = CliRunner().invoke(
        cli, ["--database-url", f"sqlite:///{db}", "--broker-url", NO_BROKER, *args], catch_exceptions=True
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def _runs_in(workdir: Path) -> int:
    db = workdir / "results.db"
    if not db.exists():
        return 0
    engine = create_engine(f"sqlite:///{db}")
    if "runs" not in inspect(engine).get_table_names():
        return 0
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM runs")).scalar_one())


def _edit(workdir: Path, old: str, new: str) -> Path:
    text_ = (workdir / "good.yaml").read_text()
    assert old in text_
    path = workdir / "bad.yaml"
    path.write_text(text_.replace(old, new, 1))
    return path


def _assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code != 0
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


CASES = {
    "unknown key": ("  reference:", "  referense: x\n  reference:", ["bad.yaml", "unknown key 'dataset.referense'"]),
    "wrong type": ("dataset:", "inference:\n  batch_size: eight\ndataset:",
                   ["bad.yaml", "key 'inference.batch_size' must be an integer"]),
    "negative size": ("dataset:", "inference:\n  chunk_size: -5\ndataset:",
                      ["bad.yaml", "key 'inference.chunk_size' must be at least 1, got -5"]),
    "yaml syntax": ("dataset:", "dataset: [unclosed\n", ["bad.yaml:", "YAML syntax error"]),
    "base as adapter name": ("    attn:", "    base:", ["bad.yaml", "key 'model.adapters.base' uses a reserved name"]),
    "template field missing": ("plus {{ b }}", "plus {{ c }}",
                               ["data.jsonl:1", "uses 'c'", "its fields: a, answer, b"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["submit", "run"])
def test_bad_config_is_one_line_and_queues_nothing(workdir: Path, case: str, command: str) -> None:
    old, new, needles = CASES[case]
    path = _edit(workdir, old, new)
    code, output = _invoke(workdir, command, str(path))
    _assert_one_line_error(code, output, *needles)
    assert _runs_in(workdir) == 0


def _adapter_line(workdir: Path) -> str:
    return next(ln for ln in (workdir / "good.yaml").read_text().splitlines() if ln.startswith("    attn: "))


@pytest.mark.parametrize("command", ["submit", "run"])
def test_missing_adapter_folder(workdir: Path, command: str) -> None:
    path = _edit(workdir, _adapter_line(workdir), "    attn: /nonexistent/adapter")
    code, output = _invoke(workdir, command, str(path))
    _assert_one_line_error(code, output, "adapter 'attn' (model.adapters.attn): no such folder: /nonexistent/adapter")
    assert _runs_in(workdir) == 0


def test_malformed_dataset_line(workdir: Path) -> None:
    with (workdir / "data.jsonl").open("a") as fh:
        fh.write('{"a": 1, "b": \n')
    code, output = _invoke(workdir, "submit", str(workdir / "good.yaml"))
    _assert_one_line_error(code, output, "data.jsonl:9: not valid JSON")
    assert _runs_in(workdir) == 0


def test_empty_dataset(workdir: Path) -> None:
    (workdir / "data.jsonl").write_text("\n")
    code, output = _invoke(workdir, "submit", str(workdir / "good.yaml"))
    _assert_one_line_error(code, output, "data.jsonl", "the dataset has no rows")
    assert _runs_in(workdir) == 0


def test_adapter_made_for_another_base_model(workdir: Path, foreign_adapter: Path) -> None:
    path = _edit(workdir, _adapter_line(workdir), f"    attn: {foreign_adapter}")
    for command in ("submit", "run"):
        code, output = _invoke(workdir, command, str(path))
        _assert_one_line_error(code, output, "adapter 'attn'", "model.adapters.attn", "made for another base model")
    assert _runs_in(workdir) == 0


def test_pickle_only_adapter_is_refused(workdir: Path, tiny: tuple[Path, Path]) -> None:
    folder = workdir / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tiny[1] / "adapter_config.json").read_text())
    (folder / "adapter_model.bin").write_bytes(b"not really a pickle")
    code, output = _invoke(workdir, "submit", str(_edit(workdir, _adapter_line(workdir), f"    attn: {folder}")))
    _assert_one_line_error(code, output, "adapter_model.bin", "safetensors")


def test_unknown_run_and_bad_sql(tmp_path: Path) -> None:
    code, output = _invoke(tmp_path, "db", "upgrade")
    assert code == 0, output
    code, output = _invoke(tmp_path, "status", "42")
    _assert_one_line_error(code, output, "no run with id 42")
    code, output = _invoke(tmp_path, "results", "42")
    _assert_one_line_error(code, output, "no run with id 42")
    code, output = _invoke(tmp_path, "sql", "DELETE FROM runs")
    _assert_one_line_error(code, output, "sql:", "read-only")
    code, output = _invoke(tmp_path, "sql", "SELEC nonsense")
    _assert_one_line_error(code, output, "sql:", "syntax error")
    code, output = _invoke(tmp_path, "--database-url", "sqlite:////nonexistent/dir/x.db", "status")
    assert code != 0 and "Traceback" not in output




def test_connection_options_work_before_or_after_the_subcommand(tmp_path: Path) -> None:
    """DESIGN.md: `--database-url` (and `--broker-url`) before or after the subcommand."""
    from producer.cli import _hoist, cli

    db = f"sqlite:///{tmp_path / 'after.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["--database-url", db, "db", "upgrade"]).exit_code == 0
    for args in (["sql", "SELECT 41 + 1 AS answer", "--database-url", db, "--format", "csv"],
                 ["sql", f"--database-url={db}", "SELECT 41 + 1 AS answer", "--format", "csv"],
                 ["--database-url", db, "sql", "SELECT 41 + 1 AS answer", "--format", "csv"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
        assert result.output.split() == ["answer", "42"]
    # the option is taken wherever it stands, except after `--`; its value is never a command
    assert _hoist(["sql", "q", "--broker-url", "redis://x"]) == ["--broker-url", "redis://x", "sql", "q"]
    assert _hoist(["sql", "--", "--database-url", "x"]) == ["sql", "--", "--database-url", "x"]
    assert _hoist(["status", "--database-url"]) == ["status", "--database-url"]  # no value: click says so
