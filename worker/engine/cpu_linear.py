"""Float32 linear layers through oneDNN on CPU, in the decode steps of a decode call.

torch's CPU build runs a float32 `nn.Linear` as an MKL GEMM. On this project's CPU (AMD EPYC,
AVX-512) MKL's float32 GEMM is slow on the decode step's shapes: the demo model's 49152 x 576 output
projection took 21.0 ms for 24 rows where oneDNN (the library torch already ships for its bfloat16
and fused CPU kernels) takes 10.9 ms on the plain weight as it is, and an MLP up-projection 0.49 ms
against 0.38 ms with the weights read from memory (`bench/linear_kernels.py`, 2026-11-30). Inside `onednn(model,
True)`, a plain `nn.Linear` of the model (base layers under LoRA, the LM head) whose input has one
position per row (a decode step) computes `x @ W.T + b` with `torch.ops.mkldnn._linear_pointwise`
on the same weight tensor: no copy, no packing, and a weight changed in place (a merged adapter) is
read as it is. The rows are padded to a multiple of `ROWS`: oneDNN keeps a primitive (JIT code and a
scratch buffer, about 2.4 MiB for the demo model's head) per row count it has seen, so padding bounds
them to one per multiple of 8. What remains is a fixed cost of the library, measured in
bench/README.md.

The products are the same up to float rounding (another summation order, as a GEMM over another
number of rows already is); the decode and fidelity tests require the same tokens as plain PEFT with
it on. Everything else runs `F.linear`, exactly as `nn.Linear` does: prefills and scoring passes
(many positions per row, where oneDNN gains little), weights under `MIN_WEIGHT` elements (LoRA's A
and B, narrow key and value projections), other dtypes (bfloat16 and float16 already go through
oneDNN in torch), other devices, autograd (gradients enabled), and a torch without the operator
(`available()` is false: it is never used, and the log says so once).

Which is faster depends on the machine and the shape, so a decode call takes oneDNN only for the
weight shapes where `faster` timed it faster (`DecodeOptions.onednn_linear` None, the default; True
or False force it for all): on the AMD EPYC above oneDNN made the engine 1.15x faster, on an Intel
Xeon with AMX and a 480 MiB L3 (where a decode step of 32 rows is bound by arithmetic, not by reading
the weights) MKL was 1.06x faster than oneDNN for the whole engine, but not for the output projection
at 8 rows (bench/linear_kernels.py, 2026-12-01). `faster` times both on the model's own weights at
the call's rows, once per process for each shape of model and number of rows (about half a second for
the demo model), and logs what it chose.
"""

from __future__ import annotations

import functools
import logging
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

log = logging.getLogger(__name__)

#: oneDNN's inputs are padded to a multiple of this many rows (see `linear`).
ROWS = 8
#: The output projection's rows are padded to a multiple of this many on CPU (`cpu_head`), whichever
#: library computes it.
HEAD_ROWS = 8
#: Smaller weights keep MKL: LoRA's A and B and tiny models, where oneDNN's ~20 us per call is more
#: than their whole product (`bench/linear_kernels.py --shape tiny`), and narrow projections such as
#: the demo model's 576 x 192 keys and values (110,592 elements), where oneDNN took 0.8x MKL's time
#: at 8-32 rows; the engine was 1.15x faster than MKL with this threshold, 1.07x with 1 << 16
#: (`bench/linear_kernels.py`, bench/README.md).
MIN_WEIGHT = 1 << 17

#: Alternated rounds of `faster`'s timing (after one to warm up); the best of each counts.
ROUNDS = 3
#: oneDNN is chosen for a shape only where it was this much faster than the default GEMM: a near tie
#: keeps torch's own path (in the engine, oneDNN on shapes timed within a few percent of MKL made a
#: decode call 6% slower, bench/README.md).
MARGIN = 1.05

