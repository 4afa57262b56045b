"""A `choice` run of base + K adapters against lm-evaluation-harness run once per variant, whole
processes, on the same data and CPU, side by side in one run (issue 15, acceptance 3).

- ours: ONE `lora-compare run` process (embedded mode, a fresh SQLite file each time) of the config
  examples/choice/choice.yaml (60 two-digit sums, 4 choices) with the K adapters, float32 on CPU;
- harness: lm-eval's `hf` model (tests/harness.py, offline, float32, CPU) once for the base and once
  per adapter (`peft=`), each its own process, the same batch size: K + 1 processes.

The rounds alternate (ours, then the harness's K + 1 processes, then ours again ...) and the best
round of each side counts (the machine is shared and noisy). Printed: each side's wall seconds (the
harness's: the sum of its processes), its CPU seconds (children's resource usage: user + system),
the ratio harness / ours (target: at least 3x), ours' time inside scoring (the chunks'
`generate_seconds`) against the rest of the process, and the agreement: the same prediction (argmax
of the choices' log-likelihoods) on every (example, variant), the max relative difference of the
per-choice log-likelihoods (ours from the run's `loglikelihoods` table, the harness's from its logged
samples), and each variant's acc on both sides.

    .venv/bin/python bench/loglik_vs_harness.py                  # demo model, 60 examples, best of 2: 2-15 min
    .venv/bin/python bench/loglik_vs_harness.py --examples 12 --repeats 1
    .venv/bin/python bench/loglik_vs_harness.py --tiny           # a tiny random Llama, seconds (tests/test_bench.py)

The adapters: the demo adapter (examples/adapters/arith), then seeded random ones of other ranks and
targets (`compare_strategies.demo_adapters`); with --tiny, tests/tiny_models.py's Llama and adapters.
Needs lm-eval (the harness extra, requirements-harness.lock).
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare_strategies import demo_adapters  # noqa: E402
from tests.harness import HarnessRun, harness_installed, run_harness, task_from_config  # noqa: E402

EXAMPLE = REPO / "examples/choice/choice.yaml"
#: The tiny mode's adapters (tests/tiny_models.ADAPTERS): other ranks and targets each.
TINY_ADAPTERS = ["r1", "dropout_lora_bias", "r64_rslora", "patterns"]
#: `lora-compare` as the console script runs it, but from this tree (the script points at main).
CLI = "import sys; from producer.cli import main; sys.argv[0] = 'lora-compare'; main()"


@dataclass(frozen=True)
class Setup:
    """What both sides run: the base model folder, the config (with the adapters) and its variants."""

    base: Path
    config: Path
    adapters: dict[str, Path]  # variant name -> adapter folder, in the config's order
    examples: int
    batch_size: int
    label: str


@dataclass(frozen=True)
class Side:
    """One round of one side: wall and CPU seconds of its whole process(es)."""

    wall_s: float
    cpu_s: float
    processes: int
    scoring_s: float | None = None  # ours: the chunks' time inside scoring


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def prepare(tmp: Path, *, tiny: bool, k: int, examples: int, batch_size: int) -> Setup:
    """The models, adapters and the run config (examples/choice/choice.yaml with the K adapters, the
    row limit and the batch size)."""
    if tiny:
        from tests.tiny_models import ADAPTERS, make_adapter, make_model

        base = make_model("llama", tmp / "tiny", seed=0)
        folders = [make_adapter(base, "llama", ADAPTERS[name], tmp / name, seed=1 + i)
                   for i, name in enumerate(TINY_ADAPTERS[:k])]
        base_key, label = str(base), "tiny random Llama (tests/tiny_models.py)"
    else:
        from contract.settings import Settings
        from worker.demo_model import prepare_demo_model

        base = prepare_demo_model(Settings.from_env().demo_model_dir)
        folders = demo_adapters(base, tmp, k)
        base_key, label = "demo", "demo model (SmolLM2-135M-Instruct)"
    if len(folders) < k:
        raise SystemExit(f"--adapters {k}: at most {len(folders)} adapters here")
    adapters = {folder.name: folder.resolve() for folder in folders}
    config = yaml.safe_load(EXAMPLE.read_text())
    config["name"] = "bench-choice"
    config["model"].update(base=base_key, adapters={n: str(p) for n, p in adapters.items()}, dtype="float32")
    config["dataset"].update(path=str((EXAMPLE.parent / config["dataset"]["path"]).resolve()), limit=examples)
    config["inference"]["batch_size"] = batch_size
    path = tmp / "choice.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Setup(base, path, adapters, examples, batch_size, label)


def run_ours(setup: Setup, db: Path) -> Side:
    """One `lora-compare run` process on a fresh SQLite file."""
    db.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, "--database-url", f"sqlite:///{db}", "run", "-q",
                           str(setup.config)], cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"lora-compare run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    with sqlite3.connect(db) as conn:
        (scoring,) = conn.execute("SELECT SUM(generate_seconds) FROM chunks").fetchone()
    return Side(wall, cpu, 1, scoring)


def run_theirs(setup: Setup, task: dict[str, Any]) -> tuple[Side, dict[str, HarnessRun]]:
    """The harness once for the base and once per adapter, each a whole process."""
    runs: dict[str, HarnessRun] = {}
    cpu = _children_cpu()
    for variant, peft in [("base", None), *setup.adapters.items()]:
        runs[variant] = run_harness(task, setup.base, peft=peft, batch_size=setup.batch_size, limit=setup.examples)
    return Side(sum(r.wall_s for r in runs.values()), _children_cpu() - cpu, len(runs)), runs


def our_scores(db: Path) -> dict[tuple[str, int], list[float]]:
    """(variant, example) -> each choice's stored log-likelihood, in choice order."""
    out: dict[tuple[str, int], list[float]] = {}
    with sqlite3.connect(db) as conn:
        for variant, idx, logprob in conn.execute(
                "SELECT variant, example_idx, logprob FROM loglikelihoods ORDER BY variant, example_idx, choice_idx"):
            out.setdefault((variant, idx), []).append(logprob)
    return out


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's argmax, the harness's pick among ties)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def agreement(ours: dict[tuple[str, int], list[float]], runs: dict[str, HarnessRun]) -> dict[str, Any]:
    """Same predictions, max relative difference of the log-likelihoods, acc per variant on both sides."""
    same = total = 0
    worst = 0.0
    acc: dict[str, tuple[int, int, int]] = {}
    for variant, run in runs.items():
        ours_right = theirs_right = 0
        for sample in run.samples:
            mine, theirs = ours[variant, sample["doc_id"]], sample["logprobs"]
            if len(mine) != len(theirs):
                raise SystemExit(f"{variant} example {sample['doc_id']}: {len(mine)} choices here, "
                                 f"{len(theirs)} in the harness")
            total += 1
            same += _argmax(mine) == _argmax(theirs)
            worst = max(worst, *(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine, theirs)))
            ours_right += _argmax(mine) == sample["gold"]
            theirs_right += _argmax(theirs) == sample["gold"]
        acc[variant] = (ours_right, theirs_right, len(run.samples))
    return {"same": same, "total": total, "max_rel": worst, "acc": acc}


