"""Mixed-adapter batches without PEFT's per-layer bookkeeping.

With `adapter_names`, PEFT does this in every LoRA layer of every forward pass: register and remove
a hook, rebuild each adapter's list of row indices in Python, gather those rows into a copy, and
scatter the result back. On a small model that is as much time as the weights' matmuls.

Here the decode loop keeps a batch's rows grouped by adapter, and `route(names)` tells every LoRA
layer once per forward which contiguous row range belongs to which adapter. A routed layer computes
the base layer's output, then adds `lora_B(lora_A(x[start:end])) * scaling` to that range in place:
the same operations on the same values as PEFT's mixed batch, without the copies (the products as
`mm` on 2-D views, which is what `F.linear` calls; a range that does not start on a 64-byte boundary,
as PEFT's gathered copy does, is copied first, since MKL's sums can depend on where a matrix starts),
so the logits equal PEFT's bit for bit (tests/test_decoding.py). Outside `route` the layers behave
exactly as PEFT's (generation with `disable_adapter()`, merging, training).

Routed: plain LoRA on `nn.Linear` (and GPT-2's `Conv1D`), and `modules_to_save` (each row range
through its adapter's saved copy of the module, or the original where that adapter saves none).
The slicing is right only where a layer's input is one row per sequence, `[rows, tokens, ...]`;
`install` proves that with one probe forward pass (3 rows of 5 tokens) and every routed call checks
the row count again. `mixing(model)` says how a model's rows may share a batch, and why not:
- `routed`: every adapter layer is routable and its input is one row per sequence;
- `peft`: PEFT's own `adapter_names` can mix them (other LoRA layer kinds: embedding, conv);
- `per_variant`: neither can (DoRA and other LoRA variants, a LoRA layer whose input is flattened
  tokens such as a mixture-of-experts shared expert, a wrapper PEFT cannot mix): one pass per variant.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812


class Run(NamedTuple):
    """Rows [start, end) of a batch that share one value (an adapter name, a prefix variant)."""

    value: Any
    start: int
    end: int


#: The runs of adapter names of the batch in the forward pass under way; None: not routed.
_ROUTE: ContextVar[tuple[Run, ...] | None] = ContextVar("lora_route", default=None)

_FLAG = "_lora_compare_mixing"

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"


def _routed_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    segments = _ROUTE.get()
    if segments is None:
        return type(self).forward(self, x, *args, **kwargs)
    _check_rows(x, segments)
    result = self.base_layer(x, *args, **kwargs)
    lora_as, lora_bs, scaling = self.lora_A, self.lora_B, self.scaling
    flat: tuple[torch.Tensor, torch.Tensor, int] | None = None  # x and result as 2-D views, positions per row
    for name, start, end in segments:
        if name not in lora_as:  # "__base__", or an adapter that leaves this layer alone
            continue
        lora_a, lora_b = lora_as[name], lora_bs[name]
        a, b = lora_a.weight, lora_b.weight
        if _flat_ok(x, result, a, b, lora_a.bias, lora_b.bias):
            # The products `F.linear` runs on these rows (it folds [rows, tokens, in] into one matrix
            # and calls `mm`), without its wrappers: 8 operators per range instead of about 20.
            if flat is None:
                flat = (x.view(-1, x.shape[-1]), result.view(-1, result.shape[-1]),
                        x.numel() // (x.shape[0] * x.shape[-1]))
            xs, out, per = flat
            delta = torch.mm(torch.mm(_aligned(xs[start * per:end * per]), a.t()), b.t()).mul_(scaling[name])
            out[start * per:end * per].add_(delta)
            continue
        rows = _aligned(x[start:end].to(a.dtype))
        delta = F.linear(F.linear(rows, a, lora_a.bias), b, lora_b.bias) * scaling[name]
        result[start:end] += delta.to(result.dtype)
    return result


def _aligned(rows: torch.Tensor) -> torch.Tensor:
    """`rows`, copied where they do not start on a 64-byte boundary. PEFT gathers an adapter's rows
    into a new tensor, which torch's allocator aligns to 64 bytes; MKL's GEMM can sum in another
    order for a matrix that starts elsewhere (a row of 170 floats: the logits differed in the last
    bit), so a range of rows is multiplied from where PEFT's copy would start."""
    return rows if rows.data_ptr() % 64 == 0 else rows.clone()


def _flat_ok(x: torch.Tensor, result: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *biases: Any) -> bool:
    """Whether a layer's LoRA products may run as `mm` on 2-D views (`_routed_forward`): contiguous
    input and output of one dtype, the adapter's weights of that dtype, no LoRA bias."""
    return (x.dim() >= 2 and x.is_contiguous() and result.is_contiguous() and result.dtype == x.dtype
            and a.dtype == b.dtype == x.dtype and all(bias is None for bias in biases))


def _routed_saved_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`modules_to_save`: each row range through its adapter's copy of the module, else the original."""
    segments = _ROUTE.get()
    if segments is None:
        return type(self).forward(self, x, *args, **kwargs)
    _check_rows(x, segments)
    saved = self.modules_to_save
    if not any(name in saved for name, _, _ in segments):
        return self.original_module(x, *args, **kwargs)
    parts = [(saved[name] if name in saved else self.original_module)(x[start:end], *args, **kwargs)
             for name, start, end in segments]
    return torch.cat(parts)


