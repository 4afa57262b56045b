"""The in-place decode attention (`worker.engine.attention`) against transformers' `sdpa` over the
whole keys and values (the prefix copied in front of each row's own columns, as before it).

The split computes the same softmax in another summation order, so it is held to float32 rounding
here (and to plain PEFT's tokens, model by model, in tests/test_fidelity.py); the paths that fall
back (not handed off, or options the split does not take) must be bit for bit `sdpa`'s."""

from __future__ import annotations

import ctypes
import logging
import random
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine import attention, cpu_attention, cpu_cache
from worker.engine.lora_routing import segments


def case(seed: int, *, mask: str, dim: int | None = None, groups: int | None = None) -> dict[str, Any]:
    """Random shapes: rows of several prefix variants, grouped heads, left-padded own columns (head_dim
    `dim` and query heads per key/value head `groups` where given)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows, kv_heads, drawn_groups = rng.randrange(1, 10), rng.choice([1, 2, 3]), rng.choice([1, 3, 4, 7])
    drawn_dim, plen, own = rng.choice([8, 16, 48, 64, 128]), rng.randrange(0, 40), rng.randrange(1, 300)
    dim = drawn_dim if dim is None else dim
    groups = drawn_groups if groups is None else groups
    variants = rng.randrange(1, 4)
    pick = sorted(rng.randrange(variants) for _ in range(rows))
    width = own + rng.randrange(0, 5)  # the buffer's columns: the own columns are a strided view of it
    start = rng.randrange(0, width - own + 1)
    buffer_k = torch.randn(rows, kv_heads, width, dim, generator=gen)
    buffer_v = torch.randn(rows, kv_heads, width, dim, generator=gen)
    handoff = attention.Handoff(
        buffer_k[:, :, start:start + own], buffer_v[:, :, start:start + own],
        torch.randn(variants, kv_heads, plen, dim, generator=gen) * 3,  # large scores: a peaked softmax
        torch.randn(variants, kv_heads, plen, dim, generator=gen), tuple(segments(pick)))
    query = torch.randn(rows, kv_heads * groups, 1, dim, generator=gen)
    full: torch.Tensor | None = None
    if mask != "none":
        full = torch.ones(rows, 1, 1, plen + own, dtype=torch.bool)
        for r in range(rows):  # left padding: the newest column is always visible
            full[r, :, :, plen:plen + rng.randrange(0, own)] = False
        if mask == "additive":
            full = torch.zeros(full.shape).masked_fill_(~full, float("-inf"))
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    return {"query": query, "handoff": handoff, "mask": full, "module": module, "scale": dim ** -0.5}


def whole_sdpa(c: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    keys, values = attention.assemble(c["handoff"])
    out, _ = sdpa_attention_forward(c["module"], c["query"], keys, values, c["mask"], scaling=c["scale"], **kwargs)
    return out


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "flash"])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("seed", range(12))
def test_split_attention_equals_sdpa_over_the_whole_keys(seed: int, mask: str, kernel: bool) -> None:
    """Both CPU paths: `cpu_attention`'s kernel (head_dim a multiple of 16) and torch's flash split."""
    c = case(seed, mask=mask)
    expected = whole_sdpa(c)  # [rows, 1, heads, head_dim]
    with torch.no_grad():
        got = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"], kernel).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_the_plain_operations_part_equals_the_cpu_flash_kernel(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`reference_part` (other devices) and the CPU flash kernel compute the same split."""
    c = case(seed, mask="bool")
    flash = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"], kernel=False)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    plain = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"], kernel=False)
    torch.testing.assert_close(plain, flash, rtol=1e-5, atol=1e-5)


