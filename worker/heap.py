"""How a worker process's C heap hands back the memory of large tensors: at once, and the same way
in every run.

glibc's `malloc` serves a request of at least its mmap threshold with pages of its own, unmapped
when freed; smaller ones come from the heap, which keeps what is freed for reuse. The threshold
starts at 128 KiB and, by default, rises to the size of each large block freed (up to 32 MiB). A
decode step frees its logits (6 MiB for the demo model's 32 rows) and other large intermediates every
step, so after the first one such tensors come from the heap, where blocks freed in another order
than they were taken leave holes the heap cannot give back. How much stayed resident varied from run
to run: on an AMD host the decode phase of the same 3-adapter run grew the process by 95 to 206 MiB
in nine runs, 63 MiB of it the KV cache (whose buffers have pages of their own already,
`kv_cache.zeros`). With the threshold fixed at `THRESHOLD` it grew by 96-101 MiB in two runs, and
its peak measured 1,121-1,132 MiB in four runs against 1,112-1,235 in nine without (the bench's
peak 1,119-1,127 against 1,134); a 6 MiB block mapped and unmapped every step cost no measurable
time beside the product that fills it (`bench/heap_threshold.py`). bench/README.md, "Memory: the C
heap's threshold fixed".

`apply` fixes the threshold once per process, unless the user chose one (`MALLOC_MMAP_THRESHOLD_`,
or `GLIBC_TUNABLES` naming it); on a C library without `mallopt` (musl, macOS) it does nothing.

Below the threshold the heap still keeps what is freed: a prefill's many intermediates of a few
hundred KiB each leave free blocks between ones still held, which the heap cannot give back from its
top. `trim` (glibc's `malloc_trim(0)`, which also hands back the free pages inside the heap) runs
after each prefill of a CPU decode call (`DecodeOptions.trim_heap`): about 5 ms for a worker's heap,
a dozen times in a 256-row call. With it the 3-adapter run's peak measured 1,131-1,139 MiB in two
runs, 1,144-1,155 without in four (bench/README.md, "Memory: the refills").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

#: Blocks from this many bytes up get pages of their own.
THRESHOLD = 1 << 20
#: `mallopt`'s parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3


def user_chose(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether the environment already sets glibc's mmap threshold."""
    env = os.environ if environ is None else environ
    return "MALLOC_MMAP_THRESHOLD_" in env or "malloc.mmap_threshold" in env.get("GLIBC_TUNABLES", "")


@functools.cache
def libc_function(name: str) -> Any:
    """The C library's function `name` (ctypes), or None where there is no such library or function."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):  # no libc found, or one without it
        return None


@functools.cache
def apply() -> bool:
    """Fix the C heap's mmap threshold at `THRESHOLD` for this process (once); whether it was set."""
    if user_chose():
        return False
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    if not done:
        log.info("the C library refused mallopt(M_MMAP_THRESHOLD): large tensors may stay in its heap")
    return done


def trim() -> bool:
    """Hand the C heap's free pages back to the system, those inside the heap too (glibc's
    `malloc_trim(0)`); whether there was a `malloc_trim` to call (glibc; elsewhere nothing happens)."""
    malloc_trim = libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    malloc_trim(0)
    return True
