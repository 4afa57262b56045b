"""Log-likelihood tasks' config keys and bad input (issue 15, acceptance 4): a row whose answer is not
among its choices, an empty choice list, a missing text field: each a one-line error naming the row,
before anything is recorded or queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.config import RunConfig, load_config
from contract.errors import ConfigError, DatasetError
from producer.dataset import Row
from producer.tasks import TaskTemplates, answer_index, render_choices
from producer.templates import RowTemplate
from tests.test_cli_errors import _assert_one_line_error, _invoke, _runs_in, tiny  # noqa: F401 - fixtures

CHOICE = """
task: choice
model:
  base: {base}
  adapters:
    attn: {attn}
dataset:
  path: mc.jsonl
  prompt: "Question: {{{{ question }}}}\\nAnswer:"
  choices: "{{{{ options }}}}"
  answer: "{{{{ label }}}}"
"""

PERPLEXITY = """
task: perplexity
model:
  base: {base}
  adapters:
    attn: {attn}
dataset:
  path: docs.jsonl
  text: "{{{{ text }}}}"
"""

MC_ROWS = [{"question": "What is 2 plus 3?", "options": ["4", "5", "6"], "label": 1},
           {"question": "What is 1 plus 1?", "options": ["2", "3"], "label": "A"},
           {"question": "Capital of France?", "options": ["Paris", "Rome"], "label": "Rome"}]


def _row(data: dict, idx: int = 0) -> Row:
    return Row(idx, f"mc.jsonl:{idx + 1}", data)


def _config(tmp_path: Path, text: str) -> RunConfig:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return load_config(path)


def test_choice_and_perplexity_configs_parse_and_round_trip(tmp_path: Path) -> None:
    choice = _config(tmp_path, CHOICE.format(base="demo", attn="a"))
    assert choice.task == "choice" and choice.loglik
    assert choice.dataset.choices == "{{ options }}" and choice.dataset.answer == "{{ label }}"
    assert choice.dataset.target_delimiter is None and choice.choice_delimiter == " "
    assert choice.dataset.chat_template is False
    assert RunConfig.from_dict(choice.to_dict()) == choice
    listed = _config(tmp_path, CHOICE.format(base="demo", attn="a").replace(
        '"{{ options }}"', '["{{ a }}", "{{ b }}"]') + '  target_delimiter: ""\n  chat_template: true\n')
    assert listed.dataset.choices == ("{{ a }}", "{{ b }}") and listed.dataset.target_delimiter == ""
    assert listed.dataset.chat_template is True and listed.choice_delimiter == ""
    templated = _config(tmp_path, CHOICE.format(base="demo", attn="a") + "  chat_template: true\n")
    assert templated.choice_delimiter == ""  # the harness's: the chat template's generation prompt ends the context
    assert RunConfig.from_dict(listed.to_dict()) == listed
    ppl = _config(tmp_path, PERPLEXITY.format(base="demo", attn="a"))
    assert ppl.task == "perplexity" and ppl.dataset.text == "{{ text }}" and ppl.dataset.prompt == ""
    assert RunConfig.from_dict(ppl.to_dict()) == ppl


@pytest.mark.parametrize(("edit", "needle"), [
    (("task: choice", "task: ranking"), "key 'task' must be one of generate, choice, perplexity"),
    (('  choices: "{{ options }}"\n', ""), "key 'dataset.choices' is required for task: choice"),
    (('  answer: "{{ label }}"\n', ""), "key 'dataset.answer' is required"),
    (("  path: mc.jsonl", "  path: mc.jsonl\n  reference: x"),
     "key 'dataset.reference' does not apply to task: choice"),
    (("dataset:", "generation:\n  max_new_tokens: 4\ndataset:"), "key 'generation' does not apply to task: choice"),
    (('"{{ options }}"', "[]"), "key 'dataset.choices' must be a non-empty list"),
])
def test_choice_config_errors_name_the_key(tmp_path: Path, edit: tuple[str, str], needle: str) -> None:
    text = CHOICE.format(base="demo", attn="a")
    assert edit[0] in text
    with pytest.raises(ConfigError, match="cfg.yaml") as err:
        _config(tmp_path, text.replace(*edit))
    assert needle in str(err.value)


def test_perplexity_needs_its_text_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'dataset.text' is required"):
        _config(tmp_path, PERPLEXITY.format(base="demo", attn="a").replace('  text: "{{ text }}"\n', ""))
    with pytest.raises(ConfigError, match="key 'dataset.prompt' does not apply to task: perplexity"):
        _config(tmp_path, PERPLEXITY.format(base="demo", attn="a") + '  prompt: "x"\n')
    for key in ("chat_template: true", "system_prompt: be brief"):
        with pytest.raises(ConfigError, match=f"key 'dataset.{key.split(':')[0]}' does not apply to task: perplexity"):
            _config(tmp_path, PERPLEXITY.format(base="demo", attn="a") + f"  {key}\n")


def test_answers_are_an_index_a_choice_text_or_a_letter() -> None:
    row = _row({})
    assert answer_index("1", ["4", "5", "6"], row) == 1
    assert answer_index("Rome", ["Paris", "Rome"], row) == 1
    assert answer_index("B", ["Paris", "Rome"], row) == 1
    assert answer_index("b", ["x", "y", "z"], row) == 1
    assert answer_index("A", ["A", "B"], row) == 0  # the text before the letter
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: the answer '7' is not among its 3 choices"):
        answer_index("7", ["4", "5", "6"], row)
    with pytest.raises(DatasetError, match=r"it is also the text of choice 1"):
        answer_index("5", ["4", "5"], row)
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: the answer 'Berlin' is not among its choices \('Paris', "):
        answer_index("Berlin", ["Paris", "Rome"], row)


def test_choices_from_a_field_a_literal_or_one_template_each() -> None:
    field = RowTemplate("dataset.choices", "{{ options }}")
    assert render_choices(field, _row({"options": ["a", 2, "c"]})) == ["a", "2", "c"]
    literal = RowTemplate("dataset.choices", "{{ options | join('|') }}")
    with pytest.raises(DatasetError, match="must give a list of choices"):
        render_choices(literal, _row({"options": ["a", "b"]}))
    assert render_choices(RowTemplate("dataset.choices", "{{ s }}"), _row({"s": "['x', 'y']"})) == ["x", "y"]
    each = (RowTemplate("dataset.choices[0]", "{{ a }}"), RowTemplate("dataset.choices[1]", "{{ b }}"))
    assert render_choices(each, _row({"a": "yes", "b": "no"})) == ["yes", "no"]
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: the choice list is empty"):
        render_choices(field, _row({"options": []}))
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: choice 1 is empty"):
        render_choices(field, _row({"options": ["a", ""]}))
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: the dataset.choices template uses 'options'"):
        render_choices(field, _row({"opts": ["a"]}))


def test_examples_store_context_choices_and_gold(tmp_path: Path) -> None:
    templates = TaskTemplates.compile(_config(tmp_path, CHOICE.format(base="demo", attn="a")), "cfg.yaml")
    examples = [templates.example(_row(r, i)) for i, r in enumerate(MC_ROWS)]
    assert [e.answer_index for e in examples] == [1, 0, 1]
    assert [e.reference for e in examples] == ["5", "2", "Rome"]
    assert examples[0].prompt == "Question: What is 2 plus 3?\nAnswer:" and examples[0].choices == ["4", "5", "6"]


# --- through the CLI: one line, exit 1, nothing recorded -------------------------------------------

BAD_ROWS = {
    "answer not among its choices": ({"question": "q", "options": ["a", "b"], "label": 5},
                                     ["mc.jsonl:3", "the answer '5' is not among its 2 choices"]),
    "empty choice list": ({"question": "q", "options": [], "label": 0}, ["mc.jsonl:3", "the choice list is empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize("command", ["submit", "run"])
def test_bad_choice_row_is_one_line_naming_the_row(tmp_path: Path, tiny: tuple[Path, Path],  # noqa: F811
                                                   case: str, command: str) -> None:
    bad, needles = BAD_ROWS[case]
    rows = [*MC_ROWS[:2], bad, MC_ROWS[2]]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, attn = tiny
    (tmp_path / "cfg.yaml").write_text(CHOICE.format(base=base, attn=attn))
    code, output = _invoke(tmp_path, command, str(tmp_path / "cfg.yaml"))
    _assert_one_line_error(code, output, *needles)
    assert _runs_in(tmp_path) == 0


@pytest.mark.parametrize("command", ["submit", "run"])
def test_missing_text_field_is_one_line_naming_the_row(tmp_path: Path, tiny: tuple[Path, Path],  # noqa: F811
                                                       command: str) -> None:
    rows = [{"text": "One paragraph."}, {"body": "no text field here"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, attn = tiny
    (tmp_path / "cfg.yaml").write_text(PERPLEXITY.format(base=base, attn=attn))
    code, output = _invoke(tmp_path, command, str(tmp_path / "cfg.yaml"))
    _assert_one_line_error(code, output, "docs.jsonl:2", "uses 'text', which this row does not have")
    assert _runs_in(tmp_path) == 0
