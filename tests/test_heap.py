"""The worker's C heap gives large tensors pages of their own, returned when freed (`worker.heap`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker import heap

ROOT = Path(__file__).resolve().parent.parent


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33 and newer)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mapped_bytes() -> int:
    """Bytes the C heap holds in blocks mapped for them alone (`hblkhd`)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no glibc mallinfo2 here")
    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().hblkhd)


#: A child that frees a 6 MiB tensor (as a decode step frees its logits), then holds a 4 MiB one,
#: and prints whether the 4 MiB came from pages of its own; argv[1] "apply": after `heap.apply()`.
PROBE = """
import sys, torch
from tests.test_heap import mapped_bytes
if sys.argv[1] == "apply":
    from worker import heap
    assert heap.apply()
big = torch.ones(6 << 18)  # 6 MiB of float32
del big
before = mapped_bytes()
held = torch.ones(4 << 18)  # 4 MiB
print(mapped_bytes() - before >= 4 << 20)
"""


def _probe(how: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, env=env, check=True,
                          cwd=ROOT)
    return done.stdout.strip().splitlines()[-1] == "True"


def test_after_a_large_free_a_large_tensor_still_gets_pages_of_its_own() -> None:
    """glibc alone raises its threshold to the 6 MiB freed, so the 4 MiB comes from the heap (where
    it stays resident once freed); with `heap.apply` it still gets pages of its own."""
    mapped_bytes()  # skips where there is no glibc
    assert not _probe("plain")
    assert _probe("apply")


def test_a_users_own_threshold_wins() -> None:
    assert heap.user_chose({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert heap.user_chose({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"})
    assert not heap.user_chose({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not heap.user_chose({})


def test_the_model_host_and_a_cpu_decode_call_apply_it() -> None:
    """A worker's model host applies it as it starts, and so does a decode call on the CPU (for the
    engine used on its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from contract.config import GenerationConfig
    from contract.settings import Settings
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows
    from worker.model_host import ModelHost

    heap.apply.cache_clear()
    ModelHost(Settings.from_env(), device="cpu")
    assert heap.apply.cache_info().currsize == 1
    heap.apply.cache_clear()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    request = DecodeRequest(GenerationConfig(max_new_tokens=2), set(), 0, torch.device("cpu"))
    decode_rows(LlamaForCausalLM(config).eval(), [[5, 6, 7]], request, options=DecodeOptions(capacity=2))
    assert heap.apply.cache_info().currsize == 1


#: A child that takes 96 blocks of 512 KiB from the heap (under the threshold), frees every other one
#: (free space between blocks still held, which the heap keeps resident), and prints its anonymous
#: resident memory (KiB) before and after `heap.trim()`.
FRAGMENTED = """
import ctypes, ctypes.util
from worker import heap
assert heap.apply()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def anon():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))
blocks = [libc.malloc(512 << 10) for _ in range(96)]
for block in blocks:
    ctypes.memset(block, 1, 512 << 10)  # resident
for block in blocks[0::2]:
    libc.free(block)
before = anon()
assert heap.trim()
print(before, anon())
"""


def test_trim_hands_back_the_free_pages_inside_the_heap() -> None:
    """24 MiB freed between blocks still held stays resident in glibc's heap; `trim` gives it back."""
    mapped_bytes()  # skips where there is no glibc
    done = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, check=True, cwd=ROOT)
    before, after = map(int, done.stdout.split())
    assert before - after > 20 << 10, (before, after)  # KiB


def test_a_cpu_decode_call_trims_the_heap_after_each_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once after every prefill (the first and each refill), unless `trim_heap` is off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from contract.config import GenerationConfig
    from worker.engine import scheduler
    from worker.engine.call import DecodeOptions
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows

    calls: list[str] = []
    prefill = scheduler._prefill
    monkeypatch.setattr(scheduler, "_prefill", lambda *a, **kw: (calls.append("prefill"), prefill(*a, **kw))[1])
    monkeypatch.setattr(heap, "trim", lambda: calls.append("trim") is None)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    model = LlamaForCausalLM(config).eval()
    request = DecodeRequest(GenerationConfig(max_new_tokens=3), set(), 0, torch.device("cpu"))
    prompts = [[5, 6, 7 + i] for i in range(6)]
    trimmed = decode_rows(model, prompts, request, options=DecodeOptions(capacity=2))
    assert calls.count("prefill") >= 3 and calls == ["prefill", "trim"] * calls.count("prefill")
    calls.clear()
    kept = decode_rows(model, prompts, request, options=DecodeOptions(capacity=2, trim_heap=False))
    assert "trim" not in calls and calls.count("prefill") >= 3
    assert kept == trimmed
