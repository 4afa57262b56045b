"""Answer extraction and scoring (pure Python: no model needed, unit-tested on strings).

Each `scoring.match` value is a `Rule` in `RULES`: how a prediction is read out of the extracted text
and how it is compared with the reference. The config's allowed values are `RULES`' keys, so a new
rule is one function pair and one registry line here, nothing else.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ScoringConfig

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
#: In a reversed text: its last digit and the characters a `_NUMBER` match can hold before it (`last_number`).
_LAST_RUN = re.compile(r"\d[-+\d.,eE]*")
#: Texts up to this long are simply searched with `_NUMBER` (faster than reversing them first).
_SHORT = 24
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
    """The last number written in `text` ("1,234.5" -> "1234.5"), or None: the last of `_NUMBER.findall(text)`.

    In a long text, found without running `_NUMBER` over all of it, with the same result
    (tests/test_scoring.py compares the two on generated texts): a match holds only characters of
    `[-+\\d.,eE]`, and the pattern has no anchor, lookaround or word boundary, so no match crosses any
    other character, and the matches inside a maximal run of such characters are those of the run
    alone. Every match holds a digit and ends with one, so the last match lies in the run of the
    text's last digit, between the run's start and that digit: `_LAST_RUN` on the reversed text
    finds exactly that span. `_NUMBER` starts with an optional sign, so the regex engine tries it at
    every position (about 3 µs for a hundred characters, most of the scoring of a row); `_LAST_RUN`
    starts with a digit, which the engine skips to at C speed."""
    if len(text) <= _SHORT:
        found = _NUMBER.findall(text)
    else:
        run = _LAST_RUN.search(text[::-1])
        if run is None:
            return None
        found = _NUMBER.findall(text, len(text) - run.end(), len(text) - run.start())
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


@dataclass(frozen=True)
class Rule:
    """One `scoring.match` value."""

    #: The prediction read out of the extracted text (None: the output gives no answer).
    read: Callable[[str], str | None]
    #: Whether a prediction equals the stripped reference, under the run's scoring options.
    same: Callable[[str, str, ScoringConfig], bool]
    help: str


def _text_equal(got: str, want: str, scoring: ScoringConfig) -> bool:
    if scoring.normalize:
        got, want = normalize_answer(got), normalize_answer(want)
    return " ".join(got.split()) == " ".join(want.split())


def _text_contains(got: str, want: str, scoring: ScoringConfig) -> bool:
    if scoring.normalize:
        got, want = normalize_answer(got), normalize_answer(want)
    return want in got


def _numbers_equal(got: str, want: str, scoring: ScoringConfig) -> bool:
    wanted = last_number(want)
    if wanted is None:
        return False
    return math.isclose(float(got), float(wanted), rel_tol=NUMERIC_REL_TOL, abs_tol=scoring.tolerance)


def _same_letter(got: str, want: str, scoring: ScoringConfig) -> bool:
    return got == choice_letter(want.upper())


def _as_is(text: str) -> str | None:
    return text


#: Every `scoring.match` value, in the order the docs list them.
RULES: dict[str, Rule] = {
    "exact": Rule(_as_is, _text_equal, "the whole prediction equals the reference (white space collapsed)"),
    "contains": Rule(_as_is, _text_contains, "the reference appears inside the prediction"),
    "numeric": Rule(last_number, _numbers_equal, "the last number written equals the reference's, within tolerance"),
    "choice": Rule(choice_letter, _same_letter, "the multiple-choice letter A-J equals the reference's"),
}


def score(output: str, reference: str | None, scoring: ScoringConfig) -> Score:
    """Extract the prediction from `output` and compare it with `reference` as the config says."""
    rule = RULES[scoring.match]  # the config admits only RULES' keys
    prediction = extract(output, scoring.extract)
    if prediction is not None:
        prediction = rule.read(prediction)
    if reference is None:
        return Score(prediction, None)
    if prediction is None:
        return Score(None, False)
    return Score(prediction, rule.same(prediction, reference.strip(), scoring))
