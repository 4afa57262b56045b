"""A decode step's attention on CPU, reading each key and value once at the memory's speed.

At long contexts a CPU decode step's growth is attention reading the keys and values. torch's CPU
flash attention took 2.1-2.3x the time of reading them (bench/decode_attention.py): with a few
query heads per key/value head its products are 3-row matrix products, which its kernels run far
below the memory's bandwidth. `cpu_attention.c` does one (row, key/value head) pair at a time: the
head's query heads against the row's prefix columns and then its own columns, in one pass of an
online softmax over blocks of 16 (or 8) keys, each key and value loaded once for all of them, the blocks a
younger row's left padding hides not read at all. Nothing is copied: the own columns are read in the
cache's buffer, the prefix in its variant's tensor.

It is C, compiled here on first use by the machine's C compiler (`CC`, else `cc`) for this CPU
(`-march=native`) and kept in the cache folder (`LORA_COMPARE_CACHE`/kernels, by a hash of the
source, the compiler, the CPU's flags and torch's OpenMP runtime), then loaded with ctypes. Its
threads are OpenMP's, linked to the runtime torch itself loaded, so `torch.set_num_threads` sizes
them and no second pool competes with torch's. It is built four times, with and without software
prefetch (which reads faster depends on the machine's prefetchers: a Xeon needed it, an AMD EPYC ran
faster without) and with 16-float or 8-float vectors (one AVX-512 or one AVX2 register: on an
AVX2-only EPYC the 16-float build ran 3.2x slower), all timed on a case of keys and values three
times the machine's last-level cache (at least 75 MB, at most 512 MiB: `_timing_columns`), and the
fastest kept (about 15 s, once per machine, when a CPU worker loads a float32 model). Where any of that is
missing (no compiler, no OpenMP runtime in torch, a build that fails, a probe that disagrees with
the plain operations), `attend` returns None and the engine keeps torch's flash attention; the log
says why, once.

The numbers are the same softmax in another summation order (and an exp within about 1 ulp), as
between any two attention kernels: tests/test_attention.py holds it to the plain operations at float32
rounding, and the fidelity tests hold the engine to plain PEFT's greedy tokens with it on.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import cpu_cache

if TYPE_CHECKING:
    from .attention import Handoff

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
#: head_dim: a multiple of the kernel's vector width, at most MAX_DIM; query heads per kv head: MAX_GROUPS.
WIDTH, MAX_DIM, MAX_GROUPS = 16, 256, 16
#: Set to "0" to keep torch's flash attention (an A/B switch for benchmarks and for bisecting).
ENV = "LORA_COMPARE_ATTENTION_KERNEL"

_i64p = ctypes.POINTER(ctypes.c_int64)
_ARGTYPES: list[Any] = [
    ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,  # shape, q, scale
    ctypes.c_void_p, ctypes.c_void_p, _i64p, _i64p, ctypes.c_int64,  # own keys, values, strides, columns
    ctypes.c_void_p, ctypes.c_int64,  # mask, its row stride
    ctypes.c_void_p, ctypes.c_void_p, _i64p, _i64p, ctypes.c_int64, ctypes.c_void_p,  # prefix, variant
    ctypes.c_void_p, ctypes.c_int,  # out, threads
]


def _openmp_runtime() -> Path | None:
    """The OpenMP library torch loaded into this process (libgomp, or Intel's / LLVM's), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()
        path = fields[-1] if fields else ""
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return Path(path)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


#: The kernel's build variants: software prefetch 16 columns ahead, or none (`AHEAD` in the source),
#: each with 16-float vectors (one AVX-512 register) or 8 (`W`: one AVX2 register). Which is faster
#: depends on the machine's prefetchers and vector units, so all are built and timed (`_build`): on an
#: AVX2-only AMD EPYC (family 23) the timing case took 18.5 ms with 16-float vectors, 5.8 with 8
#: (prefetch on both; 2026-12-02, bench/README.md).
VARIANTS = {"prefetch": "-DAHEAD=16", "no-prefetch": "-DAHEAD=0",
            "w8-prefetch": "-DAHEAD=16 -DW=8", "w8-no-prefetch": "-DAHEAD=0 -DW=8"}


