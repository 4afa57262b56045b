"""The decode attention kernel's build variants, timed on cases inside and past the last-level cache.

`worker.engine.cpu_attention` builds its kernel four ways (software prefetch or none, 16-float or
8-float vectors) and keeps the one its timing case runs fastest. That case must be read from memory,
as a long decode step's keys and values are: a case that fits in the last-level cache times reads
from cache, at another speed and possibly in another order of the variants. The build sizes its case
at 3x the last-level cache (`_timing_columns`, at least the first case's 75 MB); this script times
the four variants side by side on cases of the given multiples of this machine's last-level cache
(and on the build's own case), each variant's best of --rounds alternated runs, and says which
variant each size would keep.

    .venv/bin/python bench/kernel_variants.py                  # 0.25x, 0.5x, 1x, 3x the L3; about 30 s
    .venv/bin/python bench/kernel_variants.py --of-cache 0.5 --rounds 1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--of-cache", type=float, nargs="+", default=[0.25, 0.5, 1.0, 3.0],
                        help="case sizes as multiples of the last-level cache")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from worker.engine import cpu_attention as kernel
    from worker.engine import cpu_cache

    torch.set_num_threads(args.threads)
    cc = shutil.which("cc") or shutil.which("gcc")
    runtime = kernel._openmp_runtime()
    if cc is None or runtime is None:
        sys.exit("kernel_variants.py: needs a C compiler and torch's OpenMP runtime (as the engine's kernel does)")
    cache = cpu_cache.last_level()
    per_column = kernel.TIMING_COLUMN_BYTES
    sizes = [(f"{m:g}x the cache", max(16, round(m * cache / per_column / 16) * 16)) for m in args.of_cache if cache]
    sizes.append(("the build's case", kernel._timing_columns(cache)))
    print(f"last-level cache {cache >> 20 if cache else 'unknown'} MiB; {args.threads} threads; a decode step's "
          f"attention, {kernel.TIMING_ROWS} rows x {kernel.TIMING_KV} key/value heads of {kernel.TIMING_DIM} "
          f"({kernel.TIMING_GROUPS} query heads each), float32; best of {args.rounds} alternated runs")
    with tempfile.TemporaryDirectory() as tmp:
        functions = {}
        for name, define in kernel.VARIANTS.items():
            kernel._compile(cc, runtime, define, Path(tmp) / f"{name}.so")
            functions[name] = kernel._load(Path(tmp) / f"{name}.so")
        header = "".join(f"{name:>24}" for name in functions)
        print(f"{'case':>18}{'MiB':>8}{header}{'kept':>16}")
        for label, columns in sizes:
            times = kernel._timed(functions, rounds=args.rounds, columns=columns)
            mib = columns * per_column / 2 ** 20
            cells = "".join(f"{f'{ms:.2f} ms {mib / 1024 / ms * 1e3:5.1f} GiB/s':>24}" for ms in times.values())
            print(f"{label:>18}{mib:>8.1f}{cells}{min(times, key=lambda n: times[n]):>16}", flush=True)


if __name__ == "__main__":
    main()
