"""What a fixed glibc mmap threshold (`worker/heap.py`) costs a decode step, side by side in one run.

A decode step of the demo model makes its logits, [rows, 49152] float32 (6 MiB at 32 rows), then
frees them. With the threshold `worker.heap` fixes (1 MiB), each step's logits get pages of their
own: mapped, faulted in as the product writes them, unmapped when freed. With a threshold above
their size they come from the heap, whose pages stay mapped and warm. This times the step's output
projection and its argmax both ways, alternated --repeat times (after one warm-up), and prints the
best of each and their ratio. (Once set, glibc's own rising threshold cannot be restored in the
process: "heap" is a fixed 64 MiB threshold, which is where glibc's would be after the first step.)

    .venv/bin/python bench/heap_threshold.py                      # demo-model shape, 32 rows
    .venv/bin/python bench/heap_threshold.py --rows 8 --vocab 4096 --steps 5 --repeat 1
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from worker import heap  # noqa: E402  (the standard library only)

#: glibc's threshold for "heap": above any logits here, where glibc's own rule would leave it.
HEAP = 64 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=60, help="products per timing")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from worker.engine import cpu_linear

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        raise SystemExit("this C library has no mallopt: nothing to compare")
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    torch.set_num_threads(args.threads)
    weight = torch.randn(args.vocab, args.hidden)
    x = torch.randn(args.rows, args.hidden)
    product = cpu_linear._onednn_product if cpu_linear.available() else cpu_linear._default_product

    def step_ms() -> float:
        started = time.perf_counter()
        for _ in range(args.steps):
            product(x, weight, None).argmax(-1)  # the logits, freed at once as in a decode step
        return (time.perf_counter() - started) / args.steps * 1e3

    mib = args.rows * args.vocab * 4 / 2**20
    print(f"{args.rows} rows x {args.vocab} logits ({mib:.1f} MiB a step), {args.threads} threads, "
          f"{'oneDNN' if product is cpu_linear._onednn_product else 'default'} product, best of {args.repeat}")
    best = {"heap": float("inf"), "own pages": float("inf")}
    with torch.inference_mode():
        step_ms()  # warm-up: primitives, first pages
        for _ in range(args.repeat):
            for name, threshold in (("heap", HEAP), ("own pages", heap.THRESHOLD)):
                libc.mallopt(heap.M_MMAP_THRESHOLD, threshold)
                best[name] = min(best[name], step_ms())
    for name, ms in best.items():
        print(f"  {name:<10} {ms:8.2f} ms a step")
    print(f"own pages / heap: {best['own pages'] / best['heap']:.3f}x")


if __name__ == "__main__":
    main()
