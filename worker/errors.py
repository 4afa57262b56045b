"""Errors raised by the worker: a chunk's, split into those worth retrying and those that fail it now;
`verify`'s refusals."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of the worker's own errors."""


class FatalChunkError(WorkerError):
    """A chunk cannot succeed as configured (retrying it would fail the same way)."""


class ModelLoadError(FatalChunkError):
    """The base model or an adapter could not be loaded (missing, wrong format, wrong base)."""


class RetryableChunkError(WorkerError):
    """A passing fault (database, broker, out of memory once); the chunk is tried again."""


class VerifyError(WorkerError):
    """`verify` cannot regenerate the run as asked (sampled outputs, no GPU here, changed model files)."""
