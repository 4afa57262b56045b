"""Write examples/{choice,perplexity}/harness_expected.json: lm-evaluation-harness's own figures for the
two bundled log-likelihood examples, the reference lora-compare's must equal.

For each example config (examples/choice/choice.yaml, examples/perplexity/perplexity.yaml), four
harness runs, each a whole process (tests/harness.py, float32 on CPU, offline), timed:
- the demo model (SmolLM2-135M-Instruct, `Settings().demo_model_dir`), base and `peft=` the config's
  adapter, at the model's own context length;
- a tiny random Llama of tests/tiny_models.py (seed 0) with its `dropout_lora_bias` adapter (seed 1),
  base and adapter, with `max_length` 64, so that long documents take several rolling windows.
Each run records the aggregate metrics, the per-example figures (per-choice log-probabilities; per
document the log-likelihood, tokens, windows, words and bytes), what HFLM used (max_length,
prefix_token_id, ...) and its wall time.

Usage (from the repository root, the harness installed: `make venv`):
    .venv/bin/python -m tests.harness_expected [--batch-size 16] [--only choice|perplexity]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import yaml

from contract.settings import Settings
from tests.harness import HarnessRun, run_harness, task_from_config
from tests.tiny_models import ADAPTERS, make_adapter, make_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = {"choice": REPO / "examples/choice/choice.yaml", "perplexity": REPO / "examples/perplexity/perplexity.yaml"}
TINY_ARCH, TINY_ADAPTER, TINY_MAX_LENGTH = "llama", "dropout_lora_bias", 64


def _record(run: HarnessRun) -> dict[str, Any]:
    """One run's entry: metrics, per-example figures (the texts left out), model facts, wall time."""
    if run.kind == "choice":
        examples = [{"logprobs": s["logprobs"], "gold": s["gold"], "acc": s["acc"], "acc_norm": s["acc_norm"]}
                    for s in run.samples]
    else:
        examples = [{k: s[k] for k in ("loglikelihood", "tokens", "windows", "words", "bytes")} for s in run.samples]
    return {"metrics": run.metrics, "model": run.model, "batch_size": run.options["batch_size"],
            "max_length_option": run.options["max_length"], "wall_s": round(run.wall_s, 2), "examples": examples}


def produce(kind: str, batch_size: int, tiny: tuple[Path, Path]) -> dict[str, Any]:
    """The four runs for one example config."""
    config = EXAMPLES[kind]
    task = task_from_config(config)
    adapters = yaml.safe_load(config.read_text())["model"]["adapters"]
    (name, folder), = adapters.items()
    demo = Settings.from_env().demo_model_dir
    runs = {
        "demo/base": run_harness(task, demo, batch_size=batch_size),
        f"demo/{name}": run_harness(task, demo, peft=config.parent / folder, batch_size=batch_size),
        "tiny/base": run_harness(task, tiny[0], batch_size=batch_size, max_length=TINY_MAX_LENGTH),
        f"tiny/{TINY_ADAPTER}": run_harness(task, tiny[0], peft=tiny[1], batch_size=batch_size,
                                            max_length=TINY_MAX_LENGTH),
    }
    first = next(iter(runs.values()))
    return {
        "lm_eval": first.lm_eval_version,
        "produced_by": "python -m tests.harness_expected (tests/harness.py: lm-eval's HFLM, dtype float32, "
                       "device cpu, num_fewshot 0, no chat template, offline)",
        "config": config.name,
        "task": {**task, "dataset_kwargs": {"data_files": {"test": str(Path(task["dataset_kwargs"]["data_files"]
                                                                         ["test"]).relative_to(REPO))}}},
        "tiny": {"made_by": f"tests/tiny_models.py make_model('{TINY_ARCH}', seed=0), make_adapter(ADAPTERS"
                            f"['{TINY_ADAPTER}'], seed=1)", "max_length": TINY_MAX_LENGTH},
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "runs": {key: _record(run) for key, run in runs.items()},
    }


def _dump(out: dict[str, Any]) -> str:
    """JSON with one line per example (the file stays short enough to read)."""
    lines: dict[str, str] = {}
    for key, run in out["runs"].items():
        for i, example in enumerate(run["examples"]):
            lines[marker := f"@{key}#{i}@"] = json.dumps(example)
            run["examples"][i] = marker
    text = json.dumps(out, indent=1)
    for marker, line in lines.items():
        text = text.replace(json.dumps(marker), line)
    return text + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", choices=sorted(EXAMPLES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tiny-") as tmp:
        base = make_model(TINY_ARCH, Path(tmp) / "base", seed=0)
        adapter = make_adapter(base, TINY_ARCH, ADAPTERS[TINY_ADAPTER], Path(tmp) / "adapter", seed=1)
        for kind in [args.only] if args.only else sorted(EXAMPLES):
            out = produce(kind, args.batch_size, (base, adapter))
            target = EXAMPLES[kind].parent / "harness_expected.json"
            target.write_text(_dump(out))
            for key, run in out["runs"].items():
                print(f"{kind} {key}: {run['metrics']} ({run['wall_s']} s)")


if __name__ == "__main__":
    main()
