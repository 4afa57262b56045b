"""Float32 linear layers on CPU: MKL's GEMM (torch's default) against oneDNN (`worker/engine/cpu_linear.py`).

Two parts, each side by side in one run:

1. **Kernels.** For each shape of the model's linear layers, at each --rows: the ms of one product
   with torch's default (`F.linear`, MKL) and with oneDNN on the same plain weight
   (`torch.ops.mkldnn._linear_pointwise`), the weights of every layer of that shape cycled as in a
   forward pass (so they come from memory, not from cache), and the largest difference of the two.
2. **Engine.** `decode_rows` over P prompts x (base + K adapters), every row in one batch, with
   `DecodeOptions.onednn_linear` off, then on with each --min-weights (the smallest weight, in
   elements, that goes to oneDNN: `cpu_linear.MIN_WEIGHT`), alternated --repeat times; the fastest
   of each, its ratio to MKL's, and whether the tokens are the same.

    .venv/bin/python bench/linear_kernels.py                     # demo model, about 3 minutes on 2 cores
    .venv/bin/python bench/linear_kernels.py --shape tiny --rows 1 8 --prompts 2 --new-tokens 8 --repeat 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare_strategies import SHAPES, _attach  # noqa: E402
from bench.decode_steps import variants, workload  # noqa: E402


def best_ms(run: Callable[[], Any], repeat: int) -> float:
    run()  # warm: first-call allocations and the kernels' dispatch
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def kernels(model: Any, rows: list[int], repeat: int) -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812

    op = torch.ops.mkldnn._linear_pointwise
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            shape = (int(module.weight.shape[1]), int(module.weight.shape[0]))
            weights = by_shape.setdefault(shape, [])
            if all(w.data_ptr() != module.weight.data_ptr() for w in weights):
                weights.append(module.weight.detach())
    print("kernels: ms per product, the weights of every layer of the shape cycled (best of "
          f"{repeat}); oneDNN on the plain weight, no copy")
    print(f"{'in x out':>14} {'layers':>6} {'rows':>5} {'MKL ms':>9} {'oneDNN ms':>10} {'MKL / oneDNN':>13} "
          f"{'max diff':>9}")
    with torch.inference_mode():
        for (k, n), weights in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            for m in rows:
                x = torch.randn(m, 1, k, generator=torch.Generator().manual_seed(m))
                mkl = best_ms(lambda x=x, weights=weights: [F.linear(x, w) for w in weights], repeat) / len(weights)
                dnn = best_ms(lambda x=x, weights=weights: [op(x, w, None, "none", [], "") for w in weights],
                              repeat) / len(weights)
                diff = max(float((op(x, w, None, "none", [], "") - F.linear(x, w)).abs().max()) for w in weights)
                print(f"{f'{k} x {n}':>14} {len(weights):>6} {m:>5} {mkl:>9.3f} {dnn:>10.3f} {mkl / dnn:>12.2f}x "
                      f"{diff:>9.1e}", flush=True)


def engine(work: Any, peft: Any, args: argparse.Namespace) -> None:
    import torch

    from contract.config import GenerationConfig
    from worker.engine import cpu_linear
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows

    rows = [(p, v) for p in work.prompt_ids() for v in variants(args.adapters)]
    names = ["__base__" if v == "base" else v for _, v in rows]
    request = DecodeRequest(GenerationConfig(max_new_tokens=args.new_tokens), set(), work.pad_id, torch.device("cpu"))
    # the arms: MKL (oneDNN off), then oneDNN with each smallest weight it takes
    arms: list[tuple[str, int | None]] = [("MKL", None), *[(f"oneDNN >= {m}", m) for m in args.min_weights]]
    seconds: dict[str, list[float]] = {name: [] for name, _ in arms}
    tokens: dict[str, list[list[int]]] = {}
    default = cpu_linear.MIN_WEIGHT
    print(f"\nengine: {len(rows)} rows ({args.prompts} prompts x (base + {args.adapters} adapters)) in one batch, "
          f"{args.new_tokens} new tokens (EOS ignored), {', '.join(n for n, _ in arms)} alternated {args.repeat}x "
          f"(oneDNN >= N: weights of at least N elements through oneDNN; the default is {default})")
    try:
        for turn in range(args.repeat):
            for name, least in arms:
                cpu_linear.MIN_WEIGHT = least if least is not None else default
                started = time.perf_counter()
                tokens[name] = decode_rows(peft, [p for p, _ in rows], request,
                                           options=DecodeOptions(capacity=len(rows), onednn_linear=least is not None),
                                           adapter_names=names)
                seconds[name].append(time.perf_counter() - started)
            print(f"  turn {turn + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n, _ in arms), flush=True)
    finally:
        cpu_linear.MIN_WEIGHT = default
    mkl = min(seconds["MKL"])
    for name, _ in arms[1:]:
        best = min(seconds[name])
        same = sum(a == b for a, b in zip(tokens["MKL"], tokens[name]))
        print(f"engine: MKL {mkl:.2f} s, {name} {best:.2f} s (fastest of {args.repeat}): "
              f"speed-up {mkl / best:.2f}x; tokens the same as MKL's on {same}/{len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 24, 96])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-weights", type=int, nargs="+", default=[1 << 16, 1 << 17],
                        help="the engine's oneDNN arms: the smallest weight (elements) each sends to oneDNN")
    args = parser.parse_args()

    import torch

    from worker.engine import cpu_linear, lora_routing

    torch.set_num_threads(args.threads)
    if not cpu_linear.available():
        sys.exit("this torch has no usable oneDNN linear operator: nothing to compare")
    with tempfile.TemporaryDirectory() as tmp:
        work, spec = workload(args, Path(tmp))
        model = work.load_base()
        print(f"{args.shape}: float32, {args.threads} threads")
        kernels(model, args.rows, args.repeat)
        peft = _attach(work, model, spec)
        lora_routing.install(peft)
        engine(work, peft, args)


if __name__ == "__main__":
    main()
