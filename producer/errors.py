"""The producer's errors. Each message names the file, key, row or line, and says what to change."""

from __future__ import annotations


class ProducerError(Exception):
    """Base class: a user error, shown as one line without a traceback."""


class ConfigError(ProducerError):
    """The run config is unreadable, has an unknown key, a wrong type or an impossible value."""


class DatasetError(ProducerError):
    """The dataset is missing, empty, malformed, or a row lacks a field its templates use."""


class AdapterError(ProducerError):
    """An adapter folder is missing, is not a LoRA adapter, or was made for another base model."""


class RunNotFoundError(ProducerError):
    """No run has the id given."""
