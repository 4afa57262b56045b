"""Reports of the log-likelihood tasks (`task: choice`, `task: perplexity`), from their stored scores
(`loglikelihoods`, `db.scores`).

The figures are lm-evaluation-harness's (`multiple_choice`, `loglikelihood_rolling`):
- choice: `acc` is the share of examples whose highest-log-probability choice is the gold one;
  `acc_norm` the same with each choice's log-probability divided by its length in characters (the
  harness's `np.argmax(lls / completion_len)`: numpy's argmax, so the first index wins a tie).
  Against base, both get the paired statistics of a generate run (wins, losses, McNemar, the
  difference with its paired bootstrap interval), and the gold answer's log-probability its mean
  change (adapter minus base, per example) with a paired bootstrap interval over examples.
- perplexity: sums over documents, `word_perplexity = exp(-sum ll / sum words)`, `byte_perplexity =
  exp(-sum ll / sum bytes)`, `bits_per_byte = -sum ll / sum bytes / ln 2`; against base, the change
  in bits per byte with a paired bootstrap interval over documents (each resample recomputes both
  aggregates). Nothing is right or wrong there, so there are no wins or McNemar tests.
The JSON keys are a public contract (DESIGN.md, "Log-likelihood tasks").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from db.enums import BASE_VARIANT
from db.scores import StoredScore

from .stats import bootstrap_mean, bootstrap_ratio_delta, mcnemar_exact, paired_bootstrap, wilson

LN2 = math.log(2)


class Task(str, Enum):
    """The run config's `task` values whose report this module makes."""

    CHOICE = "choice"
    PERPLEXITY = "perplexity"


# --- choice ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceCell:
    """One (example, variant) of a choice run: each choice's log-probability and length, the gold index."""

    logprobs: tuple[float, ...]  # by choice_idx
    chars: tuple[int, ...]  # len(choice), the harness's completion_len
    gold: int

    @property
    def pick(self) -> int:
        """The `acc` prediction: the first index of the largest log-probability."""
        import numpy as np

        return int(np.argmax(np.asarray(self.logprobs, dtype=np.float64)))

    @property
    def pick_norm(self) -> int:
        """The `acc_norm` prediction: numpy's argmax of log-probability / characters, as the harness computes it."""
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: what numpy makes of x / 0
            normed = np.asarray(self.logprobs, dtype=np.float64) / np.asarray(self.chars, dtype=np.float64)
        return int(np.argmax(normed))


@dataclass(frozen=True)
class Share:
    """A proportion with its 95% Wilson interval."""

    correct: int
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None

    @classmethod
    def of(cls, correct: int, n: int) -> Share:
        if not n:
            return cls(0, 0, None, None, None)
        low, high = wilson(correct, n)
        return cls(correct, n, correct / n, low, high)


@dataclass(frozen=True)
class Paired:
    """Paired statistics of a right/wrong score of a candidate against a baseline on the same examples."""

    wins: int  # candidate right, baseline wrong
    losses: int
    ties: int
    mcnemar_p: float | None
    delta: float | None  # candidate accuracy minus baseline's
    delta_ci_low: float | None
    delta_ci_high: float | None

    @classmethod
    def of(cls, baseline: Sequence[bool], candidate: Sequence[bool]) -> Paired:
        """From the two variants' scores of the same examples, in the same order."""
        wins = sum(1 for b, c in zip(baseline, candidate) if c and not b)
        losses = sum(1 for b, c in zip(baseline, candidate) if b and not c)
        ties = len(baseline) - wins - losses
        if not baseline:
            return cls(0, 0, 0, None, None, None, None)
        delta, low, high = paired_bootstrap(wins, losses, ties)
        return cls(wins, losses, ties, mcnemar_exact(wins, losses), delta, low, high)

    def to_json(self) -> dict[str, Any]:
        return {"wins": self.wins, "losses": self.losses, "ties": self.ties, "mcnemar_p": self.mcnemar_p,
                "delta": self.delta, "delta_ci_low": self.delta_ci_low, "delta_ci_high": self.delta_ci_high}


@dataclass(frozen=True)
class ChoiceVariant:
    """One variant's `acc` and `acc_norm`."""

    variant: str
    acc: Share
    acc_norm: Share

    def to_json(self) -> dict[str, Any]:
        return {"acc": self.acc.value, "acc_ci_low": self.acc.ci_low, "acc_ci_high": self.acc.ci_high,
                "acc_norm": self.acc_norm.value, "acc_norm_ci_low": self.acc_norm.ci_low,
                "acc_norm_ci_high": self.acc_norm.ci_high}


