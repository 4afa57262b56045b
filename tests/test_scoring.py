from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.config import ScoringConfig
from contract.scoring import _NUMBER, Score, extract, last_number, score


@pytest.mark.parametrize(
    ("text", "expected"),
    [("23 + 41 = 64", "64"), ("no number", None), ("-3.5 and 1,234", "1234"), ("x=+7.", "7"), ("1e3", "1e3")],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


def _last_number_by_definition(text: str) -> str | None:
    """What `last_number` returns, as it was written before its fast path: the last of findall."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").lstrip("+") if found else None


#: Texts dense in what a number can hold (signs, separators, exponents, Unicode digits) among letters.
_NUMBERISH = st.lists(st.sampled_from([*"0123456789", *"-+.,eE", *" xa=\n", "٣", "５", "e5", ",000", "1,2", "12"]),
                      max_size=40).map("".join)


@settings(max_examples=3000, deadline=None)
@given(text=_NUMBERISH | st.text(max_size=80), pad=st.sampled_from(["", "x" * 30, "1" * 30, "1,234 " * 5]))
def test_last_number_is_the_last_match_of_the_whole_text(text: str, pad: str) -> None:
    """The fast path (the last run of number characters only) finds what `_NUMBER.findall` over the whole
    text finds: a differential test over texts built to put runs, separators and digits next to each other
    (padded, so that short texts go through it too)."""
    assert last_number(pad + text) == _last_number_by_definition(pad + text)
    assert last_number(text + pad) == _last_number_by_definition(text + pad)


@pytest.mark.parametrize("text", ["", "e", "-", "1", "x1", "1x", "a-1,234.5e+6 and -+7", "1,2345", "12,345,67", "+-3",
                                  "e-5", "5e", "3.", ".5", "1,000,000", "٣٤", "1 ٣", "x,1", "ee1", "1e+", "--1-2"])
def test_last_number_on_edges(text: str) -> None:
    assert last_number(text) == _last_number_by_definition(text)


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
    assert score("23 + 41 = 64", "64", numeric) == Score("64", True)
    assert score("23 + 41 = 66", "64", numeric).correct is False
    assert score("I don't know", "64", numeric).prediction is None
    assert score("I don't know", "64", numeric).correct is False


def test_no_reference_means_no_score() -> None:
    result = score("anything", None, ScoringConfig())
    assert result.correct is None and result.prediction == "anything"


def test_squad_normalisation() -> None:
    from contract.scoring import normalize_answer

    assert normalize_answer("  The Eiffel  Tower! ") == "eiffel tower"
    assert score("the Eiffel tower.", "Eiffel Tower", ScoringConfig(match="exact", normalize=True)).correct is True
    assert score("the Eiffel tower.", "Eiffel Tower", ScoringConfig(match="exact")).correct is False
    assert score("It's THE Eiffel Tower, in Paris", "eiffel tower",
                 ScoringConfig(match="contains", normalize=True)).correct is True


@pytest.mark.parametrize(
    ("output", "reference", "prediction"),
    [
        ("64.0", "64", "64.0"),
        ("The answer is 64.00.", "64", "64.00"),
        ("064", "64", "064"),
        ("+64", "64", "64"),
        ("1e3", "1000", "1e3"),
        ("1,000", "1000", "1000"),
        ("1000", "1,000", "1000"),
        ("0.1 + 0.2 = 0.30000000000000004", "0.3", "0.30000000000000004"),  # float printing
    ],
)
def test_numeric_compares_values_not_strings(output: str, reference: str, prediction: str) -> None:
    """Each pair means one number written two ways. Comparing the extracted strings would fail the rows with a
    decimal point, a leading zero, an exponent or float printing; the sign and thousands rows check that the
    extraction normalises them."""
    assert score(output, reference, ScoringConfig(match="numeric")) == Score(prediction, True)


@pytest.mark.parametrize(("output", "reference"), [("-64", "64"), ("64.5", "64"), ("640", "64"), ("6.4", "64")])
def test_numeric_tells_different_numbers_apart(output: str, reference: str) -> None:
    assert score(output, reference, ScoringConfig(match="numeric")).correct is False


def test_numeric_tolerance() -> None:
    assert score("about 3.14", "3.14159", ScoringConfig(match="numeric", tolerance=0.01)).correct is True
    assert score("about 3.14", "3.14159", ScoringConfig(match="numeric")).correct is False
    half = ScoringConfig(match="numeric", tolerance=0.5)
    assert score("64.4", "64", half) == Score("64.4", True)
    assert score("63.6", "64", half) == Score("63.6", True)
    assert score("64.6", "64", half) == Score("64.6", False)
    assert score("1,000.4", "1000", half) == Score("1000.4", True)


@pytest.mark.parametrize(
    ("output", "letter"),
    [("B", "B"), ("(C) because", "C"), ("Answer: D.", "D"), ("A) yes", "A"), ("I think it is no", None)],
)
def test_choice_extracts_a_letter(output: str, letter: str | None) -> None:
    result = score(output, "(d)" if letter == "D" else letter or "A", ScoringConfig(match="choice"))
    assert result.prediction == letter
    assert result.correct is (letter is not None)
