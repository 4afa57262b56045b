"""The HTML report of a choice or perplexity run: the same self-contained page as a generate run's
(`producer.html_report`: its style, its filter script, no network), with the task's figures."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from db.enums import BASE_VARIANT

from .html_report import _CSS, _SCRIPT, _accuracy_svg, _disagreements, _wins_svg
from .loglik_report import ChoiceComparison, LoglikReport, Paired, PerplexityComparison, Task
from .report import Records, Report, _num, _p, _pct, verified_line

_BAR_W = 420  # px: the width of the largest bar
_EXCERPT = 240  # characters of a document shown in the document table


def _ci(low: float | None, high: float | None, spec: str) -> str:
    return "-" if low is None or high is None else f"{low:{spec}} – {high:{spec}}"


def _cells(*values: Any) -> str:
    return "".join(f"<td>{html.escape(str(v))}</td>" for v in values)


def _table(headers: Sequence[str], rows: Sequence[str], cls: str = "num") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _controls(adapters: Sequence[str], kinds: Sequence[tuple[str, str]]) -> str:
    """The filter row the page's script drives (ids q, variant, kind)."""
    options = "".join(f"<option>{html.escape(a)}</option>" for a in adapters)
    kind_options = "".join(f"<option value='{k}'>{html.escape(label)}</option>" for k, label in kinds)
    return (f"<div class='controls'><input id='q' type='search' placeholder='filter by text'>"
            f"<select id='variant'><option value=''>all adapters</option>{options}</select>"
            f"<select id='kind'>{kind_options}</select></div>")


# --- choice ---------------------------------------------------------------------------------------


def _paired_row(c: ChoiceComparison, metric: str, p: Paired) -> str:
    return "<tr>" + _cells(c.variant, metric, p.wins, p.losses, p.ties, _p(p.mcnemar_p), _num(p.delta, "+.1%"),
                           _ci(p.delta_ci_low, p.delta_ci_high, "+.1%")) + "</tr>"


def _choice_body(report: Report, loglik: LoglikReport, records: Records) -> str:
    adapters = [v.variant for v in report.variants if v.variant != BASE_VARIANT]
    norm_stats = [replace(s, correct=n.correct, n=n.n, accuracy=n.value, ci_low=n.ci_low, ci_high=n.ci_high)
                  for s in report.variants for n in [loglik.choice[s.variant].acc_norm]]
    vrows = [
        "<tr>" + _cells(s.variant, s.rows, f"{c.acc.correct}/{c.acc.n}", _pct(c.acc.value),
                        _ci(c.acc.ci_low, c.acc.ci_high, ".1%"), f"{c.acc_norm.correct}/{c.acc_norm.n}",
                        _pct(c.acc_norm.value), _ci(c.acc_norm.ci_low, c.acc_norm.ci_high, ".1%")) + "</tr>"
        for s in report.variants for c in [loglik.choice[s.variant]]]
    comparisons = [loglik.choice_comparisons[a] for a in adapters]
    prows = [_paired_row(c, metric, p) for c in comparisons for metric, p in (("acc", c.acc), ("acc_norm", c.acc_norm))]
    grows = ["<tr>" + _cells(c.variant, c.examples, _pct(c.changed), _num(c.gold_logprob_delta, "+.4f"),
                             _ci(c.gold_logprob_delta_ci_low, c.gold_logprob_delta_ci_high, "+.4f")) + "</tr>"
             for c in comparisons]
    norm_report = replace(report, comparisons=[
        replace(r, wins=c.acc_norm.wins, losses=c.acc_norm.losses, ties=c.acc_norm.ties)
        for r, c in zip(report.comparisons, comparisons)])
    diff_rows, n_diff = _disagreements(records, adapters)
    kinds = [("", "wins, losses and ties"), ("win", "wins"), ("loss", "losses"), ("tie", "same score")]
    return f"""
<p class="note">acc: the choice with the highest log-probability is the gold one. acc_norm: the same with each
log-probability divided by the choice's length in characters. lm-evaluation-harness's definitions (the first
choice wins a tie); intervals are 95% Wilson intervals.</p>
<h2>acc with 95% Wilson intervals</h2>
{_accuracy_svg(report.variants)}
<h2>acc_norm with 95% Wilson intervals</h2>
{_accuracy_svg(norm_stats)}
{_table(["variant", "rows", "acc correct", "acc", "95% CI", "acc_norm correct", "acc_norm", "95% CI"], vrows)}
<h2>Against the base model, on the same examples</h2>
<h3>acc: wins and losses</h3>
{_wins_svg(report)}
<h3>acc_norm: wins and losses</h3>
{_wins_svg(norm_report)}
{_table(["adapter", "metric", "wins", "losses", "ties", "exact McNemar p", "Δ", "95% paired bootstrap"], prows)}
<h3>The gold answer's log-probability (adapter minus base, mean over examples, nats)</h3>
{_table(["adapter", "examples", "answers changed", "mean Δ gold logprob", "95% paired bootstrap"], grows)}
<h2>Where an adapter and the base model choose differently (<span id="shown">{n_diff}</span> of {n_diff})</h2>
{_controls(adapters, kinds)}
<table id="diffs"><thead><tr><th>#</th><th>adapter</th><th>context</th><th>gold answer</th><th>base's choice</th>
<th>adapter's choice</th></tr></thead><tbody>{diff_rows}</tbody></table>"""


