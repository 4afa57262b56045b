"""Answer extraction and scoring (pure Python: no model needed, unit-tested on strings)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from producer.config import ScoringConfig

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
#: Relative tolerance under which two numbers are equal (absorbs float printing, not real errors).
NUMERIC_REL_TOL = 1e-9


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
    if reference is None:
        return Score(prediction, None)
    if prediction is None:
        return Score(None, False)
    expected = reference.strip()
    if scoring.match == "exact":
        return Score(prediction, " ".join(prediction.split()) == " ".join(expected.split()))
    if scoring.match == "contains":
        return Score(prediction, expected in prediction)
    wanted = last_number(expected)
    if wanted is None:
        return Score(prediction, False)
    return Score(prediction, math.isclose(float(prediction), float(wanted), rel_tol=NUMERIC_REL_TOL))
