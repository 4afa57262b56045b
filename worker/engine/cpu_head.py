"""The output projection (LM head) on its rows as one matrix: on CPU, a multiple of 8 rows (decode);
on any device, the kept positions of a scoring pass flattened first.

- `padding_rows`: float32 BLAS took 15.1 ms at 13 rows and 8.1 ms padded to 16 for the demo model's
  49152 x 576 head (bench/rows_per_pass.py). The real rows' logits are the same up to float
  rounding; the decode tests require identical tokens with it on.
- `flat_rows`: with `logits_to_keep=k`, transformers hands the head `hidden[:, -k:, :]`, a slice that
  is not contiguous, which `torch.matmul` cannot fold into one matrix product: it runs a batched
  product against the weight expanded per sequence, reading the whole head once per sequence (a
  scoring pass of 64 contexts on the demo model: 222 ms at k = 1, 713 ms at k = 3 on this project's
  CPU; bench/README.md). Flattened to [rows, hidden] first (a copy of the slice), it is one product.
  The logits are the same up to float rounding; the scoring tests compare them with plain scoring.

Both patch only a plain `nn.Linear` head, and change nothing outside their block. Inside
`cpu_linear.onednn` the head's product goes through oneDNN, still padded: oneDNN is not slower
unpadded (9.4 ms at 13 rows, 10.5 ms at 16), but it keeps a scratch buffer of about 2.4 MiB per row
count it has seen for this head, so padding bounds that memory to one buffer per multiple of 8.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from . import cpu_linear

#: Whether the output projections patched by `pad_output_rows` pad their rows (inside `padding_rows`).
PAD_ROWS: ContextVar[bool] = ContextVar("pad_output_rows", default=False)
#: Whether they flatten their input into one matrix first (inside `flat_rows`).
FLAT_ROWS: ContextVar[bool] = ContextVar("flat_output_rows", default=False)


def padded_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` on `x` [..., in] with its rows padded with zeros to a multiple of 8 (when
    `PAD_ROWS` says so), or flattened to [rows, in] first (when `FLAT_ROWS` says so): [..., out]."""
    rows = x.numel() // x.shape[-1]
    if FLAT_ROWS.get() and x.dim() > 2:
        flat = cpu_linear.linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias)  # [rows, out]
        return flat.view(*x.shape[:-1], self.weight.shape[0])
    if not PAD_ROWS.get():
        return cpu_linear.linear(x, self.weight, self.bias)
    return cpu_linear.padded_rows(x, self.weight, self.bias, cpu_linear.HEAD_ROWS, cpu_linear.linear)


def pad_output_rows(model: Any) -> None:
    """Let the model's output projection run on a multiple of 8 rows (zeros below the real ones)
    where `PAD_ROWS` says so; elsewhere it is a plain `nn.Linear`."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and "forward" not in vars(head):
        head.forward = types.MethodType(padded_rows_forward, head)  # type: ignore[method-assign]


@contextmanager
def padding_rows(model: Any, on: bool) -> Iterator[None]:
    """Within the block, the model's output projection pads its rows (`on`) or not."""
    if on:
        pad_output_rows(model)
    token = PAD_ROWS.set(on)
    try:
        yield
    finally:
        PAD_ROWS.reset(token)


@contextmanager
def flat_rows(model: Any) -> Iterator[None]:
    """Within the block, the model's output projection runs on its input flattened to one matrix."""
    pad_output_rows(model)
    token = FLAT_ROWS.set(True)
    try:
        yield
    finally:
        FLAT_ROWS.reset(token)