@dataclass(frozen=True)
class ChoiceComparison:
    """A candidate against a baseline on the examples both scored."""

    variant: str
    baseline: str
    examples: int
    acc: Paired
    acc_norm: Paired
    changed: float | None  # share of examples whose chosen answer differs
    gold_logprob_delta: float | None  # mean of (candidate - baseline) log-probability of the gold choice
    gold_logprob_delta_ci_low: float | None
    gold_logprob_delta_ci_high: float | None

    def to_json(self) -> dict[str, Any]:
        return {"acc_norm": self.acc_norm.to_json(), "gold_logprob_delta": self.gold_logprob_delta,
                "gold_logprob_delta_ci_low": self.gold_logprob_delta_ci_low,
                "gold_logprob_delta_ci_high": self.gold_logprob_delta_ci_high}


def choice_variant(variant: str, cells: Mapping[int, ChoiceCell]) -> ChoiceVariant:
    n = len(cells)
    return ChoiceVariant(variant, Share.of(sum(1 for c in cells.values() if c.pick == c.gold), n),
                         Share.of(sum(1 for c in cells.values() if c.pick_norm == c.gold), n))


def compare_choices(baseline: Mapping[int, ChoiceCell], candidate: Mapping[int, ChoiceCell], *, baseline_name: str,
                    candidate_name: str) -> ChoiceComparison:
    """Paired `acc`, `acc_norm` and gold log-probability of `candidate` against `baseline`."""
    common = sorted(set(baseline) & set(candidate))
    base, cand = [baseline[i] for i in common], [candidate[i] for i in common]
    acc = Paired.of([b.pick == b.gold for b in base], [c.pick == c.gold for c in cand])
    norm = Paired.of([b.pick_norm == b.gold for b in base], [c.pick_norm == c.gold for c in cand])
    changed = sum(1 for b, c in zip(base, cand) if b.pick != c.pick) / len(common) if common else None
    gold = [c.logprobs[c.gold] - b.logprobs[b.gold] for b, c in zip(base, cand)]
    delta = low = high = None
    if gold:
        delta, low, high = bootstrap_mean(gold)
    return ChoiceComparison(candidate_name, baseline_name, len(common), acc, norm, changed, delta, low, high)


def choice_cells(scores: Sequence[StoredScore], gold: Mapping[int, int | None]) -> dict[str, dict[int, ChoiceCell]]:
    """variant -> example -> its cell, from a run's scores and each example's gold index (examples
    without one are left out: nothing to score them against)."""
    grouped: dict[str, dict[int, list[StoredScore]]] = {}
    for s in scores:
        grouped.setdefault(s.variant, {}).setdefault(s.example_idx, []).append(s)
    out: dict[str, dict[int, ChoiceCell]] = {}
    for variant, examples in grouped.items():
        for idx, rows in examples.items():
            answer = gold.get(idx)
            if answer is None or not 0 <= answer < len(rows):
                continue
            rows.sort(key=lambda s: s.choice_idx)
            out.setdefault(variant, {})[idx] = ChoiceCell(tuple(s.logprob for s in rows),
                                                          tuple(s.chars for s in rows), answer)
    return out


# --- perplexity -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One document through one variant: its total log-likelihood and what it is divided by."""

    logprob: float
    tokens: int
    bytes: int
    words: int

    @property
    def bits_per_byte(self) -> float | None:
        return -self.logprob / self.bytes / LN2 if self.bytes else None


@dataclass(frozen=True)
class PerplexityVariant:
    """One variant's harness figures, summed over its documents."""

    variant: str
    documents: int
    word_perplexity: float | None
    byte_perplexity: float | None
    bits_per_byte: float | None

    @classmethod
    def of(cls, variant: str, docs: Sequence[Document]) -> PerplexityVariant:
        ll = sum(d.logprob for d in docs)
        words, size = sum(d.words for d in docs), sum(d.bytes for d in docs)
        return cls(variant, len(docs), math.exp(-ll / words) if words else None,
                   math.exp(-ll / size) if size else None, -ll / size / LN2 if size else None)

    def to_json(self) -> dict[str, Any]:
        return {"word_perplexity": self.word_perplexity, "byte_perplexity": self.byte_perplexity,
                "bits_per_byte": self.bits_per_byte, "documents": self.documents}


