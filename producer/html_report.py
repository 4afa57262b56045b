"""The HTML report: one self-contained file (inline SVG, CSS and script; nothing from the network)."""

from __future__ import annotations

import difflib
import html
import json
import re
from collections.abc import Sequence
from typing import Any

from db.enums import BASE_VARIANT

from .report import Records, Report, VariantStats, _p, _pct, verified_line

_TOKENS = re.compile(r"(\s+)")
_BAR_W = 420  # px: the width of a 100% bar


def word_diff(old: str, new: str) -> tuple[str, str]:
    """HTML of `old` with removed words in <del> and of `new` with added words in <ins>."""
    a, b = _TOKENS.split(old), _TOKENS.split(new)
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        old_part, new_part = html.escape("".join(a[i1:i2])), html.escape("".join(b[j1:j2]))
        if op == "equal":
            left.append(old_part)
            right.append(new_part)
        else:
            if old_part:
                left.append(f"<del>{old_part}</del>")
            if new_part:
                right.append(f"<ins>{new_part}</ins>")
    return "".join(left), "".join(right)


def _accuracy_svg(variants: Sequence[VariantStats]) -> str:
    scored = [v for v in variants if v.accuracy is not None]
    if not scored:
        return "<p class='note'>This run has no references, so no scores.</p>"
    row_h, left = 34, 110
    height = row_h * len(scored) + 30
    parts = [f"<svg width='{left + _BAR_W + 120}' height='{height}' role='img' aria-label='accuracy'>"]
    for i, v in enumerate(scored):
        y = 10 + i * row_h
        w = (v.accuracy or 0) * _BAR_W
        lo, hi = left + (v.ci_low or 0) * _BAR_W, left + (v.ci_high or 0) * _BAR_W
        cls = "base" if v.variant == BASE_VARIANT else "adapter"
        parts += [
            f"<text x='{left - 8}' y='{y + 17}' text-anchor='end' class='label'>{html.escape(v.variant)}</text>",
            f"<rect x='{left}' y='{y}' width='{w:.1f}' height='22' class='{cls}'><title>{v.correct}/{v.n}</title></rect>",
            f"<line x1='{lo:.1f}' x2='{hi:.1f}' y1='{y + 11}' y2='{y + 11}' class='ci'/>",
            f"<line x1='{lo:.1f}' x2='{lo:.1f}' y1='{y + 5}' y2='{y + 17}' class='ci'/>",
            f"<line x1='{hi:.1f}' x2='{hi:.1f}' y1='{y + 5}' y2='{y + 17}' class='ci'/>",
            f"<text x='{left + _BAR_W + 8}' y='{y + 17}' class='value'>{_pct(v.accuracy)} "
            f"({v.correct}/{v.n})</text>",
        ]
    axis_y = 10 + len(scored) * row_h
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * _BAR_W
        parts.append(f"<text x='{x:.0f}' y='{axis_y + 12}' text-anchor='middle' class='tick'>{tick:.0%}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _wins_svg(report: Report) -> str:
    comps = [c for c in report.comparisons if c.scored]
    if not comps:
        return "<p class='note'>No paired scores.</p>"
    biggest = max(max(c.wins, c.losses) for c in comps) or 1
    half, left, row_h = 200, 110, 34
    parts = [f"<svg width='{left + 2 * half + 140}' height='{row_h * len(comps) + 14}' role='img' "
             "aria-label='wins and losses'>"]
    mid = left + half
    for i, c in enumerate(comps):
        y = 6 + i * row_h
        lw, ww = c.losses / biggest * half, c.wins / biggest * half
        parts += [
            f"<text x='{left - 8}' y='{y + 17}' text-anchor='end' class='label'>{html.escape(c.variant)}</text>",
            f"<rect x='{mid - lw:.1f}' y='{y}' width='{lw:.1f}' height='22' class='loss'><title>{c.losses} "
            "losses</title></rect>",
            f"<rect x='{mid}' y='{y}' width='{ww:.1f}' height='22' class='win'><title>{c.wins} wins</title></rect>",
            f"<text x='{left + 2 * half + 8}' y='{y + 17}' class='value'>+{c.wins} / -{c.losses} "
            f"({c.ties} ties)</text>",
        ]
    parts.append(f"<line x1='{mid}' x2='{mid}' y1='0' y2='{row_h * len(comps) + 8}' class='axis'/></svg>")
    return "".join(parts)


def _lengths_svg(variants: Sequence[VariantStats]) -> str:
    longest = max((max(v.lengths) for v in variants if v.lengths), default=1)
    bins = min(20, max(1, longest))
    width = max(1.0, longest / bins)
    cells = []
    for v in variants:
        counts = [0] * bins
        for n in v.lengths:
            counts[min(bins - 1, int(n // width))] += 1
        top = max(counts) or 1
        bars = "".join(
            f"<rect x='{i * 12}' y='{60 - c / top * 56:.1f}' width='10' height='{c / top * 56:.1f}' "
            f"class='{'base' if v.variant == BASE_VARIANT else 'adapter'}'><title>{c} outputs of "
            f"{i * width:.0f}-{(i + 1) * width:.0f} tokens</title></rect>" for i, c in enumerate(counts))
        mean = "-" if v.mean_tokens is None else f"{v.mean_tokens:.1f}"
        cells.append(f"<figure><svg width='{bins * 12}' height='62' role='img' aria-label='lengths'>{bars}"
                     f"</svg><figcaption>{html.escape(v.variant)}: mean {mean} tokens</figcaption></figure>")
    return f"<div class='lengths'>{''.join(cells)}</div>"


def _mark(correct: bool | None) -> str:
    return "" if correct is None else ("<span class='ok'>✓</span>" if correct else "<span class='bad'>✗</span>")


def _disagreements(records: Records, adapters: Sequence[str]) -> tuple[str, int]:
    rows = []
    for r in records:
        base = r["variants"].get(BASE_VARIANT)
        if base is None:
            continue
        for name in adapters:
            cell = r["variants"].get(name)
            if cell is None or cell["output"] == base["output"]:
                continue
            kind = "tie"
            if cell["correct"] is not None and base["correct"] is not None and cell["correct"] != base["correct"]:
                kind = "win" if cell["correct"] else "loss"
            old, new = word_diff(base["output"], cell["output"])
            search = html.escape(f"{r['prompt']} {base['output']} {cell['output']}".lower(), quote=True)
            rows.append(
                f"<tr data-variant='{html.escape(name, quote=True)}' data-kind='{kind}' data-search='{search}'>"
                f"<td>{r['example_idx']}</td><td>{html.escape(name)}</td><td class='prompt'>"
                f"{html.escape(r['prompt'])}</td><td>{html.escape(r['reference'] or '')}</td>"
                f"<td class='out'>{_mark(base['correct'])} {old}</td><td class='out'>{_mark(cell['correct'])} {new}"
                f"</td></tr>")
    return "".join(rows), len(rows)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#1d2430;
padding:0 16px}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;
padding-bottom:4px}.meta{color:#5b6675}.note{color:#5b6675;font-style:italic}table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #e6eaf0;padding:5px 8px;text-align:left;vertical-align:top}th{background:#f4f6f9}
td.out{font-family:ui-monospace,Menlo,monospace;font-size:12.5px;white-space:pre-wrap;max-width:360px}
td.prompt{max-width:260px}del{background:#ffd7d5;text-decoration:line-through}ins{background:#cdf4d3;
text-decoration:none}.ok{color:#1a7f37;font-weight:bold}.bad{color:#cf222e;font-weight:bold}
rect.base{fill:#8c96a5}rect.adapter{fill:#3d7bd9}rect.win{fill:#2da44e}rect.loss{fill:#e5534b}
line.ci{stroke:#1d2430;stroke-width:1.5}line.axis{stroke:#5b6675}text.label{font-size:13px}
text.value{font-size:12px;fill:#3a4350}text.tick{font-size:11px;fill:#5b6675}.lengths{display:flex;
flex-wrap:wrap;gap:24px}figure{margin:0}figcaption{font-size:12px;color:#5b6675}.controls{display:flex;
gap:12px;margin:8px 0}.controls input{flex:1;padding:4px 8px}.num td{text-align:right}.num td:first-child{text-align:left}
"""

_SCRIPT = """
window.onerror=function(m){document.body.dataset.errors=(document.body.dataset.errors||'')+m+';'};
(function(){var q=document.getElementById('q'),v=document.getElementById('variant'),
k=document.getElementById('kind'),rows=document.querySelectorAll('#diffs tbody tr'),
shown=document.getElementById('shown');
function apply(){var text=q.value.toLowerCase(),n=0;rows.forEach(function(r){
var ok=(!v.value||r.dataset.variant===v.value)&&(!k.value||r.dataset.kind===k.value)&&
(!text||r.dataset.search.indexOf(text)>=0);r.style.display=ok?'':'none';if(ok)n++;});
shown.textContent=n;}
[q,v,k].forEach(function(e){e.addEventListener('input',apply);});apply();
document.body.dataset.ready='1';})();
"""


def render_html(report: Report, records: Records, meta: dict[str, Any]) -> str:
    adapters = [v.variant for v in report.variants if v.variant != BASE_VARIANT]
    columns_v = ["variant", "rows", "correct", "accuracy", "95% CI", "mean tokens"]
    vrows = "".join(
        f"<tr><td>{html.escape(s.variant)}</td><td>{s.rows}</td><td>{s.correct}/{s.n}</td>"
        f"<td>{_pct(s.accuracy)}</td><td>{'-' if s.ci_low is None else f'{s.ci_low:.1%} – {s.ci_high:.1%}'}</td>"
        f"<td>{'-' if s.mean_tokens is None else f'{s.mean_tokens:.1f}'}</td></tr>" for s in report.variants)
    crows = "".join(
        f"<tr><td>{html.escape(c.variant)}</td><td>{c.wins}</td><td>{c.losses}</td><td>{c.ties}</td>"
        f"<td>{_p(c.mcnemar_p)}</td><td>{'-' if c.delta is None else f'{c.delta:+.1%}'}</td>"
        f"<td>{'-' if c.delta_ci_low is None else f'{c.delta_ci_low:+.1%} – {c.delta_ci_high:+.1%}'}</td>"
        f"<td>{_pct(c.changed)}</td></tr>" for c in report.comparisons)
    diff_rows, n_diff = _disagreements(records, adapters)
    options = "".join(f"<option>{html.escape(a)}</option>" for a in adapters)
    speed = ""
    if report.rows_per_s:
        speed = f" · {report.rows_per_s:.1f} rows/s, {report.tokens_per_s:.0f} generated tokens/s"
    no_scores = "" if report.has_scores else "<p class='note'>This run has no references, so it has no scores: " \
        "the report shows how often and how much the outputs changed.</p>"
    line = verified_line(report)
    verified = "" if line is None else f"<p class='note' id='verified'>{html.escape(line)} (a sample of rows " \
        "regenerated one prompt at a time with plain transformers + PEFT by <code>lora-compare verify</code>).</p>"
    title = f"lora-compare report: run {report.run_id} ({meta.get('name', '')})"
    data = json.dumps(report.to_json()).replace("</", "<\\/")  # safe inside <script>
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">status {html.escape(str(meta.get('status', '')))} · base model {html.escape(str(meta.get('base', '')))}
 · dataset {html.escape(str(meta.get('dataset', '')))} · {meta.get('examples', 0)} examples{speed}</div>
{no_scores}
<h2>Accuracy with 95% Wilson intervals</h2>
{_accuracy_svg(report.variants)}
<table class="num"><thead><tr>{''.join(f'<th>{c}</th>' for c in columns_v)}</tr></thead><tbody>{vrows}</tbody>
</table>
{verified}
<h2>Against the base model, on the same examples</h2>
{_wins_svg(report)}
<table><thead><tr><th>adapter</th><th>wins</th><th>losses</th><th>ties</th><th>exact McNemar p</th>
<th>Δ accuracy</th><th>95% paired bootstrap</th><th>outputs changed</th></tr></thead><tbody>{crows}</tbody></table>
<h2>Output lengths</h2>
{_lengths_svg(report.variants)}
<h2>Where an adapter and the base model disagree (<span id="shown">{n_diff}</span> of {n_diff})</h2>
<div class="controls"><input id="q" type="search" placeholder="filter by text">
<select id="variant"><option value="">all adapters</option>{options}</select>
<select id="kind"><option value="">wins, losses and ties</option><option value="win">wins</option>
<option value="loss">losses</option><option value="tie">same score</option></select></div>
<table id="diffs"><thead><tr><th>#</th><th>adapter</th><th>prompt</th><th>reference</th><th>base output</th>
<th>adapter output</th></tr></thead><tbody>{diff_rows}</tbody></table>
<script>{_SCRIPT}</script>
<script type="application/json" id="report-data">{data}</script>
</body></html>
"""
