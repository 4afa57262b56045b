from __future__ import annotations

import pytest

from producer.config import ScoringConfig
from worker.scoring import extract, last_number, score


@pytest.mark.parametrize(
    ("text", "expected"),
    [("23 + 41 = 64", "64"), ("no number", None), ("-3.5 and 1,234", "1234"), ("x=+7.", "7"), ("1e3", "1e3")],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


def test_extract_uses_group_one_or_the_whole_match() -> None:
    assert extract("The answer is 42.", r"answer is (\d+)") == "42"
    assert extract("The answer is 42.", r"\d+") == "42"
    assert extract("nothing", r"answer is (\d+)") is None
    assert extract("  padded \n", None) == "padded"


def test_exact_contains_numeric() -> None:
    assert score(" Paris ", "Paris", ScoringConfig(match="exact")).correct is True
    assert score("paris", "Paris", ScoringConfig(match="exact")).correct is False
    assert score("It is Paris, France", "Paris", ScoringConfig(match="contains")).correct is True
    numeric = ScoringConfig(match="numeric")
    assert score("23 + 41 = 64", "64", numeric) == score("64.0", "64", numeric).__class__("64", True)
    assert score("23 + 41 = 66", "64", numeric).correct is False
    assert score("I don't know", "64", numeric).prediction is None
    assert score("I don't know", "64", numeric).correct is False


def test_no_reference_means_no_score() -> None:
    result = score("anything", None, ScoringConfig())
    assert result.correct is None and result.prediction == "anything"


def test_squad_normalisation() -> None:
    from worker.scoring import normalize_answer

    assert normalize_answer("  The Eiffel  Tower! ") == "eiffel tower"
    assert score("the Eiffel tower.", "Eiffel Tower", ScoringConfig(match="exact", normalize=True)).correct is True
    assert score("the Eiffel tower.", "Eiffel Tower", ScoringConfig(match="exact")).correct is False
    assert score("It's THE Eiffel Tower, in Paris", "eiffel tower",
                 ScoringConfig(match="contains", normalize=True)).correct is True


def test_numeric_tolerance() -> None:
    assert score("about 3.14", "3.14159", ScoringConfig(match="numeric", tolerance=0.01)).correct is True
    assert score("about 3.14", "3.14159", ScoringConfig(match="numeric")).correct is False


@pytest.mark.parametrize(
    ("output", "letter"),
    [("B", "B"), ("(C) because", "C"), ("Answer: D.", "D"), ("A) yes", "A"), ("I think it is no", None)],
)
def test_choice_extracts_a_letter(output: str, letter: str | None) -> None:
    result = score(output, "(d)" if letter == "D" else letter or "A", ScoringConfig(match="choice"))
    assert result.prediction == letter
    assert result.correct is (letter is not None)
