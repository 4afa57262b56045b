"""Answer extraction and scoring (pure Python: no model needed, unit-tested on strings)."""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from producer.config import ScoringConfig

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
#: Relative tolerance under which two numbers are equal (absorbs float printing, not real errors).
NUMERIC_REL_TOL = 1e-9
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
#: Where a multiple-choice letter A-J is written, tried in order: "B", "B.", "B)", "(B)" at the start;
#: "answer: B" / "answer is (B)"; "(B)" anywhere. ("I think..." is not the letter I.)
_CHOICES = (
    re.compile(r"^\(?([A-J])(?:[.):]|$)"),
    re.compile(r"answer(?:\s+is)?\s*:?\s*\(?([A-J])(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"\(([A-J])\)"),
)


def normalize_answer(text: str) -> str:
    """SQuAD's normaliser: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter A-J that `text` answers with, or None."""
    text = text.strip()
    for pattern in _CHOICES:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


@dataclass(frozen=True)
class Score:
    prediction: str | None
    correct: bool | None  # None: the example has no reference


def last_number(text: str) -> str | None:
    """The last number written in `text` ("1,234.5" -> "1234.5"), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").lstrip("+") if found else None


def extract(output: str, pattern: str | None) -> str | None:
    """Group 1 of the first match (or the whole match); the stripped output when there is no pattern."""
    if pattern is None:
        return output.strip()
    match = re.search(pattern, output, flags=re.DOTALL)
    if match is None:
        return None
    value = match.group(1) if match.re.groups else match.group(0)
    return value.strip() if value is not None else None


def score(output: str, reference: str | None, scoring: ScoringConfig) -> Score:
    """Extract the prediction from `output` and compare it with `reference` as the config says."""
    prediction = extract(output, scoring.extract)
    if scoring.match == "numeric" and prediction is not None:
        prediction = last_number(prediction)
    if scoring.match == "choice" and prediction is not None:
        prediction = choice_letter(prediction)
    if reference is None:
        return Score(prediction, None)
    if prediction is None:
        return Score(None, False)
    expected = reference.strip()
    if scoring.match in ("exact", "contains"):
        got, want = prediction, expected
        if scoring.normalize:
            got, want = normalize_answer(got), normalize_answer(want)
        if scoring.match == "exact":
            return Score(prediction, " ".join(got.split()) == " ".join(want.split()))
        return Score(prediction, want in got)
    if scoring.match == "choice":
        return Score(prediction, prediction == choice_letter(expected.upper()))
    wanted = last_number(expected)
    if wanted is None:
        return Score(prediction, False)
    same = math.isclose(float(prediction), float(wanted), rel_tol=NUMERIC_REL_TOL, abs_tol=scoring.tolerance)
    return Score(prediction, same)