def print_results(setup: Setup, rounds: list[tuple[Side, Side]], agree: dict[str, Any]) -> None:
    variants = 1 + len(setup.adapters)
    ours = min((r[0] for r in rounds), key=lambda s: s.wall_s)
    theirs = min((r[1] for r in rounds), key=lambda s: s.wall_s)
    print(f"\nrounds (ours, then the harness's {variants} processes):")
    print(f"{'round':<7}{'ours wall s':>12}{'ours cpu s':>12}{'harness wall s':>16}{'harness cpu s':>15}"
          f"{'wall ratio':>12}")
    for i, (a, b) in enumerate(rounds, start=1):
        print(f"{i:<7}{a.wall_s:>12.2f}{a.cpu_s:>12.2f}{b.wall_s:>16.2f}{b.cpu_s:>15.2f}{b.wall_s / a.wall_s:>11.2f}x")
    print(f"\nbest of {len(rounds)}: {setup.examples} examples x 4 choices x {variants} variants, "
          f"batch size {setup.batch_size}")
    print(f"{'side':<14}{'processes':>10}{'wall s':>9}{'cpu s':>9}{'scoring s':>11}")
    print(f"{'lora-compare':<14}{1:>10}{ours.wall_s:>9.2f}{ours.cpu_s:>9.2f}{ours.scoring_s or 0.0:>11.2f}")
    print(f"{'lm-eval':<14}{theirs.processes:>10}{theirs.wall_s:>9.2f}{theirs.cpu_s:>9.2f}{'-':>11}")
    print(f"ratio harness / ours: {theirs.wall_s / ours.wall_s:.2f}x wall, {theirs.cpu_s / ours.cpu_s:.2f}x cpu "
          f"(target >= 3x)")
    print(f"ours outside scoring (start-up, imports, model and adapter loading, SQL): "
          f"{ours.wall_s - (ours.scoring_s or 0.0):.2f} s of {ours.wall_s:.2f} s")
    print(f"agreement: the same prediction on {agree['same']}/{agree['total']} (example, variant); max relative "
          f"difference of per-choice log-likelihoods {agree['max_rel']:.2e}")
    accs = (f"{v} {a}/{n} and {b}/{n}" for v, (a, b, n) in agree["acc"].items())
    print("acc, ours and the harness: " + ", ".join(accs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60, help="the first N rows of the choice set (default all 60)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds; each side's best counts")
    parser.add_argument("--batch-size", type=int, default=16, help="both sides' batch_size (the example's 16)")
    parser.add_argument("--adapters", type=int, default=3, help="adapters besides the base")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama, a handful of examples: seconds")
    args = parser.parse_args()
    if not harness_installed():
        raise SystemExit("lm-eval is not installed: the harness extra (requirements-harness.lock; make venv)")
    examples = min(args.examples, 6) if args.tiny else args.examples
    print(f"load at start: {_load()}")
    with tempfile.TemporaryDirectory(prefix="loglik-bench-") as tmp:
        setup = prepare(Path(tmp), tiny=args.tiny, k=args.adapters, examples=examples, batch_size=args.batch_size)
        print(f"{setup.label}, float32, cpu; adapters: {', '.join(setup.adapters)}")
        task = task_from_config(setup.config)
        db = Path(tmp) / "results.db"
        rounds: list[tuple[Side, Side]] = []
        agree: dict[str, Any] = {}
        for i in range(args.repeats):
            ours = run_ours(setup, db)
            scores = our_scores(db)
            theirs, runs = run_theirs(setup, task)
            rounds.append((ours, theirs))
            agree = agreement(scores, runs)  # the same every round (float32, the same inputs); the last is kept
            print(f"round {i + 1}: ours {ours.wall_s:.2f} s, harness {theirs.wall_s:.2f} s "
                  f"({', '.join(f'{v} {r.wall_s:.1f}' for v, r in runs.items())})", flush=True)
        print_results(setup, rounds, agree)
    print(f"\nload at end: {_load()}")


if __name__ == "__main__":
    main()
