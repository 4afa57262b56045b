"""The statistics against values computed independently."""

from __future__ import annotations

import math

import pytest

from producer import stats
from producer.stats import bootstrap_mean, bootstrap_ratio_delta, mcnemar_exact, paired_bootstrap, wilson


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_examples(correct: int, n: int, low: float, high: float) -> None:
    got = wilson(correct, n)
    assert got[0] == pytest.approx(low, abs=1e-4) and got[1] == pytest.approx(high, abs=1e-4)


def test_wilson_edges() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0) and 0.69 < low < 0.73


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [
        (0, 0, 1.0),
        (3, 3, 1.0),
        (5, 0, 0.0625),            # 2 * (1/2)^5
        (1, 4, 0.375),             # 2 * (1 + 5) / 32
        (10, 2, 158 / 4096),       # 2 * (1 + 12 + 66) / 4096
        (54, 0, 2 / 2**54),
    ],
)
def test_exact_mcnemar_on_small_tables(wins: int, losses: int, p: float) -> None:
    assert mcnemar_exact(wins, losses) == pytest.approx(p, rel=1e-9)
    assert mcnemar_exact(losses, wins) == pytest.approx(p, rel=1e-9)


def test_exact_mcnemar_against_scipy_if_available() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(7, 2), (20, 11), (0, 9), (13, 13)]:
        expected = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert mcnemar_exact(wins, losses) == pytest.approx(expected, rel=1e-9)


def test_bootstrap_is_reproducible_and_sensible() -> None:
    first = paired_bootstrap(30, 5, 65)
    assert first == paired_bootstrap(30, 5, 65)
    assert first != paired_bootstrap(30, 5, 65, seed=1)
    delta, low, high = first
    assert delta == pytest.approx(0.25)
    assert low < delta < high
    # The normal approximation of the same interval: sd of the mean of {+1, -1, 0} draws.
    var = (30 + 5) / 100 - 0.25**2
    half = 1.96 * math.sqrt(var / 100)
    assert low == pytest.approx(delta - half, abs=0.02) and high == pytest.approx(delta + half, abs=0.02)
    assert paired_bootstrap(0, 0, 50) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(0, 0, 0) == (0.0, 0.0, 0.0)


def test_the_bootstraps_draw_the_same_in_batches_as_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    values = [0.5, 0.0, -0.2, 1.3, 0.7, -0.4, 0.1]
    weights = [13, 13, 11, 40, 2, 7, 9]
    other = [v * 2 - 0.1 for v in values]
    whole = bootstrap_mean(values), bootstrap_ratio_delta(values, other, weights)
    monkeypatch.setattr(stats, "_BOOTSTRAP_CELLS", 5 * len(values) + 3)  # batches of 5 resamples, then the rest
    assert (bootstrap_mean(values), bootstrap_ratio_delta(values, other, weights)) == whole
    mean, low, high = whole[0]
    assert mean == pytest.approx(sum(values) / len(values)) and low < mean < high
    delta, low, high = whole[1]
    assert delta == pytest.approx((sum(values) - sum(other)) / sum(weights)) and low < delta < high
    assert bootstrap_mean([]) == bootstrap_ratio_delta([], [], []) == (0.0, 0.0, 0.0)