@dataclass(frozen=True)
class PerplexityComparison:
    """A candidate's bits per byte against a baseline's, on the documents both scored."""

    variant: str
    baseline: str
    documents: int
    better: int  # documents with fewer bits per byte than the baseline's
    worse: int
    bits_per_byte_delta: float | None  # candidate minus baseline, both aggregated over the common documents
    bits_per_byte_delta_ci_low: float | None
    bits_per_byte_delta_ci_high: float | None

    def to_json(self) -> dict[str, Any]:
        return {"bits_per_byte_delta": self.bits_per_byte_delta,
                "bits_per_byte_delta_ci_low": self.bits_per_byte_delta_ci_low,
                "bits_per_byte_delta_ci_high": self.bits_per_byte_delta_ci_high}


def compare_documents(baseline: Mapping[int, Document], candidate: Mapping[int, Document], *, baseline_name: str,
                      candidate_name: str) -> PerplexityComparison:
    common = sorted(set(baseline) & set(candidate))
    base, cand = [baseline[i] for i in common], [candidate[i] for i in common]
    better = sum(1 for b, c in zip(base, cand) if c.logprob > b.logprob)
    worse = sum(1 for b, c in zip(base, cand) if c.logprob < b.logprob)
    delta = low = high = None
    if sum(b.bytes for b in base):
        delta, low, high = bootstrap_ratio_delta([-c.logprob / LN2 for c in cand], [-b.logprob / LN2 for b in base],
                                                 [b.bytes for b in base])
    return PerplexityComparison(candidate_name, baseline_name, len(common), better, worse, delta, low, high)


def documents(scores: Sequence[StoredScore]) -> dict[str, dict[int, Document]]:
    """variant -> example -> its document's scores (the `choice_idx` 0 row of a perplexity run)."""
    out: dict[str, dict[int, Document]] = {}
    for s in scores:
        if s.choice_idx == 0:
            out.setdefault(s.variant, {})[s.example_idx] = Document(s.logprob, s.tokens, s.bytes, s.words or 0)
    return out


# --- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoglikReport:
    """What a choice or perplexity run adds to its report: per variant and per adapter against base."""

    task: Task
    choice: dict[str, ChoiceVariant]
    perplexity: dict[str, PerplexityVariant]
    choice_comparisons: dict[str, ChoiceComparison]
    perplexity_comparisons: dict[str, PerplexityComparison]
    documents: dict[str, dict[int, Document]]  # perplexity: per variant, per example (the HTML's document table)

    def variant_json(self, variant: str) -> dict[str, Any]:
        found = self.choice.get(variant) or self.perplexity.get(variant)
        return found.to_json() if found else {}

    def comparison_json(self, variant: str) -> dict[str, Any]:
        found = self.choice_comparisons.get(variant) or self.perplexity_comparisons.get(variant)
        return found.to_json() if found else {}


def build_loglik(task: Task, scores: Sequence[StoredScore], gold: Mapping[int, int | None],
                 variants: Sequence[str]) -> LoglikReport:
    """The log-likelihood figures of a run's `variants`, base first, from its scores and gold answers."""
    adapters = [v for v in variants if v != BASE_VARIANT]
    if task is Task.CHOICE:
        cells = choice_cells(scores, gold)
        base = cells.get(BASE_VARIANT, {})
        return LoglikReport(
            task, {v: choice_variant(v, cells.get(v, {})) for v in variants}, {},
            {v: compare_choices(base, cells.get(v, {}), baseline_name=BASE_VARIANT, candidate_name=v)
             for v in adapters}, {}, {})
    docs = documents(scores)
    base_docs = docs.get(BASE_VARIANT, {})
    return LoglikReport(
        task, {}, {v: PerplexityVariant.of(v, list(docs.get(v, {}).values())) for v in variants}, {},
        {v: compare_documents(base_docs, docs.get(v, {}), baseline_name=BASE_VARIANT, candidate_name=v)
         for v in adapters}, docs)


@dataclass(frozen=True)
class VariantScores:
    """One variant of one run for `compare`: the run's stored scores and gold answers, and its name there."""

    scores: Sequence[StoredScore]
    gold: Mapping[int, int | None]
    variant: str
    name: str  # as the comparison names it, e.g. "3:arith"


def compare_variant_scores(task: Task, baseline: VariantScores, candidate: VariantScores
                           ) -> ChoiceComparison | PerplexityComparison:
    """`candidate` against `baseline` (two runs of the same task on the same dataset), paired by example."""
    if task is Task.CHOICE:
        return compare_choices(choice_cells(baseline.scores, baseline.gold).get(baseline.variant, {}),
                               choice_cells(candidate.scores, candidate.gold).get(candidate.variant, {}),
                               baseline_name=baseline.name, candidate_name=candidate.name)
    return compare_documents(documents(baseline.scores).get(baseline.variant, {}),
                             documents(candidate.scores).get(candidate.variant, {}),
                             baseline_name=baseline.name, candidate_name=candidate.name)
