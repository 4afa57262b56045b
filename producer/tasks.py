"""Rendering a dataset row for each task: the prompt and reference (generate), the context, choices and
gold answer (choice), the document (perplexity). Every problem is a one-line DatasetError naming the row,
raised before anything is recorded or queued.

Choices and answers follow lm-evaluation-harness (`doc_to_choice`, `doc_to_target`): a single template
renders a list (a field that holds one, or a Python/JSON list literal in the rendered text); an answer
made of digits is a 0-based index; otherwise it is a letter (A, B, ...) or the exact text of a choice.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

from contract.config import DatasetConfig, RunConfig
from contract.errors import ConfigError, DatasetError
from db.runs import NewExample

from .dataset import Row
from .templates import RowTemplate, render_row

#: A template that is just one field, e.g. "{{ options }}": that field's value is taken as it is.
_ONE_FIELD = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class TaskTemplates:
    """The compiled templates of one run's dataset keys."""

    task: str
    prompt: RowTemplate | None
    reference: RowTemplate | None = None
    choices: RowTemplate | tuple[RowTemplate, ...] | None = None
    answer: RowTemplate | None = None
    text: RowTemplate | None = None

    @classmethod
    def compile(cls, config: RunConfig, source: str) -> TaskTemplates:
        d = config.dataset
        try:
            return cls(
                task=config.task,
                prompt=RowTemplate("dataset.prompt", d.prompt) if config.task != "perplexity" else None,
                reference=RowTemplate("dataset.reference", d.reference) if d.reference else None,
                choices=_choice_templates(d),
                answer=RowTemplate("dataset.answer", d.answer) if d.answer is not None else None,
                text=RowTemplate("dataset.text", d.text) if d.text is not None else None,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def example(self, row: Row) -> NewExample:
        """The row as it is stored (DatasetError naming the row when it cannot be)."""
        if self.task == "perplexity":
            assert self.text is not None
            text = self.text.render(row)
            if not text.strip():
                raise DatasetError(f"{row.where}: the dataset.text template renders an empty document")
            return NewExample(idx=row.idx, data=row.data, prompt=text, reference=None)
        assert self.prompt is not None
        if self.task == "generate":
            text, ref = render_row(self.prompt, self.reference, row)
            return NewExample(idx=row.idx, data=row.data, prompt=text, reference=ref)
        assert self.choices is not None and self.answer is not None
        context = self.prompt.render(row)
        choices = render_choices(self.choices, row)
        gold = answer_index(self.answer.render(row), choices, row)
        return NewExample(idx=row.idx, data=row.data, prompt=context, reference=choices[gold], choices=choices,
                          answer_index=gold)


def _choice_templates(d: DatasetConfig) -> RowTemplate | tuple[RowTemplate, ...] | None:
    if d.choices is None:
        return None
    if isinstance(d.choices, str):
        return RowTemplate("dataset.choices", d.choices)
    return tuple(RowTemplate(f"dataset.choices[{i}]", c) for i, c in enumerate(d.choices))


def render_choices(spec: RowTemplate | tuple[RowTemplate, ...], row: Row) -> list[str]:
    """The row's answer choices, in order: each a non-empty string."""
    if isinstance(spec, tuple):
        choices = [t.render(row) for t in spec]
    else:
        field = _ONE_FIELD.match(spec.source)
        value = row.data.get(field.group(1)) if field else None
        if not isinstance(value, list):
            rendered = spec.render(row)  # names a missing field in its error
            try:
                value = ast.literal_eval(rendered.strip())
            except (ValueError, SyntaxError):
                raise DatasetError(f"{row.where}: the dataset.choices template must give a list of choices, "
                                   f"got {_short(rendered)}") from None
            if not isinstance(value, (list, tuple)):
                raise DatasetError(f"{row.where}: the dataset.choices template must give a list of choices, "
                                   f"got {type(value).__name__} {_short(rendered)}")
        if any(isinstance(c, (dict, list, tuple)) or c is None for c in value):
            raise DatasetError(f"{row.where}: every choice must be a string or a number, got {_short(str(value))}")
        choices = [str(c) for c in value]
    if not choices:
        raise DatasetError(f"{row.where}: the choice list is empty")
    for i, choice in enumerate(choices):
        if not choice:
            raise DatasetError(f"{row.where}: choice {i} is empty")
    return choices


def answer_index(answer: str, choices: Sequence[str], row: Row) -> int:
    """The gold choice's 0-based index: digits are an index, then a choice's exact text, then a letter."""
    given = answer.strip()
    if given.isdigit():
        index = int(given)
        if index < len(choices):
            return index
        also = f" (it is also the text of choice {choices.index(given)}: the answer's digits are read as an index)" \
            if given in choices else ""
        raise DatasetError(f"{row.where}: the answer {given!r} is not among its {len(choices)} choices "
                           f"(an index from 0 to {len(choices) - 1}){also}")
    if answer in choices:
        return choices.index(answer)
    if given in choices:
        return choices.index(given)
    if len(given) == 1 and given.upper() in _LETTERS[:len(choices)]:
        return _LETTERS.index(given.upper())
    listed = ", ".join(_short(c, 20) for c in choices[:6]) + (", ..." if len(choices) > 6 else "")
    raise DatasetError(f"{row.where}: the answer {_short(answer)} is not among its choices ({listed}); give an "
                       "index, a letter or the exact text of a choice")


def _short(text: str, limit: int = 60) -> str:
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return repr(text)
