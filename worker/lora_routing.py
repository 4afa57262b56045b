"""Mixed-adapter batches without PEFT's per-layer bookkeeping.

With `adapter_names`, PEFT does this in every LoRA layer of every forward pass: register and remove
a hook, rebuild each adapter's list of row indices in Python, gather those rows into a copy, and
scatter the result back. On a small model that is as much time as the weights' matmuls.

Here the decode loop keeps a batch's rows grouped by adapter, and `route(names)` tells every LoRA
layer once per forward which contiguous row range belongs to which adapter. A routed layer computes
the base layer's output, then adds `lora_B(lora_A(x[start:end])) * scaling` to that range in place:
the same operations on the same values as PEFT's mixed batch, without the copies. Outside `route`
the layers behave exactly as PEFT's (generation with `disable_adapter()`, merging, training).

Only plain LoRA on `nn.Linear` is routed; a model with another kind of LoRA layer (embedding, conv,
quantized) or an adapter with a LoRA variant (DoRA, aLoRA) is reported as not routable, and the
decode loop then passes `adapter_names` to PEFT as before.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812

#: (adapter name, first row, end row) of the batch in the forward pass under way; None: not routed.
_ROUTE: ContextVar[tuple[tuple[str, int, int], ...] | None] = ContextVar("lora_route", default=None)

_FLAG = "_lora_compare_routable"

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"

T = TypeVar("T")


def _routed_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    segments = _ROUTE.get()
    if segments is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name, start, end in segments:
        if name not in self.lora_A:  # "__base__", or an adapter that leaves this layer alone
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        rows = x[start:end].to(lora_a.weight.dtype)
        delta = F.linear(F.linear(rows, lora_a.weight, lora_a.bias), lora_b.weight, lora_b.bias) * self.scaling[name]
        result[start:end] += delta.to(result.dtype)
    return result


def install(model: Any) -> bool:
    """Route every LoRA layer of the PeftModel `model`, if all of them can be; returns whether they
    are. Call again after loading an adapter (it may wrap new layers or bring a variant)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers: list[Any] = [m for m in model.modules() if isinstance(m, LoraLayer)]
    routable = bool(layers) and all(type(m) is LoraLinear and not _uses_variant(m) for m in layers)
    if routable:
        for layer in layers:
            if "forward" not in vars(layer):
                layer.forward = types.MethodType(_routed_forward, layer)
    setattr(model, _FLAG, routable)
    return routable


def routable(model: Any) -> bool:
    return bool(getattr(model, _FLAG, False))


def has_variant(model: Any) -> bool:
    """Whether an adapter of `model` uses a LoRA variant (DoRA...), which PEFT refuses to mix with
    other adapters in one batch."""
    from peft.tuners.lora import LoraLayer

    return any(_uses_variant(m) for m in model.modules() if isinstance(m, LoraLayer))


def _uses_variant(layer: Any) -> bool:
    """Whether an adapter of this LoRA layer is a variant (`lora_variant` in recent PEFT, `use_dora`
    in older releases)."""
    return bool(getattr(layer, "lora_variant", {})) or any(getattr(layer, "use_dora", {}).values())


def segments(names: Sequence[T]) -> tuple[tuple[T, int, int], ...]:
    """Runs of equal adapter names (or any values): (name, start, end)."""
    runs: list[tuple[T, int, int]] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            runs.append((names[start], start, i))
            start = i
    return tuple(runs)


@contextmanager
def route(names: Sequence[str]) -> Iterator[None]:
    """Within the block, row i of every forward pass goes through adapter `names[i]`."""
    token = _ROUTE.set(segments(names))
    try:
        yield
    finally:
        _ROUTE.reset(token)
