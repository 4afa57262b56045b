"""lora-compare's log-likelihood tasks against lm-evaluation-harness itself (issue 15, acceptance 1).

- The bundled examples (examples/choice, examples/perplexity) run through `lora-compare run` (the real
  task, embedded worker, SQLite) on the demo model, base and the demo adapter together, and give the
  harness's figures as checked in (harness_expected.json, written by lm-eval 0.4.13 with `peft=` for the
  adapter): the same prediction on every example, so `acc` and `acc_norm` are equal exactly; every
  choice's and document's log-likelihood, and the three perplexity figures, to a relative 1e-4. This
  part needs no harness installed: the figures are in the repository.
- The same against the harness run live, here and now (skipped where lm-eval is not installed): on a
  slice of the choice set on the demo model, and on a tiny Llama whose context is 64 tokens, so every
  perplexity document is scored in several rolling windows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from producer.cli import cli
from tests.harness import harness_installed, run_harness, task_from_config
from tests.test_loglik_report import rendered_dom

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHOICE, PERPLEXITY = REPO / "examples/choice", REPO / "examples/perplexity"
REL = 1e-4


def _run(config: Path, db: Path, *extra: str) -> int:
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "run", str(config), *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return int(result.output.strip().splitlines()[-1])


def _report(db: Path, run_id: int) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "report", str(run_id), "--format", "json"])
    assert result.exit_code == 0, result.output
    return {v["variant"]: v for v in json.loads(result.output)["variants"]}


def _scores(db: Path, run_id: int) -> dict[tuple[str, int], list[float]]:
    """(variant, example) -> the stored log-likelihood of each choice (or of the document), in order."""
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT variant, example_idx, choice_idx, logprob FROM loglikelihoods "
                                 "WHERE run_id = :r ORDER BY variant, example_idx, choice_idx"), {"r": run_id}).all()
    engine.dispose()
    out: dict[tuple[str, int], list[float]] = {}
    for variant, idx, _choice, logprob in rows:
        out.setdefault((variant, idx), []).append(logprob)
    return out


def _expected(example: Path) -> dict[str, Any]:
    return json.loads((example / "harness_expected.json").read_text())["runs"]  # type: ignore[no-any-return]


def _check_choice(ours: dict[tuple[str, int], list[float]], report: dict[str, Any], variant: str,
                  harness: list[dict[str, Any]], metrics: dict[str, float] | None) -> None:
    for idx, want in enumerate(harness):
        got = ours[variant, idx]
        assert got == pytest.approx(want["logprobs"], rel=REL, abs=1e-5), (variant, idx)
        assert int(np.argmax(got)) == int(np.argmax(want["logprobs"])), (variant, idx)  # the same prediction
    if metrics is not None:  # exactly the harness's accuracies (same predictions on the same examples)
        assert report[variant]["acc"] == metrics["acc"] and report[variant]["acc_norm"] == metrics["acc_norm"]
        assert report[variant]["accuracy"] == report[variant]["acc"]


def _check_perplexity(ours: dict[tuple[str, int], list[float]], report: dict[str, Any], variant: str,
                      harness: list[dict[str, Any]], metrics: dict[str, float]) -> None:
    for idx, want in enumerate(harness):
        (got,) = ours[variant, idx]
        assert got == pytest.approx(want["loglikelihood"], rel=REL), (variant, idx)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert report[variant][key] == pytest.approx(metrics[key], rel=REL), (variant, key)
    assert report[variant]["documents"] == len(harness)


def test_bundled_examples_give_the_harness_figures(demo_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    expected = {"choice": _expected(CHOICE), "perplexity": _expected(PERPLEXITY)}
    choice = _run(CHOICE / "choice.yaml", db)
    ours, report = _scores(db, choice), _report(db, choice)
    for variant, key in (("base", "demo/base"), ("arith", "demo/arith")):
        want = expected["choice"][key]
        _check_choice(ours, report, variant, want["examples"], want["metrics"])
    ppl = _run(PERPLEXITY / "perplexity.yaml", db)
    ours, report = _scores(db, ppl), _report(db, ppl)
    for variant, key in (("base", "demo/base"), ("arith", "demo/arith")):
        want = expected["perplexity"][key]
        _check_perplexity(ours, report, variant, want["examples"], want["metrics"])
    for run_id, needle in ((choice, "acc_norm"), (ppl, "bits per byte")):  # each HTML report, in a browser
        page = tmp_path / f"report-{run_id}.html"
        result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "report", str(run_id), "--html",
                                          str(page)])
        assert result.exit_code == 0, result.output
        assert needle in rendered_dom(page, tmp_path / str(run_id))


# --- against the harness run now ------------------------------------------------------------------

live = pytest.mark.skipif(not harness_installed(), reason="lm-eval is not installed: the harness extra, "
                          "requirements-harness.lock (make venv installs it)")


def _copy_example(example: Path, config: str, out: Path, *, base: str, adapter: Path, limit: int | None) -> Path:
    """The example's config and data in `out`, with another base model and adapter (and a row limit)."""
    out.mkdir(parents=True, exist_ok=True)
    text_ = (example / config).read_text().replace("base: demo ", f"base: {base} ").replace(
        "arith: ../adapters/arith", f"arith: {adapter}")
    if limit is not None:
        text_ = text_.replace("dataset:\n", f"dataset:\n  limit: {limit}\n")
    for data in example.glob("*.jsonl"):
        shutil.copy(data, out / data.name)
    (out / config).write_text(text_)
    return out / config


