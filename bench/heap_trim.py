"""What trimming the C heap after each prefill (`DecodeOptions.trim_heap`, `worker.heap.trim`) costs a
decode call, side by side in one run.

`decode_rows` over P prompts x (base + K adapters) at the bench's capacity (`--batch` x variants:
the default 8 x 4 = 32 rows, so the batch refills as rows finish), with the trim on and off,
alternated --repeat times after one warm-up call of each; per arm the fastest call, its prefills
and the time `malloc_trim` itself took, and whether the tokens are the same. The memory side is in
`compare_strategies.py`'s peaks (each strategy in a process of its own); within one process the
calls share one heap, so this script times, it does not compare peaks.

    .venv/bin/python bench/heap_trim.py                          # demo model, 3 adapters, 32 tokens
    .venv/bin/python bench/heap_trim.py --shape tiny --prompts 4 --adapters 1 --new-tokens 4 --repeat 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare_strategies import SHAPES, _attach  # noqa: E402
from bench.decode_steps import variants, workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="rows per variant in flight (capacity: x variants)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from contract.config import GenerationConfig
    from worker import heap
    from worker.engine import lora_routing, scheduler
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work, spec = workload(args, Path(tmp))
        peft = _attach(work, work.load_base(), spec)
        lora_routing.install(peft)
        rows = [(p, v) for p in work.prompt_ids() for v in variants(args.adapters)]
        names = ["__base__" if v == "base" else v for _, v in rows]
        eos = set() if work.synthetic else set(work.eos_ids)
        request = DecodeRequest(GenerationConfig(max_new_tokens=args.new_tokens), eos, work.pad_id, torch.device("cpu"))
        capacity = args.batch * (args.adapters + 1)
        trims: list[float] = []
        prefills = [0]
        trim, prefill = heap.trim, scheduler._prefill

        def timed_trim() -> bool:
            started = time.perf_counter()
            done = trim()
            trims.append(time.perf_counter() - started)
            return done

        def counted_prefill(*a: Any, **kw: Any) -> Any:
            prefills[0] += 1
            return prefill(*a, **kw)

        heap.trim, scheduler._prefill = timed_trim, counted_prefill  # type: ignore[assignment]
        arms = {"trimmed": True, "not trimmed": False}
        best = {name: float("inf") for name in arms}
        said: dict[str, tuple[int, float]] = {}
        tokens: dict[str, list[list[int]]] = {}
        print(f"{args.shape}: {len(rows)} rows ({args.prompts} prompts x (base + {args.adapters} adapters)), capacity "
              f"{capacity}, {args.new_tokens} new tokens, {args.threads} threads; trimmed and not alternated "
              f"{args.repeat}x after a warm-up")
        try:
            for turn in range(args.repeat + 1):
                for name, on in arms.items():
                    trims.clear()
                    prefills[0] = 0
                    started = time.perf_counter()
                    tokens[name] = scheduler.decode_rows(peft, [p for p, _ in rows], request,
                                                         options=DecodeOptions(capacity=capacity, trim_heap=on),
                                                         adapter_names=names)
                    took = time.perf_counter() - started
                    if turn:  # the first turn warms up (oneDNN's timing and primitives, first pages)
                        best[name] = min(best[name], took)
                    said[name] = (prefills[0], sum(trims))
                    print(f"  turn {turn}{' (warm-up)' if not turn else ''}: {name} {took:.2f} s, {prefills[0]} "
                          f"prefills, {len(trims)} trims {sum(trims) * 1e3:.1f} ms", flush=True)
        finally:
            heap.trim, scheduler._prefill = trim, prefill  # type: ignore[assignment]
    same = sum(a == b for a, b in zip(tokens["trimmed"], tokens["not trimmed"]))
    for name in arms:
        print(f"  {name:<12} {best[name]:8.2f} s (fastest of {args.repeat}), {said[name][0]} prefills, "
              f"malloc_trim {said[name][1] * 1e3:.1f} ms")
    print(f"trimmed / not trimmed: {best['trimmed'] / best['not trimmed']:.3f}x; "
          f"tokens the same on {same}/{len(rows)} rows")


if __name__ == "__main__":
    main()
