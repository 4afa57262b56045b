"""The in-place decode attention (`worker.engine.attention`) against transformers' `sdpa` over the
whole keys and values (the prefix copied in front of each row's own columns, as before it).

The split computes the same softmax in another summation order, so it is held to float32 rounding
here (and to plain PEFT's tokens, model by model, in tests/test_fidelity.py); the paths that fall
back (not handed off, or options the split does not take) must be bit for bit `sdpa`'s."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine import attention
from worker.engine.lora_routing import segments


def case(seed: int, *, mask: str) -> dict[str, Any]:
    """Random shapes: rows of several prefix variants, grouped heads, left-padded own columns."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows, kv_heads, groups = rng.randrange(1, 10), rng.choice([1, 2, 3]), rng.choice([1, 3, 4])
    dim, plen, own = rng.choice([8, 64]), rng.randrange(1, 40), rng.randrange(1, 300)
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


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("seed", range(12))
def test_split_attention_equals_sdpa_over_the_whole_keys(seed: int, mask: str) -> None:
    c = case(seed, mask=mask)
    expected = whole_sdpa(c)  # [rows, 1, heads, head_dim]
    got = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"]).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_the_plain_operations_part_equals_the_cpu_kernel(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`reference_part` (other devices) and the CPU flash kernel compute the same split."""
    c = case(seed, mask="bool")
    kernel = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"])
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    plain = attention.split_attention(c["query"], c["handoff"], c["mask"], c["scale"])
    torch.testing.assert_close(plain, kernel, rtol=1e-5, atol=1e-5)


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
