"""An opt-in record of the decode loop's steps, for benchmarks: what each step cost against its context.

Off (the default), the loop pays one attribute read per step. A benchmark turns it on around a call:

    with steps.observe(seen.append):
        decode_rows(...)

and gets one `DecodeStep` per iteration of `scheduler._stream`: the rows stepped, the attention
width (shared prefix + the rows' own columns, padding included), whether rows were prefilled into
the batch in that iteration, and its wall time (from the start of the iteration to the end of the
forward pass that computes the next logits; on CUDA, to the next sync, which is the step's one
read-back of sampled tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeStep:
    """One iteration of the decode loop."""

    #: rows that went through the decode forward pass (after finished rows left)
    rows: int
    #: columns attention covered in that pass: shared prefix + own columns (padding included)
    context: int
    #: rows were prefilled and joined the batch in this iteration (its time includes that prefill)
    prefill: bool
    #: wall seconds of the iteration
    seconds: float


#: Called with every step while set (`observe`); None: nothing is recorded.
observer: Callable[[DecodeStep], None] | None = None


@contextmanager
def observe(callback: Callable[[DecodeStep], None]) -> Iterator[None]:
    """Call `callback` with every decode step run inside this block (one observer at a time)."""
    global observer
    if observer is not None:
        raise RuntimeError("decode steps are already observed")
    observer = callback
    try:
        yield
    finally:
        observer = None


def clock() -> float:
    """The clock the steps are timed with."""
    return time.perf_counter()
