"""Reports: per-variant scores with Wilson intervals, and paired comparisons against a baseline.

Built from the side-by-side records of `db.outputs.side_by_side`; `compare` pairs two variants
that may come from two runs on the same dataset. The JSON shape is a public contract. A choice or
perplexity run's figures come from its stored scores (`producer.loglik_report`): for choice, the
scores and paired statistics here are those of `acc`, computed from the scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from db.enums import BASE_VARIANT
from db.outputs import SideBySide, VariantCell

from .loglik_report import ChoiceComparison, LoglikReport, PerplexityComparison, Task
from .stats import mcnemar_exact, paired_bootstrap, wilson

Records = Sequence[SideBySide]


@dataclass(frozen=True)
class VariantStats:
    variant: str
    rows: int
    n: int  # rows with a score
    correct: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    mean_tokens: float | None
    lengths: list[int] = field(default_factory=list)  # output tokens, for the length distribution

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "ci_low": self.ci_low, "ci_high": self.ci_high}


@dataclass(frozen=True)
class Comparison:
    variant: str  # the candidate
    baseline: str
    paired: int  # examples where both have an output
    scored: int  # ... and a score
    wins: int  # candidate right, baseline wrong
    losses: int
    ties: int
    mcnemar_p: float | None
    delta: float | None
    delta_ci_low: float | None
    delta_ci_high: float | None
    changed: float | None  # share of paired outputs that differ at all

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "wins": self.wins, "losses": self.losses, "ties": self.ties,
                "mcnemar_p": self.mcnemar_p, "delta": self.delta, "delta_ci_low": self.delta_ci_low,
                "delta_ci_high": self.delta_ci_high, "changed": self.changed}


@dataclass(frozen=True)
class Verified:
    """The latest `lora-compare verify` of one variant: sampled rows that plain PEFT reproduced."""

    variant: str
    sampled: int
    agreed: int
    device: str
    dtype: str

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.sampled if self.sampled else None

    def to_json(self) -> dict[str, Any]:
        return {"sampled": self.sampled, "agreed": self.agreed, "agreement": self.agreement, "device": self.device,
                "dtype": self.dtype}


@dataclass(frozen=True)
class Report:
    run_id: int
    variants: list[VariantStats]
    comparisons: list[Comparison]
    has_scores: bool
    rows_per_s: float | None = None
    tokens_per_s: float | None = None
    verified: dict[str, Verified] = field(default_factory=dict)  # variant -> its latest verification, if any
    loglik: LoglikReport | None = None  # a choice or perplexity run's figures

    def to_json(self) -> dict[str, Any]:
        variants = []
        for v in self.variants:
            data = v.to_json()
            if v.variant in self.verified:
                data["verified"] = self.verified[v.variant].to_json()
            if self.loglik:
                data.update(self.loglik.variant_json(v.variant))
            variants.append(data)
        comparisons = [c.to_json() | (self.loglik.comparison_json(c.variant) if self.loglik else {})
                       for c in self.comparisons]
        if self.loglik is None:
            return {"run_id": self.run_id, "variants": variants, "comparisons": comparisons}
        return {"run_id": self.run_id, "task": self.loglik.task.value, "variants": variants,
                "comparisons": comparisons}


def _cells(records: Records, variant: str) -> dict[int, VariantCell]:
    return {r["example_idx"]: r["variants"][variant] for r in records if variant in r["variants"]}


def variant_stats(records: Records, variant: str) -> VariantStats:
    cells = list(_cells(records, variant).values())
    scored = [c for c in cells if c["correct"] is not None]
    correct = sum(1 for c in scored if c["correct"])
    lengths = [int(c["output_tokens"]) for c in cells]
    accuracy = low = high = None
    if scored:
        low, high = wilson(correct, len(scored))
        accuracy = correct / len(scored)
    return VariantStats(variant, len(cells), len(scored), correct, accuracy, low, high,
                        sum(lengths) / len(lengths) if lengths else None, lengths)


def compare_cells(baseline: Mapping[int, VariantCell], candidate: Mapping[int, VariantCell], *,
                  baseline_name: str, candidate_name: str) -> Comparison:
    """Paired statistics of `candidate` against `baseline` over the examples both have."""
    common = sorted(set(baseline) & set(candidate))
    changed = sum(1 for i in common if baseline[i]["output"] != candidate[i]["output"])
    both = [i for i in common if baseline[i]["correct"] is not None and candidate[i]["correct"] is not None]
    wins = sum(1 for i in both if candidate[i]["correct"] and not baseline[i]["correct"])
    losses = sum(1 for i in both if baseline[i]["correct"] and not candidate[i]["correct"])
    ties = len(both) - wins - losses
    if both:
        delta, low, high = paired_bootstrap(wins, losses, ties)
        p: float | None = mcnemar_exact(wins, losses)
    else:
        delta = low = high = p = None  # type: ignore[assignment]
    return Comparison(candidate_name, baseline_name, len(common), len(both), wins, losses, ties, p, delta, low, high,
                      changed / len(common) if common else None)


def build_report(run_id: int, records: Records, variants: Sequence[str], *, elapsed_s: float | None = None,
                 verified: Mapping[str, Verified] | None = None, loglik: LoglikReport | None = None) -> Report:
    stats = [variant_stats(records, v) for v in variants]
    base = _cells(records, BASE_VARIANT)
    comparisons = [compare_cells(base, _cells(records, v), baseline_name=BASE_VARIANT, candidate_name=v)
                   for v in variants if v != BASE_VARIANT]
    if loglik is not None:
        stats, comparisons = _with_loglik(loglik, stats, comparisons)
    rows = sum(s.rows for s in stats)
    tokens = sum(sum(s.lengths) for s in stats)
    rate = rows / elapsed_s if elapsed_s else None
    token_rate = tokens / elapsed_s if elapsed_s else None
    return Report(run_id, stats, comparisons, any(s.n for s in stats), rate, token_rate,
                  {v: verified[v] for v in variants if v in verified} if verified else {}, loglik)


def _with_loglik(loglik: LoglikReport, stats: list[VariantStats], comparisons: list[Comparison]
                 ) -> tuple[list[VariantStats], list[Comparison]]:
    """A choice run's scores and paired statistics are its `acc`'s (from the stored scores, so they
    agree with `acc_norm`'s by construction); a perplexity run has none, and no answers to change."""
    if loglik.task is Task.PERPLEXITY:
        return stats, [with_scores(c, loglik.perplexity_comparisons[c.variant]) for c in comparisons]
    new_stats = []
    for s in stats:
        acc = loglik.choice[s.variant].acc
        new_stats.append(replace(s, n=acc.n, correct=acc.correct, accuracy=acc.value, ci_low=acc.ci_low,
                                 ci_high=acc.ci_high))
    return new_stats, [with_scores(c, loglik.choice_comparisons[c.variant]) for c in comparisons]


def with_scores(comparison: Comparison, scored: ChoiceComparison | PerplexityComparison) -> Comparison:
    """`comparison` with the paired statistics of the stored scores: `acc`'s for choice; none for
    perplexity (nothing is right or wrong, and there is no answer to change)."""
    if isinstance(scored, PerplexityComparison):
        return replace(comparison, changed=None)
    a = scored.acc
    return replace(comparison, scored=scored.examples, wins=a.wins, losses=a.losses, ties=a.ties,
                   mcnemar_p=a.mcnemar_p, delta=a.delta, delta_ci_low=a.delta_ci_low, delta_ci_high=a.delta_ci_high,
                   changed=scored.changed)


def compare_runs(records_a: Records, variant_a: str, records_b: Records, variant_b: str, *, run_a: int,
                 run_b: int, scored: ChoiceComparison | PerplexityComparison | None = None) -> Comparison:
    """`variant_b` of run B against `variant_a` of run A; `scored`: the same pair's comparison from
    their stored scores (two choice or two perplexity runs), whose statistics then replace these."""
    comparison = compare_cells(_cells(records_a, variant_a), _cells(records_b, variant_b),
                               baseline_name=f"{run_a}:{variant_a}", candidate_name=f"{run_b}:{variant_b}")
    return comparison if scored is None else with_scores(comparison, scored)


# --- text -----------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def agreement_share(agreed: int, sampled: int) -> str:
    """`91.7%`; a whole percentage without decimals: `100%`; `-` when nothing was sampled."""
    if not sampled:
        return "-"
    share = 100 * agreed / sampled
    return f"{share:.0f}%" if share == round(share) else f"{share:.1f}%"


def agreement_text(agreed: int, sampled: int) -> str:
    """`11/12 (91.7%)`."""
    return f"{agreed}/{sampled} ({agreement_share(agreed, sampled)})"


def verified_line(report: Report) -> str | None:
    """`verified against plain PEFT: base 20/20 (100%), arith 19/20 (95%) on cpu, bfloat16`; None: never verified."""
    if not report.verified:
        return None
    items = list(report.verified.values())
    settings = {(v.device, v.dtype) for v in items}
    if len(settings) == 1:
        device, dtype = settings.pop()
        parts = ", ".join(f"{v.variant} {agreement_text(v.agreed, v.sampled)}" for v in items)
        return f"verified against plain PEFT: {parts} on {device}, {dtype}"
    parts = ", ".join(f"{v.variant} {agreement_text(v.agreed, v.sampled)} on {v.device}, {v.dtype}" for v in items)
    return f"verified against plain PEFT: {parts}"


def comparison_rows(comparisons: Sequence[Comparison]) -> tuple[list[str], list[list[Any]]]:
    columns = ["variant", "vs", "wins", "losses", "ties", "McNemar p", "delta", "95% CI", "changed"]
    rows = [[c.variant, c.baseline, c.wins, c.losses, c.ties, _p(c.mcnemar_p),
             "-" if c.delta is None else f"{c.delta:+.1%}",
             "-" if c.delta_ci_low is None else f"[{c.delta_ci_low:+.1%}, {c.delta_ci_high:+.1%}]",
             _pct(c.changed)] for c in comparisons]
    return columns, rows


def variant_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    columns = ["variant", "rows", "correct", "accuracy", "95% CI", "mean tokens"]
    rows = [[s.variant, s.rows, f"{s.correct}/{s.n}" if s.n else "-", _pct(s.accuracy),
             "-" if s.ci_low is None else f"[{s.ci_low:.1%}, {s.ci_high:.1%}]",
             "-" if s.mean_tokens is None else f"{s.mean_tokens:.1f}"] for s in report.variants]
    return columns, rows


Table = tuple[list[str], list[list[Any]]]


def _ci(low: float | None, high: float | None, spec: str) -> str:
    return "-" if low is None or high is None else f"[{low:{spec}}, {high:{spec}}]"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def choice_comparison_tables(comparisons: Sequence[ChoiceComparison]) -> list[Table]:
    """acc and acc_norm paired against the baseline; the gold answer's log-probability change."""
    paired = (["variant", "vs", "metric", "wins", "losses", "ties", "McNemar p", "delta", "95% CI"],
              [[c.variant, c.baseline, metric, p.wins, p.losses, p.ties, _p(p.mcnemar_p), _num(p.delta, "+.1%"),
                _ci(p.delta_ci_low, p.delta_ci_high, "+.1%")]
               for c in comparisons for metric, p in (("acc", c.acc), ("acc_norm", c.acc_norm))])
    gold = (["variant", "vs", "examples", "answers changed", "gold logprob delta", "95% CI"],
            [[c.variant, c.baseline, c.examples, _pct(c.changed), _num(c.gold_logprob_delta, "+.4f"),
              _ci(c.gold_logprob_delta_ci_low, c.gold_logprob_delta_ci_high, "+.4f")] for c in comparisons])
    return [paired, gold]


def perplexity_comparison_table(comparisons: Sequence[PerplexityComparison]) -> Table:
    """The change in bits per byte against the baseline, with the documents that got better or worse."""
    return (["variant", "vs", "documents", "better", "worse", "bits per byte delta", "95% CI"],
            [[c.variant, c.baseline, c.documents, c.better, c.worse, _num(c.bits_per_byte_delta, "+.4f"),
              _ci(c.bits_per_byte_delta_ci_low, c.bits_per_byte_delta_ci_high, "+.4f")] for c in comparisons])


def choice_tables(report: Report, loglik: LoglikReport) -> list[Table]:
    """A choice run: acc and acc_norm per variant, then each adapter against base."""
    variants = (["variant", "rows", "acc", "95% CI", "acc_norm", "95% CI"],
                [[s.variant, s.rows, f"{_pct(c.acc.value)} ({c.acc.correct}/{c.acc.n})", _ci(c.acc.ci_low,
                  c.acc.ci_high, ".1%"), f"{_pct(c.acc_norm.value)} ({c.acc_norm.correct}/{c.acc_norm.n})",
                  _ci(c.acc_norm.ci_low, c.acc_norm.ci_high, ".1%")]
                 for s in report.variants for c in [loglik.choice[s.variant]]])
    comparisons = [loglik.choice_comparisons[c.variant] for c in report.comparisons]
    return [variants, *choice_comparison_tables(comparisons)] if comparisons else [variants]


def perplexity_tables(report: Report, loglik: LoglikReport) -> list[Table]:
    """A perplexity run: the harness's three figures per variant, then each adapter's change in bits per byte."""
    variants = (["variant", "documents", "word perplexity", "byte perplexity", "bits per byte"],
                [[p.variant, p.documents, _num(p.word_perplexity, ".4f"), _num(p.byte_perplexity, ".4f"),
                  _num(p.bits_per_byte, ".4f")] for s in report.variants for p in [loglik.perplexity[s.variant]]])
    comparisons = [loglik.perplexity_comparisons[c.variant] for c in report.comparisons]
    return [variants, perplexity_comparison_table(comparisons)] if comparisons else [variants]


def report_tables(report: Report) -> list[Table]:
    """The tables `lora-compare report` prints, in order, for the run's task."""
    if report.loglik is None:
        return [variant_rows(report)] + ([comparison_rows(report.comparisons)] if report.comparisons else [])
    if report.loglik.task is Task.CHOICE:
        return choice_tables(report, report.loglik)
    return perplexity_tables(report, report.loglik)
