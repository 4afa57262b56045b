"""`lora-compare demo` end to end: the committed adapter's gain on the held-out set is real."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.cli import DEMO_CONFIG, cli

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_the_adapter_really_helps(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "demo", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    run_id = int(lines[-1])
    assert any(line.startswith("base ") for line in lines) and any(line.startswith("arith ") for line in lines)

    with sqlite3.connect(db) as conn:
        base, adapter = conn.execute(
            "SELECT sum(base_correct), sum(correct) FROM comparisons WHERE run_id = ?", (run_id,)).fetchone()
        wins, losses = conn.execute(
            "SELECT sum(correct AND NOT base_correct), sum(base_correct AND NOT correct) FROM comparisons "
            "WHERE run_id = ?", (run_id,)).fetchone()
        n = conn.execute("SELECT count(*) FROM comparisons WHERE run_id = ?", (run_id,)).fetchone()[0]
    rows = [json.loads(line) for line in (DEMO_CONFIG.parent / "arith.jsonl").read_text().splitlines()]
    assert n == len(rows) == 60
    print(f"demo: base {base}/{n}, adapter {adapter}/{n}, wins {wins}, losses {losses}")
    assert adapter - base >= 30  # a large gain, not noise
    # Exact two-sided McNemar (sign test on the discordant pairs): the gain is significant.
    discordant = wins + losses
    p = min(1.0, 2 * sum(math.comb(discordant, k) for k in range(0, min(wins, losses) + 1)) / 2**discordant)
    assert p < 1e-6, p
