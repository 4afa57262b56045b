"""Float32 linear layers through oneDNN inside a decode call (`worker.engine.cpu_linear`).

oneDNN sums in another order than MKL's GEMM, so its products are held to float32 rounding here
(and to plain PEFT's tokens in tests/test_decoding.py and tests/test_fidelity.py, where it is on);
wherever it does not apply (outside the block, other dtypes, gradients) the layer must be bit for
bit `F.linear`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from worker.engine import cpu_head, cpu_linear

ONEDNN_OP = "mkldnn::_linear_pointwise"


def ops(run: Callable[[], Any]) -> set[str]:
    """The operators `run()` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.key for e in prof.key_averages()}


H, INNER, VOCAB = 256, 512, 600  # every weight at least `MIN_WEIGHT` elements


class Model(torch.nn.Module):
    """Two linear layers and an output projection: what `install` and the head's patch see."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(H, INNER, bias=bias)
        self.down = torch.nn.Linear(INNER, H, bias=bias)
        self.head = torch.nn.Linear(H, VOCAB, bias=False)
        with torch.no_grad():
            for p in self.parameters():  # the scale of a trained layer: outputs of order 1
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test's random inputs the same from run to run (the tolerances are for these sizes)."""
    torch.manual_seed(0)


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding of another summation order."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def plain(model: Model, x: torch.Tensor) -> torch.Tensor:
    h = F.linear(x, model.up.weight, model.up.bias)
    h = F.linear(torch.relu(h), model.down.weight, model.down.bias)
    return F.linear(h, model.head.weight)


def test_this_torch_has_the_operator() -> None:
    assert cpu_linear.available()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, H), (7, 1, H), (16, 1, H)])
def test_inside_the_block_every_linear_goes_through_onednn_with_the_same_products(
        bias: bool, shape: tuple[int, ...]) -> None:
    model = Model(bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), cpu_linear.onednn(model, True):
        got = model(x)
        called = ops(lambda: model(x))
    assert ONEDNN_OP in called and "aten::mm" not in called and "aten::addmm" not in called
    close(got, plain(model, x))


def test_a_non_contiguous_input_gives_the_same_products() -> None:
    model = Model()
    x = torch.randn(6, 4, H)[:, 1:2, :]
    assert not x.is_contiguous()
    with torch.inference_mode(), cpu_linear.onednn(model, True):
        got = model(x)
    close(got, plain(model, x))


def test_outside_the_block_switched_off_or_with_gradients_it_is_f_linear_bit_for_bit() -> None:
    model = Model()
    x = torch.randn(9, 1, H)
    with torch.inference_mode():
        with cpu_linear.onednn(model, True):
            pass  # installs the patched forwards
        expected = plain(model, x)
        assert "forward" in vars(model.up)
        assert torch.equal(model(x), expected) and ONEDNN_OP not in ops(lambda: model(x))
        with cpu_linear.onednn(model, False):
            assert torch.equal(model(x), expected) and ONEDNN_OP not in ops(lambda: model(x))
    with cpu_linear.onednn(model, True):  # autograd: oneDNN's operator has no backward here
        y = model(x)
        assert y.requires_grad
        assert torch.equal(y.detach(), expected)


def test_bfloat16_keeps_torchs_own_path() -> None:
    model = Model().to(torch.bfloat16)
    x = torch.randn(9, 1, H, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = plain(model, x)  # type: ignore[arg-type]
        with cpu_linear.onednn(model, True):
            assert torch.equal(model(x), expected)


def test_a_weight_changed_in_place_is_read_as_it_is() -> None:
    """A merged adapter changes the base weight in place between calls: nothing may be cached."""
    model = Model()
    x = torch.randn(4, H)
    with torch.inference_mode(), cpu_linear.onednn(model, True):
        before = model(x)
        model.up.weight.add_(0.5 / H ** 0.5)  # a change of the weights' own scale, as a merged adapter's
        after = model(x)
    assert not torch.allclose(before, after)
    close(after, plain(model, x))


@pytest.mark.parametrize("rows", [1, 7, 8, 13])
def test_the_output_projection_goes_through_onednn_padded_to_a_multiple_of_8_rows(rows: int) -> None:
    """The head's own forward (`cpu_head`) calls `linear` too; oneDNN keeps a scratch buffer per row
    count it has seen, so every oneDNN input is padded to a multiple of `ROWS` rows."""
    model = Model()
    x = torch.randn(rows, 1, H)
    with torch.inference_mode(), cpu_head.padding_rows(model, True), cpu_linear.onednn(model, True):
        got = model.head(x)
        called = ops(lambda: model.head(x))
    assert ONEDNN_OP in called
    assert ("aten::new_zeros" in called) == (rows % cpu_linear.ROWS != 0)
    close(got, F.linear(x, model.head.weight))


def test_small_weights_keep_torchs_own_path() -> None:
    """LoRA's A and B: oneDNN's cost per call is more than their whole product."""
    small = torch.nn.Linear(16, 8)
    model = torch.nn.Sequential(small)
    model.get_output_embeddings = lambda: None  # type: ignore[assignment]
    x = torch.randn(5, 1, 16)
    with torch.inference_mode(), cpu_linear.onednn(model, True):
        assert torch.equal(small(x), F.linear(x, small.weight, small.bias)) and ONEDNN_OP not in ops(lambda: small(x))


def test_a_prefill_keeps_torchs_own_path() -> None:
    """More than one position per row (a prefill, a scoring pass): MKL's GEMM, bit for bit."""
    model = Model()
    x = torch.randn(4, 6, H)
    with torch.inference_mode(), cpu_linear.onednn(model, True):
        assert torch.equal(model(x), plain(model, x)) and ONEDNN_OP not in ops(lambda: model(x))


def test_without_onednn_the_switch_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch built without oneDNN: the block runs torch's own path, bit for bit."""
    model = Model()
    x = torch.randn(5, 1, H)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    cpu_linear.available.cache_clear()
    try:
        with torch.inference_mode(), cpu_linear.onednn(model, True):
            assert not cpu_linear.ACTIVE.get()
            assert torch.equal(model(x), plain(model, x))
    finally:
        cpu_linear.available.cache_clear()
