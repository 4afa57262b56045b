"""The statistics of a paired comparison, in plain Python (numpy only for the bootstrap).

- `wilson`: the Wilson score interval of a proportion (Wilson 1927), good at small n and near 0 or 1.
- `mcnemar_exact`: the exact two-sided McNemar test, a binomial test on the discordant pairs.
- `paired_bootstrap`: a percentile interval of the accuracy difference, resampling examples (seeded).
- `bootstrap_mean`: the same for the mean of per-example differences (a gold answer's log-probability).
- `bootstrap_ratio_delta`: the same for the difference of two aggregate ratios over the same items
  (bits per byte of an adapter minus the base model's, over documents).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

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


#: At most this many resampled indices are held at once ([batch, n] int64): the bootstrap of a large
#: set runs in batches of resamples, with the same draws as in one go.
_BOOTSTRAP_CELLS = 4_000_000


def _resamples(n: int, samples: int, seed: int) -> Iterator[Any]:
    """Batches of bootstrap resamples of n paired items: int arrays [batch, n] of indices, drawn with
    replacement, `samples` rows in all, from one seeded generator."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = max(1, _BOOTSTRAP_CELLS // n)
    for start in range(0, samples, batch):
        yield rng.integers(0, n, size=(min(batch, samples - start), n))  # [batch, n]


def bootstrap_mean(values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-example paired differences with a 95% percentile interval
    from resampling the examples with replacement; (0, 0, 0) for no values."""
    import numpy as np

    if not values:
        return 0.0, 0.0, 0.0
    data = np.asarray(values, dtype=np.float64)  # [n]
    means = np.concatenate([data[idx].mean(axis=1) for idx in _resamples(len(data), samples, seed)])  # [samples]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)


def bootstrap_ratio_delta(candidate: Sequence[float], baseline: Sequence[float], weights: Sequence[float], *,
                          samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
                          ) -> tuple[float, float, float]:
    """(delta, low, high): sum(candidate) / sum(weights) - sum(baseline) / sum(weights) over n paired
    items (documents), with a 95% percentile interval from resampling the items with replacement and
    recomputing both aggregate ratios on each resample (so large documents weigh as in the figure
    itself, which is what an aggregate such as bits per byte needs); (0, 0, 0) for no items."""
    import numpy as np

    if not weights:
        return 0.0, 0.0, 0.0
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)  # [n]
    weight = np.asarray(weights, dtype=np.float64)  # [n]
    deltas = np.concatenate([diff[idx].sum(axis=1) / weight[idx].sum(axis=1)
                             for idx in _resamples(len(weight), samples, seed)])  # [samples]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(diff.sum() / weight.sum()), float(low), float(high)
