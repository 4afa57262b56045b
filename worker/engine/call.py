"""The options of a decode call and the state its parts share."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import lora_routing
from .kv_cache import Scratch
from .request import DecodeRequest
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .fidelity import DecodePlan
    from .prefix import SharedPrefix


@dataclass(frozen=True)
class DecodeOptions:
    """How rows are scheduled. Each optimisation can be switched off, and each has a test showing it
    leaves greedy outputs unchanged. `capacity`: the most rows in the batch at once."""

    capacity: int
    #: Admit waiting rows as slots free up (else only when the batch is empty).
    refill: bool = True
    #: Compute the prompt prefix common to every row once per variant, and hold its KV entries once.
    share_prefix: bool = True
    #: With a shared prefix, decode steps attend over it and the rows' own columns in place (`attention`),
    #: instead of over a copy of both.
    in_place_attention: bool = True
    #: A common prefix shorter than this is not worth a separate pass.
    min_prefix: int = 4
    #: Admit waiting rows once this share of the batch is free (fewer, larger prefills).
    refill_fraction: float = 0.5
    #: Route mixed batches through `lora_routing` where the model allows it (else PEFT's `adapter_names`).
    route_lora: bool = True
    #: Compute logits for the last position of a prefill only.
    last_logits_only: bool = True
    #: On CPU, run the output projection on a multiple of 8 rows (faster there with float32 BLAS).
    pad_output_rows: bool = True
    #: On CPU, float32 linear layers through oneDNN instead of MKL's GEMM (`cpu_linear`): None for the
    #: weight shapes where it was timed faster on this machine (`cpu_linear.faster`, at the threads of
    #: the call's start), True or False for all or none.
    onednn_linear: bool | None = None
    #: On CPU, one thread instead of several while other work takes the cores (`contention`).
    govern_threads: bool = True
    #: On CPU, hand the C heap's free pages back to the system after each prefill (`worker.heap.trim`).
    trim_heap: bool = True


def _last_logits_kwargs(model: Any) -> dict[str, int]:
    """`logits_to_keep=1` where the model's forward takes it (every causal LM in transformers >= 4.50)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@dataclass
class DecodeCall:
    """One `decode_rows` call on the streaming path: what every part of it reads.

    Invariants: `options` are the plan's (already adjusted by `fidelity.plan_decode`); `names` is None
    or holds one adapter name per prompt; `prefix` is None or shared by every prompt (set once, before
    the first admission); `scratch` is this call's alone (its caches' working memory).
    """

    model: Any
    prompts: Sequence[Sequence[int]]
    request: DecodeRequest
    names: list[str] | None
    options: DecodeOptions
    plan: DecodePlan
    scratch: Scratch = field(default_factory=Scratch)
    prefix: SharedPrefix | None = None
    #: Extra arguments of a prefill's forward pass (`logits_to_keep`).
    prefill_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.options.last_logits_only:
            self.prefill_kwargs.update(_last_logits_kwargs(self.model))

    @property
    def device(self) -> torch.device:
        return self.request.device

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    def forward(self, names: list[str] | None, **inputs: Any) -> Any:
        """One forward pass; row i through adapter `names[i]` (routed in our LoRA layers, or PEFT's
        `adapter_names` where the model's layers cannot be routed or routing is switched off)."""
        if names is None:
            return self.model(**inputs)
        if self.options.route_lora and lora_routing.routable(self.model):
            with lora_routing.route(names):
                return self.model(**inputs)
        return self.model(**inputs, adapter_names=names)