def _check_rows(x: torch.Tensor, segments: tuple[Run, ...]) -> None:
    rows = segments[-1].end if segments else 0
    if x.shape[0] != rows:  # `install`'s probe makes this unreachable; never slice the wrong rows silently
        raise RuntimeError(f"routed LoRA: a layer got {x.shape[0]} rows for a batch of {rows}")


Mixing = Literal["routed", "peft", "per_variant"]


@dataclass(frozen=True)
class MixingVerdict:
    """How base and adapter rows of a model may share one forward pass, and why not the fastest way."""

    mode: Mixing
    reason: str | None = None  # why not `routed`, in words for the log and `status`
    #: Whether PEFT's `adapter_names` could mix these layers too (when routing is switched off).
    peft_can_mix: bool = False


#: The probe's shape: rows and tokens that no reshape of the batch leaves in place by chance.
_PROBE_ROWS, _PROBE_TOKENS = 3, 5


def install(model: Any) -> bool:
    """Decide how the PeftModel `model` mixes adapters in a batch (`mixing`), and route its adapter
    layers if they all can be; returns whether they are routed. Call again after loading an adapter
    (it may wrap new layers or bring a variant)."""
    verdict = _judge(model)
    if verdict.mode == "routed":
        from peft.utils.other import ModulesToSaveWrapper

        for layer in _adapter_layers(model).values():
            if "forward" not in vars(layer):
                routed = _routed_saved_forward if isinstance(layer, ModulesToSaveWrapper) else _routed_forward
                layer.forward = types.MethodType(routed, layer)
    setattr(model, _FLAG, verdict)
    return verdict.mode == "routed"


def mixing(model: Any) -> MixingVerdict:
    """What `install` decided for `model` (a model it never saw mixes nothing: one pass per variant)."""
    verdict = getattr(model, _FLAG, None)
    return verdict if isinstance(verdict, MixingVerdict) else MixingVerdict("per_variant", "adapters not inspected")


def routable(model: Any) -> bool:
    return mixing(model).mode == "routed"


def _adapter_layers(model: Any) -> dict[str, Any]:
    """Every module an adapter changes: PEFT tuner layers and auxiliary wrappers (modules_to_save...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}


def _judge(model: Any) -> MixingVerdict:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    layers = _adapter_layers(model)
    if not layers:
        return MixingVerdict("per_variant", "no adapter layers")
    for name, layer in layers.items():
        if isinstance(layer, LoraLayer) and _uses_variant(layer):
            return MixingVerdict("per_variant", f"a LoRA variant (DoRA or another) on {name}, which no batch can mix")
        if not isinstance(layer, (LoraLayer, ModulesToSaveWrapper)):
            return MixingVerdict("per_variant", f"{name} is a {type(layer).__name__}, which no batch can mix")
    odd = _not_one_row_per_sequence(model, layers)
    if odd is not None:
        return MixingVerdict("per_variant", odd)
    unroutable = [name for name, layer in layers.items()
                  if not (type(layer) is LoraLinear or type(layer) is ModulesToSaveWrapper)]
    saves = any(isinstance(layer, ModulesToSaveWrapper) for layer in layers.values())
    if not unroutable:
        return MixingVerdict("routed", peft_can_mix=not saves)
    if saves:
        return MixingVerdict("per_variant", f"modules_to_save beside {type(layers[unroutable[0]]).__name__} "
                                            f"({unroutable[0]}), which PEFT cannot mix in one batch")
    return MixingVerdict("peft", f"{unroutable[0]} is a LoRA layer of kind {type(layers[unroutable[0]]).__name__}, "
                                 "mixed by PEFT's adapter_names (more slowly)", peft_can_mix=True)


def _not_one_row_per_sequence(model: Any, layers: dict[str, Any]) -> str | None:
    """None when one forward pass of 3 rows of 5 tokens hands every adapter layer an input whose
    first two dimensions are (3, 5); else which layer does not get that, and what it gets."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if tensors and name not in seen:
                seen[name] = tuple(tensors[0].shape)
        return hook

    handles = [layer.register_forward_pre_hook(record(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        device = next(model.parameters()).device
        vocab = int(model.get_input_embeddings().weight.shape[0])
        ids = (torch.arange(_PROBE_ROWS * _PROBE_TOKENS, device=device) * 7919 % vocab).view(_PROBE_ROWS, -1)
        with torch.inference_mode(), model.disable_adapter():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for name in layers:
        shape = seen.get(name)
        if shape is None:
            return f"{name} takes no part in a forward pass of every row (a routed expert?)"
        if tuple(shape[:2]) != (_PROBE_ROWS, _PROBE_TOKENS):
            return (f"{name} gets an input of shape {list(shape)} for {_PROBE_ROWS} rows of {_PROBE_TOKENS} tokens, "
                    "not one row per sequence")
    return None


def _uses_variant(layer: Any) -> bool:
    """Whether an adapter of this LoRA layer is a variant (`lora_variant` in recent PEFT, `use_dora`
    in older releases)."""
    return bool(getattr(layer, "lora_variant", {})) or any(getattr(layer, "use_dora", {}).values())


def segments(names: Sequence[Any]) -> tuple[Run, ...]:
    """Runs of equal adapter names (or any values), in order."""
    runs: list[Run] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            runs.append(Run(names[start], start, i))
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