# --- perplexity -----------------------------------------------------------------------------------


def _bpb_svg(report: Report, loglik: LoglikReport) -> str:
    figures = [loglik.perplexity[s.variant] for s in report.variants]
    figures = [f for f in figures if f.bits_per_byte is not None]
    if not figures:
        return "<p class='note'>No document was scored.</p>"
    top = max(f.bits_per_byte or 0.0 for f in figures) or 1.0
    row_h, left = 34, 110
    parts = [f"<svg width='{left + _BAR_W + 120}' height='{row_h * len(figures) + 10}' role='img' "
             "aria-label='bits per byte'>"]
    for i, f in enumerate(figures):
        y = 6 + i * row_h
        cls = "base" if f.variant == BASE_VARIANT else "adapter"
        parts += [f"<text x='{left - 8}' y='{y + 17}' text-anchor='end' class='label'>{html.escape(f.variant)}</text>",
                  f"<rect x='{left}' y='{y}' width='{(f.bits_per_byte or 0) / top * _BAR_W:.1f}' height='22' "
                  f"class='{cls}'><title>{f.documents} documents</title></rect>",
                  f"<text x='{left + _BAR_W + 8}' y='{y + 17}' class='value'>{f.bits_per_byte:.4f}</text>"]
    parts.append("</svg>")
    return "".join(parts)


def _delta_svg(comparisons: Sequence[PerplexityComparison]) -> str:
    """Each adapter's change in bits per byte with its interval, around zero (left: better)."""
    shown = [c for c in comparisons if c.bits_per_byte_delta is not None]
    if not shown:
        return "<p class='note'>No paired documents.</p>"
    reach = max(max(abs(c.bits_per_byte_delta_ci_low or 0), abs(c.bits_per_byte_delta_ci_high or 0),
                    abs(c.bits_per_byte_delta or 0)) for c in shown) or 1.0
    half, left, row_h = 200, 110, 34
    mid = left + half
    parts = [f"<svg width='{left + 2 * half + 160}' height='{row_h * len(shown) + 14}' role='img' "
             "aria-label='change in bits per byte'>"]
    for i, c in enumerate(shown):
        y = 6 + i * row_h
        x = mid + (c.bits_per_byte_delta or 0) / reach * half
        lo = mid + (c.bits_per_byte_delta_ci_low or 0) / reach * half
        hi = mid + (c.bits_per_byte_delta_ci_high or 0) / reach * half
        cls = "win" if (c.bits_per_byte_delta or 0) < 0 else "loss"
        parts += [f"<text x='{left - 8}' y='{y + 17}' text-anchor='end' class='label'>{html.escape(c.variant)}</text>",
                  f"<line x1='{lo:.1f}' x2='{hi:.1f}' y1='{y + 11}' y2='{y + 11}' class='ci'/>",
                  f"<rect x='{x - 5:.1f}' y='{y + 6}' width='10' height='10' class='{cls}'><title>"
                  f"{c.bits_per_byte_delta:+.4f} bits per byte</title></rect>",
                  f"<text x='{left + 2 * half + 8}' y='{y + 17}' class='value'>{c.bits_per_byte_delta:+.4f}</text>"]
    parts.append(f"<line x1='{mid}' x2='{mid}' y1='0' y2='{row_h * len(shown) + 8}' class='axis'/></svg>")
    return "".join(parts)


