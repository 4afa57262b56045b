"""A decode step's attention against the memory it has to read (issue 16, acceptance 2).

At long contexts a decode step's cost that grows with the context is attention reading the keys and
values. This times one decode step's attention over every layer for R rows at each context T, the
demo model's shape by default (30 layers, 3 key/value heads of 64, 3 query heads per key/value head),
float32, three ways side by side:

- `flash`: what the engine runs (`worker.engine.attention._part`: torch's CPU flash attention, which
  also returns the log-sum-exp for the split over prefix and own columns);
- `matmul`: the same in plain operations (`attention.reference_part`: scores, log-sum-exp, product);
- `read`: a sum over the same keys and values, the time to read them at this machine's bandwidth,
  which no kernel can beat.

Each layer's keys and values are their own tensors, viewed as the cache holds them (the own columns
of a buffer with spare columns), so they come from memory as in a step, not from cache. A key-padding
mask on a few rows, as the batch's left padding gives. Best of --repeat.

    .venv/bin/python bench/decode_attention.py                      # demo shape, 24 rows, about 1 minute
    .venv/bin/python bench/decode_attention.py --layers 2 --rows 2 --contexts 16 32 --repeat 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.linear_kernels import best_ms  # noqa: E402


def measure(context: int, args: argparse.Namespace, gen: Any) -> tuple[float, float, float, float]:
    """(flash ms, matmul ms, read ms, largest difference of flash and matmul) at `context`."""
    import torch

    from worker.engine.attention import _part, reference_part

    rows, kv, groups, dim = args.rows, args.kv_heads, args.groups, args.head_dim
    capacity = context + max(4, context // 4)  # the cache's spare columns
    keys = [torch.randn(rows, kv, capacity, dim, generator=gen) for _ in range(args.layers)]
    values = [torch.randn(rows, kv, capacity, dim, generator=gen) for _ in range(args.layers)]
    query = torch.randn(rows, kv, groups, dim, generator=gen)
    mask = torch.zeros(rows, 1, 1, context)
    mask[: max(1, rows // 4), ..., : context // 10] = float("-inf")  # some rows left-padded
    scale = dim ** -0.5

    def own(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return keys[layer][:, :, :context], values[layer][:, :, :context]

    def every_layer(run: Callable[[int], Any]) -> float:
        """Fastest ms of one pass of `run(layer)` over every layer (`linear_kernels.best_ms`)."""
        return best_ms(lambda: [run(layer) for layer in range(args.layers)], args.repeat)

    flash = every_layer(lambda layer: _part(query, *own(layer), mask, scale))
    plain = every_layer(lambda layer: reference_part(query, *own(layer), mask, scale))
    read = every_layer(lambda layer: [t.sum() for t in own(layer)])
    diff = (_part(query, *own(0), mask, scale)[0] - reference_part(query, *own(0), mask, scale)[0]).abs().max()
    return flash, plain, read, diff.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--groups", type=int, default=3, help="query heads per key/value head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows, kv, groups, dim = args.rows, args.kv_heads, args.groups, args.head_dim
    per_token = 2 * args.layers * kv * dim * 4
    print(f"{rows} rows, {args.layers} layers x {kv} key/value heads of {dim} ({groups} query heads each), float32, "
          f"{args.threads} threads; ms for one decode step's attention over every layer, best of {args.repeat}")
    print(f"{'context':>8}{'GB read':>9}{'flash ms':>10}{'matmul ms':>11}{'read ms':>9}{'flash/read':>12}"
          f"{'max diff':>10}")
    measured: list[tuple[float, float]] = []  # (flash, read) per context
    for context in args.contexts:
        flash, plain, read, diff = measure(context, args, gen)
        print(f"{context:>8}{rows * context * per_token / 1e9:>9.3f}{flash:>10.1f}{plain:>11.1f}{read:>9.1f}"
              f"{flash / read:>11.2f}x{diff:>10.1e}", flush=True)
        measured.append((flash, read))
    if len(measured) > 1:
        (flash0, read0), (flash1, read1) = measured[0], measured[-1]
        print(f"from ~{args.contexts[0]} to ~{args.contexts[-1]}: flash {flash1 - flash0:+.1f} ms, "
              f"the read alone {read1 - read0:+.1f} ms")


if __name__ == "__main__":
    main()