def call(c: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    h = c["handoff"]
    attention.hand_off(h)
    try:
        out, _ = attention._attention(c["module"], c["query"], h.keys, h.values, c["mask"], scaling=c["scale"],
                                      **kwargs)
    finally:
        attention._PENDING.set(None)
    return out


def test_a_handed_off_call_takes_the_split_and_others_are_sdpa_unchanged() -> None:
    c = case(1, mask="bool")
    torch.testing.assert_close(call(c), whole_sdpa(c), rtol=1e-5, atol=1e-5)
    keys, values = attention.assemble(c["handoff"])  # nothing handed off: transformers' sdpa itself
    out, _ = attention._attention(c["module"], c["query"], keys, values, c["mask"], scaling=c["scale"])
    assert torch.equal(out, whole_sdpa(c))


def test_options_the_split_does_not_take_fall_back_to_sdpa_over_the_assembled_keys() -> None:
    c = case(2, mask="bool")
    bias = torch.randn(c["query"].shape[0], c["query"].shape[1], 1, c["mask"].shape[-1])
    assert torch.equal(call(c, position_bias=bias), whole_sdpa(c, position_bias=bias))
    c["query"] = torch.cat([c["query"]] * 2, dim=2)  # two queries per row: not a decode step
    c["mask"] = c["mask"].expand(-1, -1, 2, -1)
    assert torch.equal(call(c), whole_sdpa(c))


def test_a_hand_off_not_taken_is_an_error_not_a_shorter_context() -> None:
    c = case(3, mask="none")
    h = c["handoff"]
    attention.hand_off(h)
    try:
        with pytest.raises(RuntimeError, match="not taken"):
            attention.hand_off(h)  # the next layer's, before this one's attention
        with pytest.raises(RuntimeError, match="not the cache's hand-off"):
            attention._attention(c["module"], c["query"], h.keys.clone(), h.values, None, scaling=c["scale"])
    finally:
        attention._PENDING.set(None)


def test_in_place_switches_only_sdpa_models_and_always_restores() -> None:
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    eager = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"))
    with attention.in_place(eager) as on:
        assert not on and not attention.active() and eager.config._attn_implementation == "eager"
    with attention.in_place(sdpa, enabled=False) as on:
        assert not on and sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError), attention.in_place(sdpa) as on:
        assert on and attention.active() and sdpa.config._attn_implementation == attention.NAME
        raise ValueError
    assert not attention.active() and sdpa.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kernel", [True, False])
