"""Reading typed values out of a parsed YAML mapping, naming `file: key 'section.key'` in every error."""

from __future__ import annotations

import difflib
from typing import Any

from .errors import ConfigError


class Reader:
    """Reads typed values out of one section, naming `file: key 'section.key'` in every error."""

    def __init__(self, source: str, section: str, data: Any, known: tuple[str, ...]) -> None:
        self.source, self.section = source, section
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(None, f"must be a mapping, got {kind(data)}")
        reject_unknown(source, section, data, known)
        self.data = data

    def error(self, key: str | None, message: str) -> ConfigError:
        name = f"{self.section}.{key}" if key else self.section
        return ConfigError(f"{self.source}: key '{name}' {message}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if not self.has(key):
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {kind(value)}")
        if required and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {kind(value)}")
        return value

    def integer(self, key: str, default: int | None, *, minimum: int) -> int | None:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {kind(value)}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {kind(value)}")
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise self.error(key, f"must be in {bracket}{low}, {high}], got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        assert value is not None
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got '{value}'")
        return value


def kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"
    return {"dict": "a mapping", "list": "a list"}.get(type(value).__name__, type(value).__name__)


def reject_unknown(source: str, section: str | None, data: dict[Any, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key in known:
            continue
        name = f"{section}.{key}" if section else str(key)
        hint = difflib.get_close_matches(str(key), known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(known)})"
        raise ConfigError(f"{source}: unknown key '{name}'{suggestion}")
