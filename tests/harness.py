"""lm-evaluation-harness, run offline as the reference for the log-likelihood tasks (issue 15).

The harness (`lm-eval`, the `harness` extra: requirements-harness.lock, never in the Docker image)
runs a local task over local JSON-lines data with its `hf` model (HFLM): float32 on CPU, the base
model alone or with one adapter (`peft=`), exactly as a user runs it for one adapter. The task YAML is
made from the same parameters as a lora-compare config (`dataset.prompt`, `dataset.choices`,
`dataset.answer`, `dataset.target_delimiter`; `dataset.text`), so a test builds both from one spec:

    task = choice_task("sums", data, prompt="What is {{ a }} plus {{ b }}?", choices="{{ options }}",
                       answer="{{ label }}")
    run = run_harness(task, demo_model, peft=adapter_dir)
    run.metrics["acc"], run.samples[0]["logprobs"]

`run_harness` runs the harness in a fresh Python process by default (`python -m tests.harness SPEC
OUT`, the whole process timed in `wall_s`, as a user's `lm_eval` run would be); `in_process=True`
calls the same code here. Nothing is downloaded (the subprocess sets HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE) and nothing is cached outside a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
#: Metrics of each kind of task, as the harness names them.
CHOICE_METRICS = ("acc", "acc_norm", "acc_bytes")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def harness_installed() -> bool:
    """Whether lm-eval is importable here (`make venv` installs it; the image does not)."""
    from importlib.util import find_spec

    return find_spec("lm_eval") is not None


def _dataset(data_files: Path) -> dict[str, Any]:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(Path(data_files).resolve())}},
            "test_split": "test"}


def choice_task(name: str, data_files: Path, *, prompt: str, choices: str | list[str], answer: str,
                target_delimiter: str = " ") -> dict[str, Any]:
    """The harness's `multiple_choice` task for a lora-compare `task: choice` dataset config.

    `prompt` is doc_to_text (the context). `choices` is a template rendering a field that holds a list
    of strings ("{{ options }}"), or a list of templates, one per choice: the harness reads a YAML list
    as literal choices, so the list becomes one template rendering the Python list of the rendered
    choices. `answer` renders an index (0-based), a single capital letter (A = 0) or the choice text;
    the harness knows only indices and texts, so a letter is turned into its index in the template.
    The harness reads a rendered answer of digits as an index, never as a choice's text; a choice
    field's items must be strings (it divides by their lengths).
    """
    if isinstance(choices, list):
        parts = "".join(f"{{% set c{i} %}}{t}{{% endset %}}" for i, t in enumerate(choices))
        choices = parts + "{{ [" + ", ".join(f"c{i}" for i in range(len(choices))) + "] }}"
    target = (f"{{% set a %}}{answer}{{% endset %}}"
              f"{{{{ '{_LETTERS}'.index(a) if a|length == 1 and a in '{_LETTERS}' else a }}}}")
    return {"task": name, **_dataset(data_files), "output_type": "multiple_choice",
            "doc_to_text": prompt, "doc_to_choice": choices, "doc_to_target": target,
            "target_delimiter": target_delimiter,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in CHOICE_METRICS]}


def perplexity_task(name: str, data_files: Path, *, text: str = "{{ text }}") -> dict[str, Any]:
    """The harness's `loglikelihood_rolling` task for a lora-compare `task: perplexity` config (as its
    wikitext task: the whole document is the target, the three perplexity metrics)."""
    aggregation = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                   "bits_per_byte": "bits_per_byte"}
    return {"task": name, **_dataset(data_files), "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": text, "should_decontaminate": False,
            "metric_list": [{"metric": m, "aggregation": aggregation[m], "higher_is_better": False}
                            for m in PERPLEXITY_METRICS]}


def task_from_config(config: Path) -> dict[str, Any]:
    """The harness task for a lora-compare run config of `task: choice` or `task: perplexity` (its
    dataset keys, the path relative to the config file), named after the config's `name`."""
    data = yaml.safe_load(Path(config).read_text())
    dataset, name = data["dataset"], data.get("name", Path(config).stem)
    if dataset.get("chat_template", False):
        raise ValueError(f"{config}: key 'dataset.chat_template': the reference runs without a chat template")
    path = Path(config).resolve().parent / dataset["path"]
    if data.get("task") == "choice":
        return choice_task(name, path, prompt=dataset["prompt"], choices=dataset["choices"], answer=dataset["answer"],
                           target_delimiter=dataset.get("target_delimiter", " "))
    if data.get("task") == "perplexity":
        return perplexity_task(name, path, text=dataset.get("text", "{{ text }}"))
    raise ValueError(f"{config}: key 'task' must be choice or perplexity, got {data.get('task')!r}")


@dataclass(frozen=True)
class HarnessRun:
    """One harness run's figures as plain data.

    metrics: the task's aggregate metrics (acc, acc_norm, acc_bytes / the three perplexity figures).
    samples: per document in dataset order. choice: doc_id, context, continuations (delimiter
    included), context_ids and continuation_ids (the harness's encoding of each pair), logprobs and
    greedy per choice, gold, acc, acc_norm. perplexity: doc_id, text, loglikelihood, tokens (the
    harness's tok_encode), windows, words, bytes.
    model: what HFLM used: max_length, prefix_token_id, add_bos_token, bos/eos ids, and whether its
    tok_encode adds special tokens to a plain string ("adds_special_tokens").
    """

    kind: str
    metrics: dict[str, float]
    samples: list[dict[str, Any]]
    model: dict[str, Any]
    lm_eval_version: str
    wall_s: float
    options: dict[str, Any] = field(default_factory=dict)


