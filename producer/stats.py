"""The statistics of a paired comparison, in plain Python (numpy only for the bootstrap).

- `wilson`: the Wilson score interval of a proportion (Wilson 1927), good at small n and near 0 or 1.
- `mcnemar_exact`: the exact two-sided McNemar test, a binomial test on the discordant pairs.
- `paired_bootstrap`: a percentile interval of the accuracy difference, resampling examples (seeded).
"""

from __future__ import annotations

import math

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054
#: Bootstrap resamples behind the difference interval, and their seed (reports are reproducible).
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct / n`; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) under Binomial(wins + losses, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(wins: int, losses: int, ties: int, *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(difference, low, high): the accuracy difference (candidate - baseline) with a 95% percentile
    interval from resampling the n paired examples with replacement.

    Each example contributes +1 (a win), -1 (a loss) or 0 (a tie), so a resample is a multinomial
    draw of those three counts: exactly the example-level bootstrap, in O(samples).
    """
    import numpy as np

    n = wins + losses + ties
    if n == 0:
        return 0.0, 0.0, 0.0
    delta = (wins - losses) / n
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [wins / n, losses / n, ties / n], size=samples)  # [samples, 3]
    deltas = (draws[:, 0] - draws[:, 1]) / n
    low, high = np.percentile(deltas, [2.5, 97.5])
    return delta, float(low), float(high)
