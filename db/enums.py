"""The fixed vocabularies of the results database: run and chunk states, finish reasons, the base variant.

In SQL these are plain strings (the public surface of DESIGN.md), kept honest by CHECK constraints
(migration 0005); in Python they are `str` enums, so a member compares, hashes, formats and
serialises exactly like its value and can be written to a string column as it is.
"""

from __future__ import annotations

from enum import Enum

#: The variant name of the base model's rows (adapters use their own names; `base` is reserved).
BASE_VARIANT = "base"


class _StrEnum(str, Enum):
    """`enum.StrEnum` for Python 3.10 too: `str()` and f-strings give the value, not `Class.MEMBER`."""

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]


class RunStatus(_StrEnum):
    """A run's state. `queued` until a worker takes its first chunk."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Run states after which nothing more happens.
FINAL_RUN_STATUSES = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)


class ChunkStatus(_StrEnum):
    """A chunk's state."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptOutcome(_StrEnum):
    """How one attempt at a chunk ended (`chunk_attempts.outcome`, migration 0007)."""

    RUNNING = "running"  # claimed, not ended yet
    DONE = "done"  # its outputs were written and the chunk completed
    FAILED = "failed"  # an error was recorded: the chunk was retried, or failed for good
    WORKER_LOST = "worker_lost"  # its worker went silent: the lease expired and was taken back (sweep or takeover)
    REFUSED = "refused"  # the worker could not serve the chunk at all (a message from a newer producer)
    CANCELLED = "cancelled"  # ended from outside while it ran: `retry` requeued the chunk
    HANDED_BACK = "handed_back"  # a graceful shutdown gave the chunk back; not counted against max attempts


#: Attempts that `chunks.attempts` (the count the attempt bound uses) does not count: no claim, or one given back.
UNCOUNTED_OUTCOMES = (AttemptOutcome.REFUSED, AttemptOutcome.HANDED_BACK)


class FinishReason(_StrEnum):
    """Why generation of one row stopped, or why it never started."""

    EOS = "eos"  # the model emitted an end-of-sequence token
    STOP = "stop"  # a configured stop string was reached (the output is cut before it)
    LENGTH = "length"  # max_new_tokens reached
    EMPTY_PROMPT = "empty_prompt"  # not generated: the prompt is empty
    PROMPT_TOO_LONG = "prompt_too_long"  # not generated: prompt + max_new_tokens exceed the model's positions
    SCORED = "scored"  # not generated: a log-likelihood task scored the row (task: choice, perplexity)


#: `runs.queue` of a run generated in the process that recorded it (`run`, `retry --here`): no broker
#: holds its chunks' messages, so the workers' sweeps neither requeue nor re-send them (a fleet host
#: may not have its model); if that process dies, `status` shows the chunk stalled and `retry` resumes.
#: Not a valid broker queue name (`submit --queue` refuses it).
EMBEDDED_QUEUE = "(embedded)"

#: Finish reasons of rows that were never generated, so there is nothing to regenerate.
NOT_GENERATED = (FinishReason.EMPTY_PROMPT, FinishReason.PROMPT_TOO_LONG)