@live
def test_the_harness_now_agrees_on_the_demo_model(demo_model: Path, tmp_path: Path) -> None:
    limit = 12
    config = _copy_example(CHOICE, "choice.yaml", tmp_path / "choice", base="demo",
                           adapter=REPO / "examples/adapters/arith", limit=limit)
    db = tmp_path / "results.db"
    run_id = _run(config, db)
    ours, report = _scores(db, run_id), _report(db, run_id)
    task = task_from_config(CHOICE / "choice.yaml")
    for variant, peft in (("base", None), ("arith", REPO / "examples/adapters/arith")):
        harness = run_harness(task, demo_model, peft=peft, limit=limit, in_process=True)
        _check_choice(ours, report, variant, harness.samples, harness.metrics)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama and adapter of harness_expected.json, with a context of 64 positions (in its config,
    so that the harness and lora-compare both read it there)."""
    from tests.harness_expected import TINY_ADAPTER, TINY_ARCH
    from tests.tiny_models import ADAPTERS, make_adapter, make_model

    folder = tmp_path_factory.mktemp("tiny64")
    base = make_model(TINY_ARCH, folder / "base", seed=0)
    adapter = make_adapter(base, TINY_ARCH, ADAPTERS[TINY_ADAPTER], folder / "adapter", seed=1)
    config = json.loads((base / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (base / "config.json").write_text(json.dumps(config))
    return base, adapter


@live
def test_the_harness_now_agrees_in_rolling_windows_on_a_tiny_model(tiny64: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = tiny64
    config = _copy_example(PERPLEXITY, "perplexity.yaml", tmp_path / "ppl", base=str(base), adapter=adapter, limit=4)
    db = tmp_path / "results.db"
    run_id = _run(config, db)
    ours, report = _scores(db, run_id), _report(db, run_id)
    task = task_from_config(PERPLEXITY / "perplexity.yaml")
    for variant, peft in (("base", None), ("arith", adapter)):
        harness = run_harness(task, base, peft=peft, limit=4, in_process=True)
        assert harness.model["max_length"] == 64 and max(s["windows"] for s in harness.samples) > 2
        _check_perplexity(ours, report, variant, harness.samples, harness.metrics)
        tokens = sum(s["tokens"] for s in harness.samples)
        assert math.isfinite(report[variant]["bits_per_byte"]) and tokens > 4 * 64