#: The timing case's keys and values (`_timed`) take at least PAST_CACHE times the last-level cache the
#: process's CPUs share (`cpu_cache.last_level`), so that what is timed is a read from memory, as at a
#: long decode step, on any host (the first cases of 75 MB fitted in an Intel host's 105 MiB L3, where
#: the variants were then chosen on a read from cache); never less than TIMING_MIN bytes, nor more than
#: TIMING_MAX (memory the build holds for a moment). TIMING names the rule in the kernel cache's key: a
#: change re-times.
PAST_CACHE, TIMING_MIN, TIMING_MAX, TIMING = 3, 72 << 20, 512 << 20, "timed past 3x the last-level cache"
#: The timing case's shape: a decode step of the demo model (24 rows, 3 key/value heads of 3 query
#: heads, head_dim 64); its keys' and values' columns are sized by `_timing_columns`.
TIMING_ROWS, TIMING_KV, TIMING_GROUPS, TIMING_DIM = 24, 3, 3, 64
#: Bytes of one column of the timing case: float32 keys and values of every row and key/value head.
TIMING_COLUMN_BYTES = TIMING_ROWS * TIMING_KV * TIMING_DIM * 4 * 2


def _timing_columns(cache: int | None) -> int:
    """The timing case's columns of keys and values (a multiple of 16) for a last-level cache of
    `cache` bytes (None: unknown): PAST_CACHE times it, at least TIMING_MIN, at most TIMING_MAX."""
    block = TIMING_COLUMN_BYTES * 16
    wanted = max(TIMING_MIN, PAST_CACHE * (cache or 0))
    return min(-(-wanted // block), TIMING_MAX // block) * 16


def _compile(cc: str, runtime: Path, define: str, lib: Path) -> None:
    obj = lib.with_suffix(".o")
    subprocess.run([cc, "-O3", "-march=native", "-fPIC", *define.split(), "-Wno-psabi", "-fopenmp", "-c", str(SOURCE),
                    "-o", str(obj)],
                   check=True, capture_output=True, text=True, timeout=120)
    # linked to torch's own OpenMP library (not the compiler's): one runtime, one pool of threads
    subprocess.run([cc, "-shared", str(obj), "-o", str(lib), str(runtime), f"-Wl,-rpath,{runtime.parent}"],
                   check=True, capture_output=True, text=True, timeout=120)


def _build(cc: str, runtime: Path, target: Path) -> Any:
    """Compile `SOURCE` into the shared library `target` (atomically: two workers may build at once):
    each of `VARIANTS`, the one `_timed` fastest on this machine kept (they compute the same). Returns
    the kept variant's function, loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        libs = {name: Path(tmp) / f"{name}.so" for name in VARIANTS}
        for name, define in VARIANTS.items():
            _compile(cc, runtime, define, libs[name])
        return _keep_fastest(libs, target)


def _keep_fastest(libs: dict[str, Path], target: Path) -> Any:
    """Move the fastest of the built variants `libs` (name -> library) to `target`; its function."""
    functions = {name: _load(lib) for name, lib in libs.items()}
    cache = cpu_cache.last_level()
    columns = _timing_columns(cache)
    try:
        times = _timed(functions, columns=columns)
    except (RuntimeError, MemoryError) as error:  # timing is a choice of speed only: keep the first
        best = next(iter(libs))
        log.warning("decode attention kernel built into %s: %s (not timed: %s)", target, best, error)
    else:
        best = min(times, key=lambda name: times[name])
        log.info("decode attention kernel built into %s: %s (%s; on %d MiB of keys and values, the "
                 "last-level cache %s)", target, best, ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items()),
                 columns * TIMING_COLUMN_BYTES >> 20,
                 f"{cache >> 20} MiB" if cache else "unknown")
    os.replace(libs[best], target)  # the loaded library stays mapped where it was
    return functions[best]


def _load(lib: Path) -> Any:
    function = ctypes.CDLL(str(lib)).lc_decode_attention
    function.argtypes = _ARGTYPES
    function.restype = ctypes.c_int
    return function


def _timed(functions: dict[str, Any], columns: int, rounds: int = 3) -> dict[str, float]:
    """Each function's best time (ms) over `rounds` alternated runs on a decode step's attention at the
    demo model's shape (`TIMING_ROWS` ...) with `columns` columns of keys and values (the build's:
    `_timing_columns`, past the caches, so that it is the memory that is read)."""
    from .attention import Handoff
    from .lora_routing import Run

    gen = torch.Generator().manual_seed(0)
    rows, kv, groups, dim, own = TIMING_ROWS, TIMING_KV, TIMING_GROUPS, TIMING_DIM, columns
    keys, values = torch.randn(rows, kv, own, dim, generator=gen), torch.randn(rows, kv, own, dim, generator=gen)
    prefix = torch.zeros(1, kv, 0, dim)
    handoff = Handoff(keys, values, prefix, prefix, (Run(0, 0, rows),))
    query = torch.randn(rows, kv * groups, 1, dim, generator=gen)
    best = {name: float("inf") for name in functions}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up (pages, threads), uncounted
            for name, function in functions.items():
                started = time.perf_counter()
                run(function, query, handoff, None, dim ** -0.5)
                best[name] = min(best[name], (time.perf_counter() - started) * 1e3)
    return best


@functools.cache
def _kernel() -> Any:
    """The loaded kernel function, or None (logged once) where it cannot be had."""
    if os.environ.get(ENV, "1") == "0":
        log.info("%s=0: decode attention uses torch's flash attention", ENV)
        return None
    if platform.system() != "Linux":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    runtime = _openmp_runtime()
    if cc is None or runtime is None:
        log.info("decode attention kernel unavailable (%s): torch's flash attention is used",
                 "no C compiler" if cc is None else "no OpenMP runtime in torch")
        return None
    from contract.settings import Settings

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, _cpu_flags(), str(runtime),
                                         TIMING]).encode())
        target = Settings.from_env().cache_dir / "kernels" / f"cpu_attention-{key.hexdigest()[:16]}.so"
        function = _load(target) if target.exists() else _build(cc, runtime, target)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("decode attention kernel could not be built (%s): torch's flash attention is used",
                    str(detail).strip().splitlines()[-1] if str(detail).strip() else type(error).__name__)
        return None
    try:
        agrees = _probe(function)
    except RuntimeError:  # the kernel refused the probe's shapes
        agrees = False
    if not agrees:
        log.warning("decode attention kernel disagreed with the plain operations on a probe: "
                    "torch's flash attention is used")
        return None
    return function


def available() -> bool:
    """Whether `attend` can run here (the kernel built, loaded and passed its probe)."""
    return _kernel() is not None


def applies(query: torch.Tensor, handoff: Handoff, mask: torch.Tensor | None) -> bool:
    """Whether the kernel takes these shapes and dtypes (it needs no other check than `available`)."""
    rows, heads, positions, dim = query.shape
    kv_heads = handoff.keys.shape[1]
    tensors = (query, handoff.keys, handoff.values, handoff.prefix_keys, handoff.prefix_values)
    return (positions == 1 and dim % WIDTH == 0 and dim <= MAX_DIM and heads % kv_heads == 0
            and heads // kv_heads <= MAX_GROUPS
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)
            and (mask is None or mask.device.type == "cpu") and not torch.is_grad_enabled())


@functools.lru_cache(maxsize=64)
def _strides(strides: tuple[int, ...]) -> Any:
    """A tensor's first three strides as the kernel's int64[3] (the same for every layer of a step:
    made once, not 30 times; the kernel only reads it)."""
    return (ctypes.c_int64 * 3)(*strides[:3])


@functools.lru_cache(maxsize=64)
def _variants(runs: tuple[Any, ...], rows: int) -> Any:
    """Each row's prefix variant as the kernel's int32[rows] (as `_strides`: once per step)."""
    variant = (ctypes.c_int32 * max(rows, 1))()
    for r in runs:
        for row in range(r.start, r.end):
            variant[row] = r.value
    return variant


def run(function: Any, query: torch.Tensor, handoff: Handoff, own_mask: torch.Tensor | None,
        scale: float) -> torch.Tensor:
    """The kernel on `query` [rows, heads, 1, dim] and `handoff`, `own_mask` the own columns' additive
    float32 mask [rows or 1, 1, 1, own] (last dimension contiguous) or None: [rows, heads, 1, dim]."""
    rows, heads, _, dim = query.shape
    kv_heads = handoff.keys.shape[1]
    q = query.reshape(rows, heads, dim).contiguous()  # [rows, kv heads x groups, dim]
    out = torch.empty_like(q)
    own, plen = handoff.keys.shape[2], handoff.prefix_keys.shape[2]
    variant = _variants(handoff.runs, rows)
    mask_ptr, mask_stride = None, 0
    if own_mask is not None:
        assert own_mask.dtype == torch.float32 and own_mask.stride(-1) == 1
        mask_ptr = own_mask.data_ptr()
        mask_stride = own_mask.stride(0) if own_mask.shape[0] > 1 else 0
    with torch.profiler.record_function("lora_compare::decode_attention"):  # a name in torch's profiler
        status = function(rows, kv_heads, heads // kv_heads, dim, q.data_ptr(), scale,
                          handoff.keys.data_ptr(), handoff.values.data_ptr(), _strides(handoff.keys.stride()),
                          _strides(handoff.values.stride()), own, mask_ptr, mask_stride,
                          handoff.prefix_keys.data_ptr(), handoff.prefix_values.data_ptr(),
                          _strides(handoff.prefix_keys.stride()), _strides(handoff.prefix_values.stride()), plen,
                          variant, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"decode attention kernel refused shapes {tuple(query.shape)}")
    return out.reshape(rows, heads, 1, dim)


def attend(query: torch.Tensor, handoff: Handoff, own_mask: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """`run` where the kernel is available and applies; None otherwise (the caller's path instead)."""
    if not applies(query, handoff, own_mask):
        return None
    function = _kernel()
    return None if function is None else run(function, query, handoff, own_mask, scale)


def _probe(function: Any) -> bool:
    """The kernel against the plain operations on a small case: two variants' prefixes, grouped heads,
    a left-padded row, own columns a strided view, a partial block."""
    from .attention import Handoff, assemble, reference_part
    from .lora_routing import Run

    gen = torch.Generator().manual_seed(0)
    rows, kv, groups, dim, plen, own = 3, 2, 3, 64, 5, 37
    keys = torch.randn(rows, kv, own + 3, dim, generator=gen)[:, :, 1:own + 1]
    values = torch.randn(rows, kv, own + 3, dim, generator=gen)[:, :, 1:own + 1]
    pk, pv = torch.randn(2, kv, plen, dim, generator=gen) * 3, torch.randn(2, kv, plen, dim, generator=gen)
    handoff = Handoff(keys, values, pk, pv, (Run(0, 0, 2), Run(1, 2, 3)))
    query = torch.randn(rows, kv * groups, 1, dim, generator=gen)
    mask = torch.zeros(rows, 1, 1, own)
    mask[1, ..., :20] = float("-inf")
    with torch.no_grad():
        got = run(function, query, handoff, mask, dim ** -0.5).reshape(rows, kv, groups, dim)
    whole_k, whole_v = assemble(handoff)  # [rows, kv, prefix + own, dim]
    whole_mask = torch.cat([torch.zeros(rows, 1, 1, plen), mask], dim=-1).unsqueeze(2)  # [rows, 1, 1, 1, all]
    want, _ = reference_part(query.reshape(rows, kv, groups, 1, dim), whole_k.unsqueeze(2),
                             whole_v.unsqueeze(2), whole_mask, dim ** -0.5)
    return torch.allclose(got, want.reshape(rows, kv, groups, dim), rtol=1e-5, atol=1e-5)
