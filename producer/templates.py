"""Prompt and reference templates: Jinja2 over a row's fields, sandboxed and strict.

A field the template uses but the row lacks is an error naming the field and the row, never an
empty string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from contract.errors import ConfigError, DatasetError

from .dataset import Row

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")


@dataclass(frozen=True)
class RowTemplate:
    """A compiled template and the config key it came from (for errors)."""

    key: str
    source: str

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_template", _ENV.from_string(self.source))
        except TemplateError as err:
            raise ConfigError(f"key '{self.key}': template syntax error: {err}") from None

    def render(self, row: Row) -> str:
        try:
            return str(self._template.render(**row.data))  # type: ignore[attr-defined]
        except UndefinedError as err:
            match = _UNDEFINED_NAME.search(str(err))
            field = match.group(1) if match else str(err)
            fields = ", ".join(sorted(map(str, row.data))) or "none"
            raise DatasetError(
                f"{row.where}: the {self.key} template uses '{field}', which this row does not have "
                f"(its fields: {fields})"
            ) from None
        except TemplateError as err:
            raise DatasetError(f"{row.where}: cannot render the {self.key} template: {err}") from None
        except Exception as err:  # a template calling something invalid on a field's value
            raise DatasetError(f"{row.where}: cannot render the {self.key} template: {err}") from None


def render_row(prompt: RowTemplate, reference: RowTemplate | None, row: Row) -> tuple[str, str | None]:
    text = prompt.render(row)
    ref: Any = reference.render(row) if reference is not None else None
    return text, ref