#: Which products go through oneDNN inside `onednn`: True every one that applies, False none, or the
#: weight shapes (out, in) chosen by `faster`.
Choice = bool | frozenset[tuple[int, ...]]

#: Which products of the linear layers patched by `install` use oneDNN (inside `onednn`).
ACTIVE: ContextVar[Choice] = ContextVar("onednn_linear", default=False)


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's linear operator and it computes `F.linear` (up to rounding) on
    a probe with a bias, a 3-D input and a non-contiguous one."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        log.info("oneDNN linear unavailable in this torch: float32 linear layers use its default GEMM")
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=gen)
        bias = torch.randn(24, generator=gen)
        x = torch.randn(5, 3, 40, generator=gen)[:, 1:, :]  # [5, 2, 40], not contiguous
        got = op(x, weight, bias, "none", [], "")
        ok = bool(got.shape == (5, 2, 24) and torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5))
    except RuntimeError as error:
        log.info("oneDNN linear refused a probe (%s): float32 linear layers use torch's default GEMM", error)
        return False
    if not ok:
        log.warning("oneDNN linear disagreed with F.linear on a probe: float32 linear layers use torch's default GEMM")
    return ok


Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _default_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def padded_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiple: int,
                product: Product) -> torch.Tensor:
    """`product(x, weight, bias)` on `x` [..., in] with its rows padded with zeros to a multiple of
    `multiple`; the real rows' products, [..., out]."""
    rows = x.numel() // x.shape[-1]
    if rows % multiple == 0:
        return product(x, weight, bias)
    padded = x.new_zeros((rows + multiple - rows % multiple, x.shape[-1]))  # [rows rounded up, in]
    padded[:rows] = x.reshape(rows, x.shape[-1])
    return product(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; through oneDNN inside `onednn` where it applies (float32 on CPU,
    no gradients)."""
    chosen = ACTIVE.get()
    if (chosen and (chosen is True or weight.shape in chosen) and _applies(weight)
            and (x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1))
            and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()):
        return padded_rows(x, weight, bias, ROWS, _onednn_product)
    return F.linear(x, weight, bias)


def _applies(weight: torch.Tensor) -> bool:
    """Whether `linear` would send a product with this weight to oneDNN (for a decode step's input)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.numel() >= MIN_WEIGHT


def _decode_weights(model: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of each distinct `nn.Linear` of `model` whose products would go to oneDNN."""
    seen: set[int] = set()
    found: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and _applies(module.weight) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append((module.weight, module.bias))
    return found


#: `faster`'s answers: (the model's weight shapes, rows) -> the shapes oneDNN computed faster.
_CHOSEN: dict[tuple[Any, ...], frozenset[tuple[int, ...]]] = {}


def faster(model: Any, rows: int, padded_head: bool = False) -> frozenset[tuple[int, ...]]:
    """The shapes of `model`'s weights whose decode-step products oneDNN computes faster (by
    `MARGIN`) than torch's default GEMM on this machine, for a decode call of up to `rows` rows: per
    shape, every weight of that shape once per round on three quarters of `rows` (oneDNN's input
    padded as `linear` pads it), the two alternated `ROUNDS` times, the best round of each compared.
    `padded_head`: the call pads the output projection's rows to `HEAD_ROWS` (`cpu_head`), so its
    default product is timed padded too, as the call will run it (MKL's float32 GEMM of the demo
    model's head took 18.8 ms at 12 rows and 9.1 ms at 16 on an Intel host, bench/README.md: timed
    unpadded, it lost to oneDNN where padded it wins). Timed once per process for each shape of model,
    number of rows and padding; empty without oneDNN or without weights that it would take."""
    weights = _decode_weights(model)
    if not weights or not available():
        return frozenset()
    rows = max(1, -(-rows * 3 // 4))  # a call's rows in flight range over about [rows / 2, rows]
    head = _head_weight(model) if padded_head else None
    key = (tuple((tuple(w.shape), b is not None) for w, b in weights), rows, head is not None)
    if key not in _CHOSEN:
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for weight, bias in weights:
            by_shape.setdefault(tuple(weight.shape), []).append((weight, bias))
        chosen, said = set(), []
        with torch.inference_mode():
            for shape, group in by_shape.items():
                padded = head is not None and any(weight is head for weight, _ in group)
                products: dict[str, Product] = {
                    "default": (lambda x, weight, bias: padded_rows(x, weight, bias, HEAD_ROWS, _default_product))
                    if padded else _default_product,  # padded as `cpu_head` runs it
                    "oneDNN": lambda x, weight, bias: padded_rows(x, weight, bias, ROWS, _onednn_product),  # `linear`
                }
                x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(0))
                best = {name: float("inf") for name in products}
                for _ in range(ROUNDS + 1):  # the first round warms up (primitives, pages), uncounted
                    for name, product in products.items():
                        started = time.perf_counter()
                        for weight, bias in group:
                            product(x, weight, bias)
                        best[name] = min(best[name], time.perf_counter() - started)
                if best["oneDNN"] * MARGIN < best["default"]:
                    chosen.add(shape)
                said.append(f"{shape[1]} x {shape[0]} ({len(group)}): oneDNN {best['oneDNN'] * 1e3:.2f} ms, "
                            f"default {best['default'] * 1e3:.2f} ms")
        _CHOSEN[key] = frozenset(chosen)
        free_blas_buffers()  # what MKL kept for the large products it was timed on
        log.info("float32 decode products at %d rows through oneDNN where %.2fx faster: %s", rows, MARGIN,
                 "; ".join(said))
    return _CHOSEN[key]


def _head_weight(model: Any) -> torch.Tensor | None:
    """The weight of `model`'s output projection where it is a plain `nn.Linear` (what `cpu_head`
    pads), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head.weight if isinstance(head, torch.nn.Linear) else None


@functools.cache
def _mkl_free_buffers() -> Callable[[], None] | None:
    """MKL's `mkl_free_buffers` in the library torch links it into, or None where there is none."""
    import ctypes
    import os

    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        function = library.mkl_serv_free_buffers  # what MKL's mkl_free_buffers calls
    except (OSError, AttributeError):  # another build of torch: no MKL, or linked otherwise
        return None
    function.argtypes, function.restype = (), None
    return function  # type: ignore[no-any-return]


def free_blas_buffers() -> None:
    """Return to the system the buffers MKL keeps for reuse after a product (it packs the operands of
    a large GEMM into buffers of its own and keeps them): `faster` timed MKL on every large weight
    shape, which left about 10 MiB resident that the decode call, using oneDNN for those shapes,
    would never reuse (bench/README.md, memory). Not while another thread may be inside MKL."""
    function = _mkl_free_buffers()
    if function is not None:
        function()


def wanted(model: Any, option: bool | None, rows: int, padded_head: bool = False) -> Choice:
    """Which of `model`'s float32 products a decode call of up to `rows` rows runs through oneDNN:
    all or none as `option` (`DecodeOptions.onednn_linear`) says, else (None) the shapes for which
    `faster` found it faster (`padded_head`: the call pads the output projection's rows)."""
    return option if option is not None else faster(model, rows, padded_head)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def install(model: Any) -> None:
    """Give every plain `nn.Linear` of `model` without a forward of its own (the output projection
    has one: `cpu_head`) a forward that goes through `linear`; outside `onednn` it is `F.linear`."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]


@contextmanager
def onednn(model: Any, on: Choice) -> Iterator[None]:
    """Within the block, the model's float32 linear layers run through oneDNN (`available()`): every
    one (`on` True), none (False), or those whose weights have the shapes in `on`."""
    on = on if on and available() else False
    if on:
        from .cpu_head import pad_output_rows

        pad_output_rows(model)  # the head's own forward, which calls `linear` too
        install(model)
    token = ACTIVE.set(on)
    try:
        yield
    finally:
        ACTIVE.reset(token)
