"""CPU time of a generation run on a quiet machine and under a background load, per thread setting.

Issue 16, acceptance 4: the CPU time of a run at load 10 stays within 1.5x of the same run on a quiet
machine. torch's CPU kernels run on OpenMP threads (libgomp); a thread that reaches the end of a
parallel region before the others spins for GOMP_SPINCOUNT iterations before it sleeps. When the
other thread has been descheduled (a busy machine), that spinning is CPU time spent on nothing, once
per operator (thousands per decode step). This runs lora-compare's chunk path (`compare_strategies`
strategy c: demo model, P prompts x (base + K adapters), float32, greedy) in a child process, quiet
and then beside --load busy processes, for each setting, and prints wall and CPU time (the child's
generation only, `time.process_time`) and the loaded / quiet CPU ratio.

    .venv/bin/python bench/contention.py                                    # 16 prompts, 24 tokens, load 10
    .venv/bin/python bench/contention.py --settings worker,libgomp --new-tokens 96
    .venv/bin/python bench/contention.py --settings worker,spin1000 --prompts 64 --new-tokens 256 --load 0 --repeat 2

The last form weighs a setting's quiet cost alone: quiet runs alternated, the fastest of each, and
its wall time against the first setting's. "same outputs": every run's tokens equal the first
setting's quiet run's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from worker.threads import SPINCOUNT  # noqa: E402  (the standard library only)

#: name -> the environment the child runs with (on top of this process's, OpenMP settings removed).
SETTINGS: dict[str, dict[str, str]] = {
    "worker": {"GOMP_SPINCOUNT": SPINCOUNT},  # what the worker sets (`worker.threads`), governor on
    "ungoverned": {"GOMP_SPINCOUNT": SPINCOUNT, "LORA_COMPARE_THREAD_GOVERNOR": "0"},  # no `contention.Governor`
    "libgomp": {"GOMP_SPINCOUNT": "300000"},  # libgomp's default with OMP_WAIT_POLICY unset
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "spin1000": {"GOMP_SPINCOUNT": "1000"},  # a shorter spin than the worker's
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},  # spin (almost) forever
}
_OMP = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "LORA_COMPARE_THREAD_GOVERNOR")


def _busy() -> None:
    while True:
        pass


def run_child(spec_path: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "bench" / "compare_strategies.py"), "--one", "c", str(spec_path),
           "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--chunk", str(args.chunk)]
    child_env = {k: v for k, v in os.environ.items() if k not in _OMP} | env
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--load", type=int, default=10, help="busy processes beside the loaded run")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeat", type=int, default=1, help="quiet runs of each setting, alternated; the fastest "
                        "counts (0 loaded runs with --load 0: the quiet cost of a setting alone)")
    args = parser.parse_args()

    from bench.compare_strategies import demo_adapters, demo_prompts
    from contract.settings import Settings
    from worker.demo_model import prepare_demo_model

    names = [n for n in args.settings.split(",") if n]
    print(f"demo model, {args.prompts} prompts x (base + {args.adapters} adapters), {args.new_tokens} new tokens, "
          f"float32, greedy; loaded = beside {args.load} busy processes on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_demo_model(Settings.from_env().demo_model_dir)
        spec = {"shape": "demo", "tmp": tmp, "base": str(base), "pairs": demo_prompts(args.prompts),
                "adapters": [str(p) for p in demo_adapters(base, Path(tmp), args.adapters)]}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        quiet: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeat):  # quiet runs alternated across the settings; the fastest counts
            for name in names:
                run = run_child(spec_path, args, SETTINGS[name])
                print(f"  {name} quiet: {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU", flush=True)
                if name not in quiet or run["wall_s"] < quiet[name]["wall_s"]:
                    quiet[name] = run
        loaded: dict[str, dict[str, Any]] = {}
        for name in names if args.load else []:
            load = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
            for p in load:
                p.start()
            try:
                time.sleep(1)
                loaded[name] = run_child(spec_path, args, SETTINGS[name])
            finally:
                for p in load:
                    p.terminate()
                for p in load:
                    p.join()
            print(f"  {name} loaded: {loaded[name]['wall_s']:.1f} s wall, {loaded[name]['cpu_s']:.1f} s CPU",
                  flush=True)
            time.sleep(2)
    first = quiet[names[0]]["wall_s"]
    print(f"\nquiet: fastest of {args.repeat} alternated; 'quiet vs {names[0]}': that wall time over {names[0]}'s")
    envs = {name: " ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) for name in names}
    wide, env_wide = max(9, *(len(n) + 2 for n in names)), max(28, *(len(e) + 2 for e in envs.values()))
    print(f"{'setting':<{wide}}{'env':<{env_wide}}{'quiet wall':>11}{'quiet vs ' + names[0]:>17}{'quiet CPU':>10}"
          f"{'loaded wall':>12}{'loaded CPU':>11}{'CPU loaded/quiet':>17}  same outputs")
    for name in names:
        env = envs[name]
        q, lo = quiet[name], loaded.get(name)
        same = all(r["output_ids"] == quiet[names[0]]["output_ids"] for r in (q, lo) if r is not None)
        line = f"{name:<{wide}}{env:<{env_wide}}{q['wall_s']:>10.1f}s{q['wall_s'] / first:>16.2f}x{q['cpu_s']:>9.1f}s"
        if lo is not None:
            line += f"{lo['wall_s']:>11.1f}s{lo['cpu_s']:>10.1f}s{lo['cpu_s'] / q['cpu_s']:>16.2f}x"
        else:
            line += f"{'-':>12}{'-':>11}{'-':>17}"
        print(f"{line}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
