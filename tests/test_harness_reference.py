"""lm-evaluation-harness as the reference (tests/harness.py): it runs offline on the bundled examples'
configs, returns per-example figures whose aggregates are the harness's metrics, reads the config keys
the way lora-compare does (a list of choice templates, a letter answer), and reproduces the checked-in
harness_expected.json. Skipped where lm-eval is not installed (`make venv` installs it; the image
does not)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.harness import HarnessRun, choice_task, harness_installed, run_harness, task_from_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not harness_installed(), reason="lm-eval is not installed: the harness extra, "
                                 "requirements-harness.lock (make venv installs it)")]

REPO = Path(__file__).resolve().parent.parent
CHOICE, PERPLEXITY = REPO / "examples/choice", REPO / "examples/perplexity"
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama and adapter of tests/harness_expected.py (same seeds)."""
    from tests.harness_expected import TINY_ADAPTER, TINY_ARCH
    from tests.tiny_models import ADAPTERS, make_adapter, make_model

    folder = tmp_path_factory.mktemp("tiny")
    base = make_model(TINY_ARCH, folder / "base", seed=0)
    return base, make_adapter(base, TINY_ARCH, ADAPTERS[TINY_ADAPTER], folder / "adapter", seed=1)


def _expected(example: Path, key: str) -> dict:
    return json.loads((example / "harness_expected.json").read_text())["runs"][key]  # type: ignore[no-any-return]


def _check_choice(run: HarnessRun, n: int) -> None:
    assert run.kind == "choice" and len(run.samples) == n
    assert [s["doc_id"] for s in run.samples] == list(range(n))
    for s in run.samples:
        assert len(s["logprobs"]) == len(s["continuations"]) == len(s["continuation_ids"]) == len(s["greedy"]) == 4
        assert all(lp < 0 for lp in s["logprobs"]) and s["context"].endswith("Answer:")
        assert all(c.startswith(" ") and ids for c, ids in zip(s["continuations"], s["continuation_ids"]))
        lengths = np.array([len(c) - 1 for c in s["continuations"]], dtype=float)  # the choice, no delimiter
        assert s["acc"] == float(np.argmax(s["logprobs"]) == s["gold"])
        assert s["acc_norm"] == float(np.argmax(np.array(s["logprobs"]) / lengths) == s["gold"])
    assert run.metrics["acc"] == pytest.approx(sum(s["acc"] for s in run.samples) / n)
    assert run.metrics["acc_norm"] == pytest.approx(sum(s["acc_norm"] for s in run.samples) / n)


def _check_perplexity(run: HarnessRun, n: int, max_length: int) -> None:
    assert run.kind == "perplexity" and len(run.samples) == n
    for s in run.samples:
        assert s["loglikelihood"] < 0 and s["bytes"] == len(s["text"].encode()) and s["words"] > 0
        assert s["windows"] == math.ceil(s["tokens"] / max_length)  # disjoint windows of max_length predictions
    ll = sum(s["loglikelihood"] for s in run.samples)
    words, nbytes = sum(s["words"] for s in run.samples), sum(s["bytes"] for s in run.samples)
    assert run.metrics["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-9)
    assert run.metrics["byte_perplexity"] == pytest.approx(math.exp(-ll / nbytes), rel=1e-9)
    assert run.metrics["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-9)


def test_choice_on_the_demo_model_reproduces_the_checked_in_figures(demo_model: Path) -> None:
    run = run_harness(task_from_config(CHOICE / "choice.yaml"), demo_model, peft=CHOICE / "../adapters/arith",
                      limit=4, batch_size=8)
    _check_choice(run, 4)
    assert run.model["max_length"] == 8192 and run.model["prefix_token_id"] == 1  # <|im_start|>, the BOS
    assert run.model["adds_special_tokens"] is False and run.lm_eval_version
    expected = _expected(CHOICE, "demo/arith")["examples"][:4]
    for got, want in zip(run.samples, expected):
        assert got["logprobs"] == pytest.approx(want["logprobs"], rel=1e-4, abs=1e-5)
        assert (got["gold"], got["acc"], got["acc_norm"]) == (want["gold"], want["acc"], want["acc_norm"])


def test_perplexity_takes_rolling_windows_on_a_tiny_model(tiny: tuple[Path, Path]) -> None:
    base, adapter = tiny
    task = task_from_config(PERPLEXITY / "perplexity.yaml")
    run = run_harness(task, base, peft=adapter, max_length=MAX_LENGTH, limit=3)
    _check_perplexity(run, 3, MAX_LENGTH)
    assert run.model["max_length"] == MAX_LENGTH and max(s["windows"] for s in run.samples) > 2
    expected = _expected(PERPLEXITY, "tiny/dropout_lora_bias")["examples"][:3]
    for got, want in zip(run.samples, expected):
        assert (got["tokens"], got["windows"], got["words"], got["bytes"]) == (
            want["tokens"], want["windows"], want["words"], want["bytes"])
        assert got["loglikelihood"] == pytest.approx(want["loglikelihood"], rel=1e-4)


def test_choice_templates_and_letter_answers_read_as_lora_compare_reads_them(tiny: tuple[Path, Path]) -> None:
    """One spec, three spellings: a field holding the list and an index; a list of templates and a
    letter (the same requests and gold); the choice's text as the answer (the same gold). A text of
    digits would be an index to the harness, hence the words after the numbers there."""
    data = CHOICE / "sums.jsonl"
    prompt = "Question: {{ question }}\nAnswer:"
    by_field, by_templates, by_text = (run_harness(task, tiny[0], max_length=MAX_LENGTH, limit=5, batch_size=4)
                                       for task in [
        choice_task("by_field", data, prompt=prompt, choices="{{ options }}", answer="{{ label }}"),
        choice_task("by_templates", data, prompt=prompt, choices=[f"{{{{ options[{i}] }}}}" for i in range(4)],
                    answer="{{ 'ABCD'[label] }}"),
        choice_task("by_text", data, prompt=prompt, choices=[f"{{{{ options[{i}] }}}} in all" for i in range(4)],
                    answer="{{ options[label] }} in all"),
    ])
    for run in (by_field, by_templates):
        _check_choice(run, 5)
    assert [(s["continuations"], s["gold"], s["logprobs"]) for s in by_templates.samples] == [
        (s["continuations"], s["gold"], s["logprobs"]) for s in by_field.samples]
    assert [s["gold"] for s in by_text.samples] == [s["gold"] for s in by_field.samples]
    assert all(c.endswith(" in all") for s in by_text.samples for c in s["continuations"])