def _document_rows(records: Records, loglik: LoglikReport, adapters: Sequence[str]) -> list[str]:
    base = loglik.documents.get(BASE_VARIANT, {})
    rows = []
    for r in records:
        old = base.get(r["example_idx"])
        for name in adapters:
            new = loglik.documents.get(name, {}).get(r["example_idx"])
            if old is None or new is None or old.bits_per_byte is None or new.bits_per_byte is None:
                continue
            kind = "win" if new.logprob > old.logprob else "loss" if new.logprob < old.logprob else "tie"
            text = r["prompt"] if len(r["prompt"]) <= _EXCERPT else r["prompt"][:_EXCERPT] + "…"
            search = html.escape(r["prompt"].lower(), quote=True)
            rows.append(f"<tr data-variant='{html.escape(name, quote=True)}' data-kind='{kind}' "
                        f"data-search='{search}'><td>{r['example_idx']}</td><td>{html.escape(name)}</td>"
                        f"<td class='prompt'>{html.escape(text)}</td>"
                        + _cells(old.bytes, f"{old.bits_per_byte:.4f}", f"{new.bits_per_byte:.4f}",
                                 f"{new.bits_per_byte - old.bits_per_byte:+.4f}") + "</tr>")
    return rows


def _perplexity_body(report: Report, loglik: LoglikReport, records: Records) -> str:
    adapters = [v.variant for v in report.variants if v.variant != BASE_VARIANT]
    vrows = ["<tr>" + _cells(f.variant, f.documents, _num(f.word_perplexity, ".4f"), _num(f.byte_perplexity, ".4f"),
                             _num(f.bits_per_byte, ".4f")) + "</tr>"
             for s in report.variants for f in [loglik.perplexity[s.variant]]]
    comparisons = [loglik.perplexity_comparisons[a] for a in adapters]
    crows = ["<tr>" + _cells(c.variant, c.documents, c.better, c.worse, _num(c.bits_per_byte_delta, "+.4f"),
                             _ci(c.bits_per_byte_delta_ci_low, c.bits_per_byte_delta_ci_high, "+.4f")) + "</tr>"
             for c in comparisons]
    docs = _document_rows(records, loglik, adapters)
    kinds = [("", "better, worse and same"), ("win", "fewer bits per byte"), ("loss", "more bits per byte"),
             ("tie", "same")]
    return f"""
<p class="note">lm-evaluation-harness's figures, summed over documents: word perplexity = exp(−Σ loglikelihood /
Σ words), byte perplexity = exp(−Σ loglikelihood / Σ bytes), bits per byte = −Σ loglikelihood / Σ bytes / ln 2.
Lower is better.</p>
<h2>Bits per byte</h2>
{_bpb_svg(report, loglik)}
{_table(["variant", "documents", "word perplexity", "byte perplexity", "bits per byte"], vrows)}
<h2>Against the base model, document by document</h2>
{_delta_svg(comparisons)}
{_table(["adapter", "documents", "better", "worse", "Δ bits per byte", "95% paired bootstrap"], crows)}
<h2>Documents (<span id="shown">{len(docs)}</span> of {len(docs)})</h2>
{_controls(adapters, kinds)}
<table id="diffs"><thead><tr><th>#</th><th>adapter</th><th>text</th><th>bytes</th><th>base bits per byte</th>
<th>adapter bits per byte</th><th>Δ</th></tr></thead><tbody>{''.join(docs)}</tbody></table>"""


def render_loglik_html(report: Report, records: Records, meta: dict[str, Any]) -> str:
    """The page of a choice or perplexity run (`report.loglik` set)."""
    loglik = report.loglik
    if loglik is None:
        raise ValueError("render_loglik_html needs a choice or perplexity report")
    body = (_choice_body if loglik.task is Task.CHOICE else _perplexity_body)(report, loglik, records)
    speed = f" · {report.rows_per_s:.1f} rows/s" if report.rows_per_s else ""
    line = verified_line(report)
    verified = "" if line is None else f"<p class='note' id='verified'>{html.escape(line)}</p>"
    title = f"lora-compare report: run {report.run_id} ({meta.get('name', '')})"
    data = json.dumps(report.to_json()).replace("</", "<\\/")  # safe inside <script>
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">task {loglik.task.value} · status {html.escape(str(meta.get('status', '')))} · base model
 {html.escape(str(meta.get('base', '')))} · dataset {html.escape(str(meta.get('dataset', '')))} ·
 {meta.get('examples', 0)} examples{speed}</div>
{body}
{verified}
<script>{_SCRIPT}</script>
<script type="application/json" id="report-data">{data}</script>
</body></html>
"""
