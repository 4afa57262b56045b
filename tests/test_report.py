"""Reports built from side-by-side records (no database, no model)."""

from __future__ import annotations

from typing import Any

from producer.html_report import render_html, word_diff
from producer.report import build_report


def _record(idx: int, cells: dict[str, tuple[str, bool | None]]) -> dict[str, Any]:
    return {"example_idx": idx, "prompt": f"p{idx}", "reference": None,
            "variants": {v: {"output": o, "correct": c, "prediction": o, "finish_reason": "eos",
                             "output_tokens": len(o.split())} for v, (o, c) in cells.items()}}


def test_a_run_without_references_reports_changes_and_lengths_but_no_scores() -> None:
    records = [_record(0, {"base": ("a b", None), "ad": ("a b", None)}),
               _record(1, {"base": ("a b c", None), "ad": ("x", None)})]
    report = build_report(7, records, ["base", "ad"])
    assert not report.has_scores
    assert report.to_json()["variants"][1] == {"variant": "ad", "n": 0, "correct": 0, "accuracy": None,
                                               "ci_low": None, "ci_high": None}
    comparison = report.to_json()["comparisons"][0]
    assert comparison["changed"] == 0.5 and comparison["mcnemar_p"] is None and comparison["delta"] is None
    assert [v.mean_tokens for v in report.variants] == [2.5, 1.5]
    page = render_html(report, records, {"name": "n"})
    assert "has no scores" in page and "<tr data-variant='ad'" in page


def test_scored_comparison_counts() -> None:
    records = [_record(0, {"base": ("1", False), "ad": ("2", True)}),
               _record(1, {"base": ("1", True), "ad": ("1", True)}),
               _record(2, {"base": ("1", True), "ad": ("3", False)}),
               _record(3, {"base": ("1", False), "ad": ("4", True)})]
    c = build_report(1, records, ["base", "ad"]).comparisons[0]
    assert (c.wins, c.losses, c.ties, c.changed) == (2, 1, 1, 0.75)
    assert c.delta == 0.25 and c.mcnemar_p == 1.0


def test_word_diff_marks_what_changed_and_escapes() -> None:
    old, new = word_diff("25 + 60 = 125 <b>", "25 + 60 = 85 <b>")
    assert old == "25 + 60 = <del>125</del> &lt;b&gt;"
    assert new == "25 + 60 = <ins>85</ins> &lt;b&gt;"