def run_harness(task: dict[str, Any], pretrained: Path, *, peft: Path | None = None, batch_size: int = 8,
                max_length: int | None = None, limit: int | None = None, in_process: bool = False,
                timeout: float = 3600) -> HarnessRun:
    """Run lm-evaluation-harness's `hf` model (float32, CPU) on `task` (from choice_task or
    perplexity_task), for the model in the folder `pretrained`, with the adapter folder `peft` if given.
    `max_length` overrides the model's context length (the rolling windows' length); `limit` takes the
    first documents only. In a subprocess unless `in_process`; `wall_s` is that whole process's time.
    In process, the caller's environment must already be offline (HF_HUB_OFFLINE=1 before transformers
    is imported); the subprocess sets it itself."""
    spec = {"task": task, "pretrained": str(pretrained), "peft": str(peft) if peft else None,
            "batch_size": batch_size, "max_length": max_length, "limit": limit}
    if in_process:
        start = time.perf_counter()
        out = _evaluate(spec)
        return HarnessRun(**{**out, "wall_s": time.perf_counter() - start})
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tests.harness", str(spec_file), str(out_file)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"lm-eval failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = json.loads(out_file.read_text())
    return HarnessRun(**{**out, "wall_s": wall})


def _offline() -> None:
    """No hub access: set before lm_eval, datasets and transformers are imported (they read it then)."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")


def _evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """The harness run itself: the task YAML in a folder of its own, HFLM, simple_evaluate; its
    log_samples turned into plain data."""
    with tempfile.TemporaryDirectory(prefix="harness-task-") as tmp:
        from importlib.metadata import version

        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        task = spec["task"]  # the datasets cache (Arrow files of the JSON) in the folder too, never ~/.cache
        task = {**task, "dataset_kwargs": {**task["dataset_kwargs"], "cache_dir": str(Path(tmp) / "datasets")}}
        (Path(tmp) / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        lm = HFLM(pretrained=spec["pretrained"], peft=spec["peft"], dtype="float32", device="cpu",
                  batch_size=spec["batch_size"], max_length=spec["max_length"])
        results = simple_evaluate(model=lm, tasks=[task["task"]], num_fewshot=0, limit=spec["limit"],
                                  task_manager=TaskManager(include_path=tmp, include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, apply_chat_template=False)
        assert results is not None
        kind = "choice" if task["output_type"] == "multiple_choice" else "perplexity"
        names = CHOICE_METRICS if kind == "choice" else PERPLEXITY_METRICS
        metrics = {m: float(results["results"][task["task"]][f"{m},none"]) for m in names}
        raw = sorted(results["samples"][task["task"]], key=lambda s: s["doc_id"])
        delimiter = task.get("target_delimiter", " ")
        samples = [_choice_sample(lm, s, delimiter) if kind == "choice" else _perplexity_sample(lm, s) for s in raw]
        probe = "a plain string"
        model = {"max_length": lm.max_length, "prefix_token_id": lm.prefix_token_id,
                 "add_bos_token": lm.add_bos_token, "bos_token_id": lm.tokenizer.bos_token_id,
                 "eos_token_id": lm.tokenizer.eos_token_id,
                 "adds_special_tokens": lm.tok_encode(probe) != lm.tokenizer.encode(probe, add_special_tokens=False)}
        options = {k: spec[k] for k in ("pretrained", "peft", "batch_size", "max_length", "limit")}
        return {"kind": kind, "metrics": metrics, "samples": samples, "model": model,
                "lm_eval_version": version("lm-eval"), "options": options}


def _encode(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's own encoding of one request (HFLM.loglikelihood's, empty context included)."""
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        return ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
    return lm._encode_pair(context, continuation)  # type: ignore[no-any-return]


def _arguments(sample: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A logged sample's request arguments (a list of tuples in memory; JSON files name them)."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ..., "arg_1": ...}}, as in the results files
        return [tuple(a.values()) for a in args.values()]
    return [tuple(a) for a in args]


def _choice_sample(lm: Any, sample: dict[str, Any], delimiter: str) -> dict[str, Any]:
    requests = [(str(ctx), str(cont)) for ctx, cont in _arguments(sample)]
    choices = [cont[len(delimiter):] for _, cont in requests]
    gold = sample["target"]  # as the harness resolves it: an index, or a choice's text (-100: none)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -100
    encoded = [_encode(lm, ctx, cont) for ctx, cont in requests]
    responses = [r[0] for r in sample["resps"]]  # per choice: [(logprob, is_greedy)]
    return {"doc_id": sample["doc_id"], "context": requests[0][0], "continuations": [c for _, c in requests],
            "context_ids": encoded[0][0], "continuation_ids": [cont for _, cont in encoded],
            "logprobs": [float(r[0]) for r in responses], "greedy": [bool(r[1]) for r in responses],
            "gold": gold, "acc": float(sample["acc"]), "acc_norm": float(sample["acc_norm"])}


def _perplexity_sample(lm: Any, sample: dict[str, Any]) -> dict[str, Any]:
    from lm_eval.utils import get_rolling_token_windows

    (text,) = _arguments(sample)[0]
    tokens = lm.tok_encode(text)
    windows = list(get_rolling_token_windows(token_list=tokens, prefix_token=lm.prefix_token_id,
                                             max_seq_len=lm.max_length, context_len=1))
    loglikelihood, words = sample["word_perplexity"]
    _, nbytes = sample["byte_perplexity"]
    return {"doc_id": sample["doc_id"], "text": text, "loglikelihood": float(loglikelihood), "tokens": len(tokens),
            "windows": len(windows), "words": int(words), "bytes": int(nbytes)}


def main(argv: list[str]) -> int:
    """`python -m tests.harness SPEC.json OUT.json`: one run, as run_harness's subprocess."""
    spec_file, out_file = argv
    _offline()
    out = _evaluate(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


