"""The perplexity windows are lm-evaluation-harness's: its docstring's example, worked cases, and
properties that hold for any document (every token predicted once, in order; no window longer than
the model takes; each window's context directly precedes its continuation)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.windows import DEFAULT_MAX_LENGTH, harness_max_length, rolling_windows

PREFIX = 999


def test_the_harness_docstring_example() -> None:
    """lm_eval/api/model.py `loglikelihood_rolling`: tokens 0..9, max length 4, prefix BOS: inputs
    (BOS 0 1 2) (3 4 5 6) (5 6 7 8); predictions (0 1 2 3) (4 5 6 7) (8 9); made disjoint."""
    assert rolling_windows(list(range(10)), PREFIX, 4) == [
        ([PREFIX], [0, 1, 2, 3]),
        ([3], [4, 5, 6, 7]),
        ([5, 6, 7], [8, 9]),
    ]


def test_a_short_document_is_one_window_after_the_prefix_token() -> None:
    assert rolling_windows([5, 6, 7], PREFIX, 8) == [([PREFIX], [5, 6, 7])]
    assert rolling_windows([5, 6, 7], PREFIX, 3) == [([PREFIX], [5, 6, 7])]


def test_max_length_one_predicts_each_token_from_the_one_before() -> None:
    assert rolling_windows([5, 6, 7], PREFIX, 1) == [([PREFIX], [5]), ([5], [6]), ([6], [7])]


def test_no_tokens_no_windows_and_a_bad_length_is_refused() -> None:
    assert rolling_windows([], PREFIX, 4) == []
    with pytest.raises(ValueError, match="max_len"):
        rolling_windows([1], PREFIX, 0)


def test_the_harness_default_length_when_the_model_says_none() -> None:
    assert harness_max_length(None) == DEFAULT_MAX_LENGTH == 2048
    assert harness_max_length(8192) == 8192


@given(tokens=st.lists(st.integers(min_value=0, max_value=50), max_size=300),
       max_len=st.integers(min_value=1, max_value=64))
def test_every_token_is_scored_exactly_once_with_the_context_just_before_it(tokens: list[int], max_len: int) -> None:
    # Distinct values, so that the positions of tokens can be told apart.
    tokens = [1000 + i for i in range(len(tokens))]
    windows = rolling_windows(tokens, PREFIX, max_len)
    assert [t for _context, continuation in windows for t in continuation] == tokens
    for context, continuation in windows:
        assert continuation and context
        assert len(context) + len(continuation) - 1 <= max_len  # what the model is given
        start = tokens.index(continuation[0])
        before = [PREFIX, *tokens][:start + 1]  # the prefix token, then every token before the continuation
        assert before[-len(context):] == context


@given(tokens=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=300),
       max_len=st.integers(min_value=1, max_value=64))
def test_later_windows_see_a_full_context_and_only_the_last_is_short(tokens: list[int], max_len: int) -> None:
    windows = rolling_windows(tokens, PREFIX, max_len)
    assert len(windows) == -(-len(tokens) // max_len)
    for i, (context, continuation) in enumerate(windows):
        if i > 0:
            assert len(context) + len(continuation) - 1 == max_len  # the harness keeps the input full-sized
        if i < len(windows) - 1:
            assert len(continuation) == max_len
