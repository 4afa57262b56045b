"""A decode step's attention against the memory it has to read (issue 16, acceptance 2).

At long contexts a decode step's cost that grows with the context is attention reading the keys and
values. This times one decode step's attention over every layer for R rows at each context T, the
demo model's shape by default (30 layers, 3 key/value heads of 64, 3 query heads per key/value head),
float32, four ways side by side:

- `kernel`: what the engine runs where it can (`worker.engine.cpu_attention`: each key and value read
  once for all the query heads that share it, in blocks of 16 keys);
- `flash`: what it runs otherwise (`worker.engine.attention._part`: torch's CPU flash attention, which
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


def measure(context: int, args: argparse.Namespace, gen: Any) -> tuple[float, float | None, float, float, float]:
    """(flash ms, kernel ms or None where it is unavailable, matmul ms, read ms, largest difference of
    the engine's attention and matmul) at `context`."""
    import torch

    from worker.engine import cpu_attention
    from worker.engine.attention import Handoff, _part, reference_part

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

    no_prefix = torch.empty(1, kv, 0, dim)
    handoffs = [Handoff(*own(layer), no_prefix, no_prefix, ()) for layer in range(args.layers)]
    query_rows = query.reshape(rows, kv * groups, 1, dim)
    own_mask = mask.reshape(rows, 1, 1, context)

    def kernel_layer(layer: int) -> torch.Tensor:
        out = cpu_attention.attend(query_rows, handoffs[layer], own_mask, scale)
        assert out is not None
        return out

    with torch.no_grad():
        flash = every_layer(lambda layer: _part(query, *own(layer), mask, scale))
        kernel = every_layer(kernel_layer) if cpu_attention.available() else None
        plain = every_layer(lambda layer: reference_part(query, *own(layer), mask, scale))
        read = every_layer(lambda layer: [t.sum() for t in own(layer)])
        want = reference_part(query, *own(0), mask, scale)[0]
        got = kernel_layer(0).reshape(want.shape) if kernel is not None else _part(query, *own(0), mask, scale)[0]
    return flash, kernel, plain, read, (got - want).abs().max().item()


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
    print(f"{'context':>8}{'GB read':>9}{'kernel ms':>11}{'flash ms':>10}{'matmul ms':>11}{'read ms':>9}"
          f"{'kernel/read':>13}{'flash/read':>12}{'flash/kernel':>14}{'max diff':>10}")
    measured: list[tuple[float, float | None, float]] = []  # (flash, kernel, read) per context
    for context in args.contexts:
        flash, kernel, plain, read, diff = measure(context, args, gen)
        k = f"{kernel:>11.1f}" if kernel is not None else f"{'-':>11}"
        kr = f"{kernel / read:>12.2f}x" if kernel is not None else f"{'-':>13}"
        fk = f"{flash / kernel:>13.2f}x" if kernel is not None else f"{'-':>14}"
        print(f"{context:>8}{rows * context * per_token / 1e9:>9.3f}{k}{flash:>10.1f}{plain:>11.1f}{read:>9.1f}"
              f"{kr}{flash / read:>11.2f}x{fk}{diff:>10.1e}", flush=True)
        measured.append((flash, kernel, read))
    if len(measured) > 1:
        (flash0, kernel0, read0), (flash1, kernel1, read1) = measured[0], measured[-1]
        grown = f"kernel {kernel1 - kernel0:+.1f} ms, " if kernel0 is not None and kernel1 is not None else ""
        print(f"from ~{args.contexts[0]} to ~{args.contexts[-1]}: {grown}flash {flash1 - flash0:+.1f} ms, "
              f"the read alone {read1 - read0:+.1f} ms")


if __name__ == "__main__":
    main()
