"""`lora-compare demo` end to end (run twice): the committed adapter's gain on the held-out set is
real, and `report`, `compare` and the HTML report agree with the SQL views."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.cli import DEMO_CONFIG, cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    ids = []
    for _ in range(2):
        result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "demo", "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        lines = result.output.strip().splitlines()
        assert any(line.startswith("base ") for line in lines) and any(line.startswith("arith ") for line in lines)
        ids.append(int(lines[-1]))
    return db, ids[0], ids[1]


def _cli_json(db: Path, *args: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def test_the_demo_adapter_really_helps(demo_runs: tuple[Path, int, int]) -> None:
    db, run_id, _ = demo_runs
    with sqlite3.connect(db) as conn:
        base, adapter, wins, losses, n = conn.execute(
            "SELECT sum(base_correct), sum(correct), sum(correct AND NOT base_correct), "
            "sum(base_correct AND NOT correct), count(*) FROM comparisons WHERE run_id = ?", (run_id,)).fetchone()
    rows = (DEMO_CONFIG.parent / "arith.jsonl").read_text().splitlines()
    assert n == len(rows) == 60
    print(f"demo: base {base}/{n}, adapter {adapter}/{n}, wins {wins}, losses {losses}")
    assert adapter - base >= 30  # a large gain, not noise
    discordant = wins + losses  # exact two-sided McNemar, computed here independently of producer.stats
    p = min(1.0, 2 * sum(math.comb(discordant, k) for k in range(0, min(wins, losses) + 1)) / 2**discordant)
    assert p < 1e-6, p


def test_report_json_agrees_with_the_comparisons_view(demo_runs: tuple[Path, int, int]) -> None:
    db, run_id, _ = demo_runs
    report = _cli_json(db, "report", str(run_id))
    assert set(report) == {"run_id", "variants", "comparisons"} and report["run_id"] == run_id
    assert [set(v) for v in report["variants"]] == [{"variant", "n", "correct", "accuracy", "ci_low", "ci_high"}] * 2
    (comparison,) = report["comparisons"]
    assert set(comparison) == {"variant", "wins", "losses", "ties", "mcnemar_p", "delta", "delta_ci_low",
                               "delta_ci_high", "changed"}
    with sqlite3.connect(db) as conn:
        wins, losses, ties, changed, n = conn.execute(
            "SELECT sum(correct AND NOT base_correct), sum(base_correct AND NOT correct), "
            "sum(correct = base_correct), sum(output <> base_output), count(*) FROM comparisons "
            "WHERE run_id = ? AND variant = 'arith'", (run_id,)).fetchone()
        per_variant = dict(conn.execute("SELECT variant, sum(correct) FROM outputs WHERE run_id = ? GROUP BY variant",
                                        (run_id,)).fetchall())
    assert (comparison["wins"], comparison["losses"], comparison["ties"]) == (wins, losses, ties)
    assert comparison["changed"] == pytest.approx(changed / n)
    assert comparison["delta"] == pytest.approx((wins - losses) / n)
    assert comparison["delta_ci_low"] <= comparison["delta"] <= comparison["delta_ci_high"]
    k = min(wins, losses)
    assert comparison["mcnemar_p"] == pytest.approx(
        min(1.0, 2 * sum(math.comb(wins + losses, i) for i in range(k + 1)) / 2 ** (wins + losses)))
    assert {v["variant"]: v["correct"] for v in report["variants"]} == per_variant


def test_compare_two_demo_runs(demo_runs: tuple[Path, int, int]) -> None:
    db, first, second = demo_runs
    same = _cli_json(db, "compare", str(first), str(second))
    assert (same["wins"], same["losses"], same["delta"], same["changed"], same["mcnemar_p"]) == (0, 0, 0.0, 0.0, 1.0)
    assert same["ties"] == same["paired"] == 60
    against_base = _cli_json(db, "compare", str(first), str(second), "--variant-a", "base")
    report = _cli_json(db, "report", str(first))["comparisons"][0]
    for key in ("wins", "losses", "ties", "mcnemar_p", "delta", "delta_ci_low", "delta_ci_high", "changed"):
        assert against_base[key] == report[key], key


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_headless_chromium(demo_runs: tuple[Path, int, int], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    db, run_id, _ = demo_runs
    page = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "report", str(run_id), "--html",
                                      str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing from the network
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    dom = subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    assert "data-errors" not in dom  # and window.onerror saw nothing
    for variant in ("base", "arith"):
        assert f">{variant}<" in dom
    assert dom.count("<tr data-variant=") == 60
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1280,1700",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
