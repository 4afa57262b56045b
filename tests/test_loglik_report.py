"""Reports of the log-likelihood tasks (issue 15) from hand-made stored scores (tests/loglik_runs.py):
acc and acc_norm (ties included), the gold answer's log-probability change, the harness's perplexity
figures and the change in bits per byte, each against a hand computation; the JSON keys exactly; the
views `choice_scores` and `document_scores` on both backends; the HTML in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.readonly import run_readonly
from producer.cli import cli
from producer.loglik_report import ChoiceCell
from producer.stats import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED
from tests.loglik_runs import ADAPTER, CHOICE_EXAMPLES, DOCUMENTS, store_choice_run, store_perplexity_run

LN2 = math.log(2)
#: The keys a generate run's report has (kept), and what a choice run adds (DESIGN.md, "Log-likelihood tasks").
VARIANT_KEYS = {"variant", "n", "correct", "accuracy", "ci_low", "ci_high"}
CHOICE_VARIANT_KEYS = {"acc", "acc_ci_low", "acc_ci_high", "acc_norm", "acc_norm_ci_low", "acc_norm_ci_high"}
PERPLEXITY_VARIANT_KEYS = {"word_perplexity", "byte_perplexity", "bits_per_byte", "documents"}
PAIRED_KEYS = {"wins", "losses", "ties", "mcnemar_p", "delta", "delta_ci_low", "delta_ci_high"}
COMPARISON_KEYS = {"variant", *PAIRED_KEYS, "changed"}
CHOICE_COMPARISON_KEYS = {"acc_norm", "gold_logprob_delta", "gold_logprob_delta_ci_low", "gold_logprob_delta_ci_high"}
PERPLEXITY_COMPARISON_KEYS = {"bits_per_byte_delta", "bits_per_byte_delta_ci_low", "bits_per_byte_delta_ci_high"}


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's interval written out again, independently of producer.stats."""
    p = k / n
    center = (2 * n * p + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(z * z + 4 * n * p * (1 - p)) / (2 * (n + z * z))
    return center - half, center + half


def _db(url: str, *stores) -> list[int]:  # type: ignore[no-untyped-def]
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    ids = [store(sessions) for store in stores]
    engine.dispose()
    return ids


def _cli(url: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--database-url", url, *args])
    assert result.exit_code == 0, result.output
    return result.output


def _report(url: str, run_id: int) -> dict:
    return json.loads(_cli(url, "report", str(run_id), "--format", "json"))


def test_acc_norm_divides_by_characters_and_the_first_choice_wins_a_tie() -> None:
    assert ChoiceCell((-1.0, -2.0), (1, 2), 1).pick_norm == 0  # -1.0 per char each: the first
    assert ChoiceCell((-1.0, -4.0, -1.0), (1, 1, 2), 2).pick == 0  # equal logprobs: the first
    assert ChoiceCell((-1.0, -4.0, -1.0), (1, 1, 2), 2).pick_norm == 2
    assert ChoiceCell((-3.0, -2.0), (3, 1), 0).pick_norm == 0  # -1.0 beats -2.0 per char


def test_a_choice_runs_report_against_a_hand_computation(any_db_url: str) -> None:
    (run_id,) = _db(any_db_url, store_choice_run)
    report = _report(any_db_url, run_id)
    assert report["task"] == "choice" and report["run_id"] == run_id
    base, ad = report["variants"]
    assert (base["variant"], ad["variant"]) == ("base", ADAPTER)
    # acc: base right on examples 2, 3; ad only on 0 (example 2 is a tie of logprobs: the first, wrong, wins)
    # acc_norm: base right on 1, 2, 3 (example 0 ties per character: the first, wrong, wins); ad on 0, 1, 2
    for variant, acc, norm in ((base, 2, 3), (ad, 1, 3)):
        assert set(variant) == VARIANT_KEYS | CHOICE_VARIANT_KEYS
        assert variant["acc"] == acc / 4 and variant["acc_norm"] == norm / 4
        assert (variant["acc_ci_low"], variant["acc_ci_high"]) == pytest.approx(_wilson(acc, 4), abs=1e-12)
        assert (variant["acc_norm_ci_low"], variant["acc_norm_ci_high"]) == pytest.approx(_wilson(norm, 4), abs=1e-12)
        assert (variant["accuracy"], variant["ci_low"], variant["ci_high"]) == (
            variant["acc"], variant["acc_ci_low"], variant["acc_ci_high"])  # accuracy equals acc
        assert (variant["n"], variant["correct"]) == (4, acc)
    (comparison,) = report["comparisons"]
    assert set(comparison) == COMPARISON_KEYS | CHOICE_COMPARISON_KEYS
    assert set(comparison["acc_norm"]) == PAIRED_KEYS
    assert (comparison["wins"], comparison["losses"], comparison["ties"]) == (1, 2, 1)  # won 0, lost 2 and 3
    assert comparison["delta"] == -0.25 and comparison["mcnemar_p"] == 1.0 and comparison["changed"] == 0.75
    norm = comparison["acc_norm"]
    assert (norm["wins"], norm["losses"], norm["ties"], norm["delta"], norm["mcnemar_p"]) == (1, 1, 2, 0.0, 1.0)
    assert norm["delta_ci_low"] < 0 < norm["delta_ci_high"]
    # the gold choice's logprob, ad minus base: +0.5, 0, 0, -0.2
    deltas = np.array([ex.ad[ex.gold] - ex.base[ex.gold] for ex in CHOICE_EXAMPLES])
    assert deltas.tolist() == pytest.approx([0.5, 0.0, 0.0, -0.2])
    assert comparison["gold_logprob_delta"] == pytest.approx(0.075)
    rng = np.random.default_rng(BOOTSTRAP_SEED)  # the bootstrap, written out: resample the 4 examples
    means = deltas[rng.integers(0, 4, size=(BOOTSTRAP_SAMPLES, 4))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    assert (comparison["gold_logprob_delta_ci_low"], comparison["gold_logprob_delta_ci_high"]) == pytest.approx(
        (low, high))
    assert -0.2 <= low < 0.075 < high <= 0.5


def test_a_perplexity_runs_report_against_a_hand_computation(any_db_url: str) -> None:
    (run_id,) = _db(any_db_url, store_perplexity_run)
    report = _report(any_db_url, run_id)
    assert report["task"] == "perplexity"
    size = sum(len(text.encode("utf-8")) for text, _, _ in DOCUMENTS)
    words = 3 + 2 + 6
    assert size == 13 + 13 + 11  # é and ö are two bytes each
    for variant, ll in zip(report["variants"], (-45.0, -42.0)):
        assert set(variant) == VARIANT_KEYS | PERPLEXITY_VARIANT_KEYS
        assert variant["documents"] == 3 and variant["accuracy"] is None and variant["n"] == 0
        assert variant["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-12)
        assert variant["byte_perplexity"] == pytest.approx(math.exp(-ll / size), rel=1e-12)
        assert variant["bits_per_byte"] == pytest.approx(-ll / size / LN2, rel=1e-12)
    (comparison,) = report["comparisons"]
    assert set(comparison) == COMPARISON_KEYS | PERPLEXITY_COMPARISON_KEYS
    assert comparison["changed"] is None and comparison["mcnemar_p"] is None and comparison["delta"] is None
    delta = comparison["bits_per_byte_delta"]
    assert delta == pytest.approx(-3 / size / LN2) and delta < 0  # the adapter's 3 nats fewer: better
    assert delta == pytest.approx(report["variants"][1]["bits_per_byte"] - report["variants"][0]["bits_per_byte"])
    ll = np.array([[b, a] for _, b, a in DOCUMENTS])  # [documents, (base, ad)]
    sizes = np.array([len(text.encode("utf-8")) for text, _, _ in DOCUMENTS])
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, 3, size=(BOOTSTRAP_SAMPLES, 3))
    bpb = -ll[idx].sum(axis=1) / sizes[idx].sum(axis=1)[:, None] / LN2  # [samples, (base, ad)]
    low, high = np.percentile(bpb[:, 1] - bpb[:, 0], [2.5, 97.5])
    assert (comparison["bits_per_byte_delta_ci_low"], comparison["bits_per_byte_delta_ci_high"]) == pytest.approx(
        (low, high))
    assert low < delta < high


def test_the_text_reports_show_each_tasks_figures(sqlite_url: str) -> None:
    choice, perplexity = _db(sqlite_url, store_choice_run, store_perplexity_run)
    text = _cli(sqlite_url, "report", str(choice))
    assert "acc_norm" in text and "gold logprob delta" in text and "McNemar p" in text
    assert "50.0% (2/4)" in text and "75.0% (3/4)" in text and "+0.0750" in text
    text = _cli(sqlite_url, "report", str(perplexity))
    assert "bits per byte" in text and "word perplexity" in text and "McNemar" not in text
    assert f"{45 / 37 / LN2:.4f}" in text and f"{-3 / 37 / LN2:+.4f}" in text and "no references" not in text


def test_compare_pairs_two_choice_runs_on_acc_and_acc_norm(sqlite_url: str) -> None:
    first, second = _db(sqlite_url, store_choice_run, store_choice_run)
    got = json.loads(_cli(sqlite_url, "compare", str(first), str(second), "--variant-a", "base", "--variant-b",
                          ADAPTER, "--format", "json"))
    report = _report(sqlite_url, first)["comparisons"][0]
    assert got["task"] == "choice"
    for key in (*PAIRED_KEYS, "changed", "acc_norm", "gold_logprob_delta", "gold_logprob_delta_ci_low"):
        assert got[key] == report[key], key
    text = _cli(sqlite_url, "compare", str(first), str(second), "--variant-a", "base", "--variant-b", ADAPTER)
    assert text.startswith(f"compares {second}:{ADAPTER} against {first}:base") and "acc_norm" in text


def test_compare_pairs_two_perplexity_runs_on_bits_per_byte(sqlite_url: str) -> None:
    first, second = _db(sqlite_url, store_perplexity_run, store_perplexity_run)
    got = json.loads(_cli(sqlite_url, "compare", str(first), str(second), "--variant-a", "base", "--variant-b",
                          ADAPTER, "--format", "json"))
    report = _report(sqlite_url, first)["comparisons"][0]
    assert got["task"] == "perplexity" and got["paired"] == 3
    for key in PERPLEXITY_COMPARISON_KEYS:
        assert got[key] == report[key], key
    text = _cli(sqlite_url, "compare", str(first), str(second), "--variant-a", "base", "--variant-b", ADAPTER)
    assert text.startswith(f"compares {second}:{ADAPTER} against {first}:base") and "McNemar" not in text
    assert f"{-3 / 37 / LN2:+.4f}" in text


def test_the_views_show_base_beside_each_variant(any_db_url: str) -> None:
    choice, perplexity = _db(any_db_url, store_choice_run, store_perplexity_run)
    rows = run_readonly(any_db_url, "SELECT example_idx, variant, choice_idx, choice, is_gold, logprob, chars, "
                                    f"base_logprob, delta_logprob FROM choice_scores WHERE run_id = {choice} "
                                    "ORDER BY example_idx, variant, choice_idx").records()
    assert len(rows) == 2 * sum(len(ex.choices) for ex in CHOICE_EXAMPLES)
    expected = []
    for i, ex in enumerate(CHOICE_EXAMPLES):
        for variant, logprobs in (("ad", ex.ad), ("base", ex.base)):
            expected += [(i, variant, c, choice_text, c == ex.gold, lp, len(choice_text), ex.base[c], lp - ex.base[c])
                         for c, (choice_text, lp) in enumerate(zip(ex.choices, logprobs))]
    got = [(r["example_idx"], r["variant"], r["choice_idx"], r["choice"], bool(r["is_gold"]), r["logprob"], r["chars"],
            r["base_logprob"], r["delta_logprob"]) for r in rows]
    assert [g[:5] + g[6:7] for g in got] == [e[:5] + e[6:7] for e in expected]
    assert [x for g in got for x in (g[5], *g[7:])] == pytest.approx([x for e in expected for x in (e[5], *e[7:])])
    rows = run_readonly(any_db_url, "SELECT example_idx, variant, nll, bytes, words, bits_per_byte, base_nll, "
                                    "delta_nll, base_bits_per_byte, delta_bits_per_byte FROM document_scores "
                                    f"WHERE run_id = {perplexity} ORDER BY example_idx, variant").records()
    assert [(r["example_idx"], r["variant"]) for r in rows] == [(i, v) for i in range(3) for v in ("ad", "base")]
    for r in rows:
        text, base, ad = DOCUMENTS[r["example_idx"]]
        ll = ad if r["variant"] == ADAPTER else base
        size = len(text.encode("utf-8"))
        assert (r["nll"], r["bytes"], r["base_nll"]) == (-ll, size, -base)
        assert r["bits_per_byte"] == pytest.approx(-ll / size / LN2)
        assert r["base_bits_per_byte"] == pytest.approx(-base / size / LN2)
        assert r["delta_nll"] == pytest.approx(base - ll)  # adapter nll minus base nll
        assert r["delta_bits_per_byte"] == pytest.approx(r["bits_per_byte"] - r["base_bits_per_byte"])
    assert run_readonly(any_db_url, f"SELECT * FROM document_scores WHERE run_id = {choice}").rows == []
    assert run_readonly(any_db_url, f"SELECT * FROM choice_scores WHERE run_id = {perplexity}").rows == []


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(page: Path, tmp_path: Path) -> str:
    """The page's DOM after headless Chromium ran its script, which must have ended without an error."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    dom = subprocess.run([browser, *flags, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    assert "data-errors" not in dom  # and window.onerror saw nothing
    return dom


@pytest.mark.parametrize("store", [store_choice_run, store_perplexity_run], ids=["choice", "perplexity"])
def test_the_html_report_renders_in_headless_chromium(store, sqlite_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (run_id,) = _db(sqlite_url, store)
    page = tmp_path / "report.html"
    _cli(sqlite_url, "report", str(run_id), "--html", str(page))
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    data = json.loads(text.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    assert data == _report(sqlite_url, run_id)
    dom = rendered_dom(page, tmp_path)
    if store is store_choice_run:
        assert "acc_norm" in dom and dom.count("<tr data-variant=") == 3  # examples 0, 2, 3 changed answer
    else:
        assert "bits per byte" in dom and dom.count("<tr data-variant=") == 3  # one row per document
        assert f"{-3 / 37 / LN2:+.4f}" in dom


def _doc_query(marker: str) -> str:
    from tests.test_doc_sql import examples

    (query,) = [q for where, q in examples() if where == "docs/sql.md" and marker in q]
    return query


def test_the_docs_sql_gives_the_reports_figures(any_db_url: str) -> None:
    choice, perplexity = _db(any_db_url, store_choice_run, store_perplexity_run)
    rows = run_readonly(any_db_url, _doc_query("AS acc_norm").replace("run_id = 1", f"run_id = {choice}")).records()
    assert [(r["variant"], r["examples"], float(r["acc"]), float(r["acc_norm"])) for r in rows] == [
        (ADAPTER, 4, 0.25, 0.75), ("base", 4, 0.5, 0.75)]  # the ties go to the first choice, as in the report
    query = _doc_query("AS bits_per_byte").replace("run_id = 1", f"run_id = {perplexity}")
    rows = run_readonly(any_db_url, query).records()
    assert [r["variant"] for r in rows] == [ADAPTER, "base"]
    assert [float(r["bits_per_byte"]) for r in rows] == pytest.approx([42 / 37 / LN2, 45 / 37 / LN2])
    assert [math.exp(float(r["nll_per_word"])) for r in rows] == pytest.approx(
        [v["word_perplexity"] for v in reversed(_report(any_db_url, perplexity)["variants"])])