def test_a_bfloat16_split_keeps_the_dtype_and_the_values(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernel:
        monkeypatch.setattr(attention, "_FLASH_CPU", None)
    c = case(4, mask="bool")
    h = c["handoff"]
    c["handoff"] = attention.Handoff(*(t.to(torch.bfloat16) for t in h[:4]), h.runs)
    c["query"] = c["query"].to(torch.bfloat16)
    got = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"]).transpose(1, 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, whole_sdpa(c), rtol=2e-2, atol=2e-2)


def kernel_case(seed: int, *, dim: int = 64, mask: str = "bool") -> dict[str, Any]:
    """A `case` whose head_dim the kernel takes."""
    return case(seed, mask=mask, dim=dim)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_the_kernel_equals_sdpa_in_its_compiled_shapes_and_the_others(dim: int, groups: int) -> None:
    """head_dim 64 and 128 with 1-4 query heads per key/value head are compiled as their own code
    (`cpu_attention.c`'s dispatch); the rest run the general code."""
    c = case(100 + groups, mask="bool", dim=dim, groups=groups)
    with torch.no_grad():
        assert cpu_attention.applies(c["query"], c["handoff"], c["mask"])
        got = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"]).transpose(1, 2)
    torch.testing.assert_close(got, whole_sdpa(c), rtol=1e-5, atol=1e-5)


def test_the_kernel_is_available_where_the_project_is_tested() -> None:
    """The decode speed of issue 16 rests on it: a CI machine (a C compiler, torch's OpenMP) builds it."""
    assert cpu_attention.available(), "worker/engine/cpu_attention.c did not build or load: see the log"


@pytest.mark.parametrize("seed", range(4))
def test_the_kernel_is_the_same_bit_for_bit_whatever_the_threads(seed: int) -> None:
    """Each (row, head) is one thread's whole sum: the thread count cannot change a result."""
    c = kernel_case(seed)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_kernel_takes_a_mask_shared_by_every_row_and_no_prefix() -> None:
    c = kernel_case(1, mask="additive")
    h = c["handoff"]
    c["handoff"] = attention.Handoff(h.keys, h.values, h.prefix_keys[:, :, :0], h.prefix_values[:, :, :0], h.runs)
    c["mask"] = c["mask"][:1, :, :, h.prefix_keys.shape[2]:]  # one row's padding for all rows
    expected = whole_sdpa(c)
    with torch.no_grad():
        got = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"]).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shapes_the_kernel_does_not_take_go_the_flash_way() -> None:
    c = kernel_case(2, dim=8)
    assert not cpu_attention.applies(c["query"], c["handoff"], c["mask"])
    c = kernel_case(2)
    assert cpu_attention.applies(c["query"], c["handoff"], c["mask"]) == (not torch.is_grad_enabled())
    with torch.no_grad():
        assert cpu_attention.applies(c["query"], c["handoff"], c["mask"])
        assert not cpu_attention.applies(c["query"].to(torch.float64), c["handoff"], c["mask"])


@pytest.fixture
def fresh_kernel(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`cpu_attention._kernel` forgotten, building into an empty cache; remembered again afterwards."""
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    cpu_attention._kernel.cache_clear()
    yield tmp_path
    cpu_attention._kernel.cache_clear()


def test_the_kernel_is_built_once_into_the_cache_and_loaded_from_it(fresh_kernel: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_attention.available()
    built = list((fresh_kernel / "kernels").glob("cpu_attention-*.so"))
    assert len(built) == 1
    cpu_attention._kernel.cache_clear()

    def no_build(*args: Any) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(cpu_attention, "_build", no_build)
    assert cpu_attention.available()


@pytest.mark.slow
def test_a_cpu_worker_builds_the_kernel_when_it_loads_its_model(demo_model: Any, settings: Any,
                                                               fresh_kernel: Any) -> None:
    """Not inside the first chunk's decoding: the build (seconds on a machine's first use) is part of
    the model load, and every later decode finds it loaded."""
    from worker.model_host import ModelHost

    assert not list(fresh_kernel.glob("kernels/*.so"))
    ModelHost(settings, device="cpu").ensure_base("demo", dtype="float32")
    assert len(list(fresh_kernel.glob("kernels/cpu_attention-*.so"))) == 1
    assert cpu_attention._kernel.cache_info().currsize == 1  # loaded, not only built


def test_without_a_compiler_or_when_switched_off_the_engine_keeps_flash(fresh_kernel: Any,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level("WARNING", logger=cpu_attention.__name__):
        assert not cpu_attention.available()
    assert "could not be built" in caplog.text and "flash attention is used" in caplog.text
    c = kernel_case(3)
    with torch.no_grad():
        got = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"]).transpose(1, 2)
    torch.testing.assert_close(got, whole_sdpa(c), rtol=1e-5, atol=1e-5)
    cpu_attention._kernel.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv(cpu_attention.ENV, "0")
    assert not cpu_attention.available()


def test_the_build_variants_compute_the_same_and_the_faster_is_kept(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """With and without software prefetch (which is faster depends on the machine's prefetchers), with
    16-float or 8-float vectors (AVX-512 or AVX2 registers): each the plain operations at float32
    rounding in the compiled shapes and the others, the same bits with and without prefetch, and
    `_build` keeps the one its timing found faster (the first, and a log that says it was not timed,
    when timing fails)."""
    runtime = cpu_attention._openmp_runtime()
    cc = cpu_attention.shutil.which("cc") or cpu_attention.shutil.which("gcc")
    assert runtime is not None and cc is not None
    functions = {}
    for name, define in cpu_attention.VARIANTS.items():
        cpu_attention._compile(cc, runtime, define, tmp_path / f"{name}.so")
        functions[name] = cpu_attention._load(tmp_path / f"{name}.so")
        assert cpu_attention._probe(functions[name])
    for dim, groups in [(64, 3), (64, 1), (128, 4), (16, 5), (64, 5)]:
        c = case(200 + groups, mask="bool", dim=dim, groups=groups)
        own_mask = attention._additive(c["mask"], c["handoff"].keys.shape[2], c["query"])
        with torch.no_grad():
            outs = {name: cpu_attention.run(f, c["query"], c["handoff"], own_mask, c["scale"])
                    for name, f in functions.items()}
        expected = whole_sdpa(c)
        for name, out in outs.items():
            torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(outs["prefetch"], outs["no-prefetch"])
        assert torch.equal(outs["w8-prefetch"], outs["w8-no-prefetch"])
    times = cpu_attention._timed(functions, cpu_attention._timing_columns(None), rounds=1)
    assert set(times) == set(cpu_attention.VARIANTS) and all(0 < t < float("inf") for t in times.values())

    def built(name: str) -> dict[str, Path]:
        """Copies of the variants compiled above, as `_build` hands them to `_keep_fastest`."""
        (tmp_path / name).mkdir()
        copies = {v: tmp_path / name / f"{v}.so" for v in cpu_attention.VARIANTS}
        for v, path in copies.items():
            shutil.copyfile(tmp_path / f"{v}.so", path)
        return copies

    for faster in cpu_attention.VARIANTS:
        monkeypatch.setattr(cpu_attention, "_timed",
                            lambda fs, f=faster, **_: {n: 1.0 if n == f else 2.0 for n in fs})
        target = tmp_path / f"kept-{faster}.so"
        kept = cpu_attention._keep_fastest(built(faster), target)
        assert target.read_bytes() == (tmp_path / f"{faster}.so").read_bytes()
        assert cpu_attention._probe(kept)

    def no_timing(functions: Any, **_: Any) -> dict[str, float]:
        raise RuntimeError("no memory to time in")

    monkeypatch.setattr(cpu_attention, "_timed", no_timing)  # a speed choice only: the first is kept
    with caplog.at_level(logging.INFO, logger=cpu_attention.__name__):
        cpu_attention._keep_fastest(built("untimed"), tmp_path / "untimed.so")
    first = next(iter(cpu_attention.VARIANTS))
    assert (tmp_path / "untimed.so").read_bytes() == (tmp_path / f"{first}.so").read_bytes()
    said = [r for r in caplog.records if "built into" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and " ms" not in said[0].getMessage()
    assert said[0].getMessage().endswith(f"{first} (not timed: no memory to time in)")


def test_a_build_compiles_each_variant_and_returns_the_kept_one(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """`_build` end to end (the compiler run for real): every variant compiled, timed on this machine's
    case (its size in the log), the kept one at the target, its function returned loaded."""
    runtime = cpu_attention._openmp_runtime()
    cc = cpu_attention.shutil.which("cc") or cpu_attention.shutil.which("gcc")
    assert runtime is not None and cc is not None
    compiled: list[str] = []
    real = cpu_attention._compile
    monkeypatch.setattr(cpu_attention, "_compile", lambda *a: (compiled.append(a[2]), real(*a))[1])
    asked: list[int] = []
    monkeypatch.setattr(cpu_attention, "_timed",
                        lambda fs, columns: (asked.append(columns), {n: float(i) for i, n in enumerate(fs)})[1])
    with caplog.at_level(logging.INFO, logger=cpu_attention.__name__):
        function = cpu_attention._build(cc, runtime, tmp_path / "kernels" / "k.so")
    cache = cpu_cache.last_level()
    assert asked == [cpu_attention._timing_columns(cache)]
    said = [r.getMessage() for r in caplog.records if "built into" in r.getMessage()]
    assert len(said) == 1 and f"on {asked[0] * 24 * 3 * 64 * 8 >> 20} MiB of keys and values" in said[0]
    assert said[0].endswith(f"the last-level cache {cache >> 20} MiB)" if cache else "the last-level cache unknown)")
    assert compiled == list(cpu_attention.VARIANTS.values())
    assert (tmp_path / "kernels" / "k.so").exists() and cpu_attention._probe(function)
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == ["k.so"]  # nothing else left behind


def test_a_kernel_that_disagrees_with_the_plain_operations_is_not_used() -> None:
    def wrong(*args: Any) -> int:
        out = args[-2]  # leaves the output as torch.empty made it, or zeroes it
        ctypes.memset(out, 0, 4)
        return 0

    assert not cpu_attention._probe(wrong)
    assert cpu_attention._probe(cpu_attention._kernel())


def _cache_tree(root: Path, caches: dict[int, list[tuple[int, str, str, str]]]) -> Path:
    """A sysfs cpu folder: cpu number -> its caches as (level, type, size, shared_cpu_list)."""
    for cpu, entries in caches.items():
        for i, (level, kind, size, shared) in enumerate(entries):
            index = root / f"cpu{cpu}" / "cache" / f"index{i}"
            index.mkdir(parents=True)
            for name, text in (("level", str(level)), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (index / name).write_text(text + "\n")
    return root


def test_the_build_is_timed_on_a_case_past_the_last_level_cache(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The build variants are chosen on a read from memory on any host: the timing case is 3x the
    last-level cache the process's CPUs share (a 75 MB case fitted in an Intel host's 105 MiB L3), never
    under the first case's 2,048 columns (75 MB) nor over 512 MiB; sysfs's sizes read as the kernel
    writes them; the instances of the highest level summed, those of CPUs the process may not run on
    left out; no sysfs, no size (the 75 MB case)."""
    assert cpu_cache.size("32768K\n") == 32 << 20 and cpu_cache.size("1M") == 1 << 20
    assert cpu_cache.size("512") == 512
    per_column = 24 * 3 * 64 * 4 * 2
    assert cpu_attention._timing_columns(None) == 2048  # unknown: the case the kernel was first timed on
    assert cpu_attention._timing_columns(16 << 20) == 2048  # a small cache: still 75 MB
    for mib in (32, 105):
        columns = cpu_attention._timing_columns(mib << 20)
        assert columns % 16 == 0 and 3 * (mib << 20) <= columns * per_column < 3 * (mib << 20) + 16 * per_column
    assert cpu_attention._timing_columns(1 << 40) * per_column <= 512 << 20 < (
        cpu_attention._timing_columns(1 << 40) + 16) * per_column

    one_l3 = {cpu: [(1, "Data", "48K", str(cpu)), (1, "Instruction", "32K", str(cpu)),
                    (2, "Unified", "2048K", str(cpu)), (3, "Unified", "107520K", "0-3")] for cpu in range(4)}
    monkeypatch.setattr(cpu_cache.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_cache.last_level(_cache_tree(tmp_path / "intel", one_l3)) == 105 << 20
    two_l3 = {cpu: [(2, "Unified", "1024K", str(cpu)), (3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3")]
              for cpu in range(4)}
    assert cpu_cache.last_level(_cache_tree(tmp_path / "two", two_l3)) == 64 << 20
    monkeypatch.setattr(cpu_cache.os, "sched_getaffinity", lambda pid: {2, 3})
    assert cpu_cache.last_level(tmp_path / "two") == 32 << 20
    assert cpu_cache.last_level(tmp_path / "none") is None
    monkeypatch.undo()
    here = cpu_cache.last_level()  # this machine's sysfs, where it has one
    assert here is None or here >= 1 << 20
