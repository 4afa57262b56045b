"""Every error lora-compare raises on purpose, under one root.

    LoraCompareError
    ├── UserError              shown as one line, no traceback (the CLI's only translation rule)
    │   ├── ConfigError        the run config: unreadable, unknown key, wrong type, newer version
    │   ├── DatasetError       the dataset: missing, empty, malformed, a row lacking a field
    │   ├── AdapterError       an adapter folder: missing, not LoRA, made for another base
    │   ├── RunNotFoundError   no run has the id given; a variant the run does not have
    │   ├── VerifyError        `verify` cannot regenerate the run as asked
    │   ├── BrokerUnavailableError  the broker cannot be reached or does not answer in time
    │   └── ModelLoadError     (also a FatalChunkError) a model or adapter does not load
    └── ChunkError             a chunk's failure, as the worker sees it
        ├── FatalChunkError    retrying would fail the same way: the chunk is failed now
        ├── RetryableChunkError  a passing fault (database, broker): tried again, no attempt used
        └── ChunkInterrupted   the worker is shutting down: the chunk is handed back, not failed

Every message names the file, key, row or line, and says what to change.
"""

from __future__ import annotations


class LoraCompareError(Exception):
    """The root of the project's own errors."""


class UserError(LoraCompareError):
    """Something the user can fix; the CLI shows its message as one line and exits 1."""


class ConfigError(UserError):
    """The run config is unreadable, has an unknown key, a wrong type, an impossible value, or was
    written by a newer lora-compare."""


class DatasetError(UserError):
    """The dataset is missing, empty, malformed, or a row lacks a field its templates use."""


class AdapterError(UserError):
    """An adapter folder is missing, is not a LoRA adapter, or was made for another base model."""


class RunNotFoundError(UserError):
    """No run has the id given (or the run has no such variant)."""


class VerifyError(UserError):
    """`verify` cannot regenerate the run as asked (sampled outputs, no GPU here, changed model files)."""


class BrokerUnavailableError(UserError):
    """The broker cannot be reached or does not answer within its timeouts (the URL shown without password)."""


class ChunkError(LoraCompareError):
    """A chunk could not be completed."""


class FatalChunkError(ChunkError):
    """A chunk cannot succeed as configured (retrying it would fail the same way)."""


class RetryableChunkError(ChunkError):
    """A passing fault (database, broker); the chunk is tried again."""


class ChunkInterrupted(ChunkError):
    """The worker was asked to stop (SIGTERM, SIGQUIT, Ctrl-C) while generating: the decode engine
    stops at its next step and the chunk goes back to the queue, its attempt not counted."""


class ModelLoadError(FatalChunkError, UserError):
    """The base model or an adapter could not be loaded (missing, wrong format, wrong base, outside
    the folders this worker loads from)."""
