"""lm-evaluation-harness as the reference (tests/harness.py): it runs offline on a task built from a
lora-compare config, returns per-example figures whose aggregates are the harness's metrics, and reads
the config keys the way lora-compare does (a list of choice templates, a letter answer). Its figures
against lora-compare's, on the demo model and in rolling windows: tests/test_harness_parity.py.
Skipped where lm-eval is not installed (`make venv` installs it; the image does not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.harness import HarnessRun, choice_task, harness_installed, run_harness

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


def test_choice_templates_and_letter_answers_read_as_lora_compare_reads_them(tiny: tuple[Path, Path]) -> None:
    """One spec, three spellings: a field holding the list and an index; a list of templates and a
    letter (the same requests and gold); the choice's text as the answer (the same gold). A text of
    digits would be an index to the harness, hence the words after the numbers there."""
    data = CHOICE / "sums.jsonl"
    prompt = "Question: {{ question }}\nAnswer:"
    by_field, by_templates, by_text = (run_harness(task, tiny[0], max_length=MAX_LENGTH, limit=5, batch_size=4,
                                                   in_process=True)
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
