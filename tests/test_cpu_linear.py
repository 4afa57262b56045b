"""Float32 linear layers through oneDNN inside a decode call (`worker.engine.cpu_linear`).

oneDNN sums in another order than MKL's GEMM, so its products are held to float32 rounding here
(and to plain PEFT's tokens in tests/test_decoding.py and tests/test_fidelity.py, where it is on);
wherever it does not apply (outside the block, other dtypes, gradients) the layer must be bit for
bit `F.linear`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import LlamaConfig, LlamaForCausalLM

from contract.config import GenerationConfig
from worker.engine import cpu_head, cpu_linear
from worker.engine.call import DecodeOptions
from worker.engine.request import DecodeRequest
from worker.engine.scheduler import decode_rows

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


class Clock:
    """A stand-in for `time` in `cpu_linear`: the products advance it by what `cost(backend, weight,
    rows of the input)` says (seconds), so that which is faster is decided here, not by the machine's
    noise."""

    def __init__(self, cost: Callable[[str, torch.Tensor, int], float]) -> None:
        self.now, self.cost = 0.0, cost
        self.calls: list[str] = []

    def perf_counter(self) -> float:
        return self.now

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(cpu_linear, "_CHOSEN", {})
        monkeypatch.setattr(cpu_linear, "time", self)
        for name, attr in (("oneDNN", "_onednn_product"), ("default", "_default_product")):
            monkeypatch.setattr(cpu_linear, attr, self._timed(name, getattr(cpu_linear, attr)))

    def _timed(self, name: str, product: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            self.calls.append(name)
            self.now += self.cost(name, weight, x.numel() // x.shape[-1])
            return product(x, weight, bias)
        return timed


ALL_SHAPES = frozenset({(INNER, H), (H, INNER), (VOCAB, H)})


@pytest.mark.parametrize("slower", ["oneDNN", "default"])
def test_the_backend_timed_faster_on_this_machine_is_chosen_once_per_shape_and_rows(
        slower: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`faster` times both on the model's own weights; the slower one is not chosen, and the answer is
    kept for the model's shape and rows (a second call times nothing)."""
    clock = Clock(lambda name, weight, rows: 2.0 if name == slower else 1.0)
    clock.install(monkeypatch)
    model = Model()
    want = ALL_SHAPES if slower == "default" else frozenset()
    assert cpu_linear.faster(model, 5) == want
    timed = len(clock.calls)
    assert timed == 2 * 3 * (cpu_linear.ROUNDS + 1)  # 3 weights, both backends, warm-up round included
    assert cpu_linear.faster(Model(bias=True), 5) == want  # the same shapes and rows
    assert len(clock.calls) == timed
    cpu_linear.faster(model, 16)  # other rows: timed again
    assert len(clock.calls) == 2 * timed


@pytest.mark.parametrize(("onednn_s", "chosen"), [(1.0, True), (1.9, True), (1.96, False), (2.0, False)])
def test_a_near_tie_keeps_the_default(onednn_s: float, chosen: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN must be faster by `MARGIN` (1.05: 1.9 s against 2 s is, 1.96 s is not)."""
    Clock(lambda name, weight, rows: onednn_s if name == "oneDNN" else 2.0).install(monkeypatch)
    assert cpu_linear.faster(Model(), 8) == (ALL_SHAPES if chosen else frozenset())


def test_each_shape_is_timed_and_chosen_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN slower for the output projection alone: chosen for the two other shapes."""
    Clock(lambda name, weight, rows: 2.0 if (name == "oneDNN") == (weight.shape[0] == VOCAB) else 1.0).install(
        monkeypatch)
    assert cpu_linear.faster(Model(), 8) == ALL_SHAPES - {(VOCAB, H)}


@pytest.mark.parametrize("padded_head", [False, True])
def test_the_head_is_timed_as_the_call_runs_it(padded_head: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the head's rows padded in the call (`cpu_head`), its default product is timed padded too:
    here MKL is slow at the timed rows unpadded (6 = three quarters of 8) and fast at a multiple of 8,
    as the demo model's head was on an Intel host (18.8 ms at 12 rows, 9.1 at 16), so timed as it runs
    the head keeps the default; the other shapes are timed as before, unpadded."""
    seen: dict[tuple[str, tuple[int, ...]], set[int]] = {}

    def cost(name: str, weight: torch.Tensor, rows: int) -> float:
        seen.setdefault((name, tuple(weight.shape)), set()).add(rows)
        if name == "default":
            return 1.0 if rows % cpu_linear.HEAD_ROWS == 0 else 3.0
        return 2.0

    Clock(cost).install(monkeypatch)
    chosen = cpu_linear.faster(Model(), 8, padded_head)
    assert seen[("default", (VOCAB, H))] == ({8} if padded_head else {6})
    assert seen[("default", (INNER, H))] == {6} and seen[("oneDNN", (VOCAB, H))] == {8}
    assert chosen == (ALL_SHAPES - {(VOCAB, H)} if padded_head else ALL_SHAPES)
    assert cpu_linear.wanted(Model(), None, 8, padded_head) == chosen  # kept per padding, not timed again


def test_only_the_shapes_chosen_go_through_onednn() -> None:
    model = Model()
    x = torch.randn(7, 1, H)
    with torch.inference_mode(), cpu_linear.onednn(model, frozenset({(VOCAB, H)})):
        got = model(x)
        called = ops(lambda: model.head(x))
        assert ONEDNN_OP in called
        inner = torch.randn(7, 1, INNER)
        assert ONEDNN_OP not in ops(lambda: model.up(x)) and ONEDNN_OP not in ops(lambda: model.down(inner))
    close(got, plain(model, x))
    with torch.inference_mode(), cpu_linear.onednn(model, frozenset()):
        assert ONEDNN_OP not in ops(lambda: model(x)) and torch.equal(model(x), plain(model, x))


def test_an_option_set_is_taken_as_it_is_and_nothing_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_timing(*args: Any) -> bool:
        raise AssertionError("timed")

    monkeypatch.setattr(cpu_linear, "faster", no_timing)
    assert cpu_linear.wanted(Model(), True, 8) is True
    assert cpu_linear.wanted(Model(), False, 8) is False


def test_a_model_with_nothing_for_onednn_is_never_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 weights (torch's own oneDNN path already) and weights too small for it: no timing."""
    def no_timing(*args: Any) -> torch.Tensor:
        raise AssertionError("timed")

    monkeypatch.setattr(cpu_linear, "_onednn_product", no_timing)
    assert cpu_linear.faster(Model().to(torch.bfloat16), 8) == frozenset()
    assert cpu_linear.faster(torch.nn.Sequential(torch.nn.Linear(16, 8)), 8) == frozenset()


@pytest.mark.parametrize("chosen", [ALL_SHAPES, frozenset()])
def test_a_decode_call_left_to_choose_follows_the_timing(chosen: frozenset[tuple[int, ...]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`decode_rows` with `onednn_linear` None runs the products through oneDNN exactly where `faster`
    says so (its decode steps; prefills keep torch's GEMM either way)."""
    asked: list[tuple[int, bool]] = []

    def faster(model: Any, rows: int, padded_head: bool = False) -> frozenset[tuple[int, ...]]:
        asked.append((rows, padded_head))
        return chosen

    monkeypatch.setattr(cpu_linear, "faster", faster)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=H, intermediate_size=INNER, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB)  # the MLP and head big enough for oneDNN
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    request = DecodeRequest(GenerationConfig(max_new_tokens=3), set(), 0, torch.device("cpu"))
    called = ops(lambda: decode_rows(model, [[5, 6, 7], [5, 8]], request, options=DecodeOptions(capacity=4)))
    assert asked == [(4, True)]  # on CPU the call pads the head's rows (`cpu_head`), and says so
    assert (ONEDNN_OP in called) is bool(chosen)


def test_timing_hands_back_what_mkl_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """After `faster` has timed MKL on the large shapes, MKL's buffers are freed (once per timing)."""
    freed: list[bool] = []
    monkeypatch.setattr(cpu_linear, "free_blas_buffers", lambda: freed.append(True))
    Clock(lambda name, weight, rows: 1.0).install(monkeypatch)
    cpu_linear.faster(Model(), 8)
    cpu_linear.faster(Model(), 8)
    assert freed == [True]


#: A child that runs one large float32 GEMM (MKL keeps buffers for its operands), then prints the
#: resident anonymous memory that `free_blas_buffers` handed back, in KiB.
MKL_PROBE = """
import torch
from worker.engine import cpu_linear
def anon():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))
torch.randn(448, 576) @ torch.randn(576, 1536)
before = anon()
cpu_linear.free_blas_buffers()
print(before - anon())
"""


@pytest.mark.skipif(not torch.backends.mkl.is_available() or not os.path.exists("/proc/self/status"),
                    reason="a torch without MKL, or no /proc")
def test_mkl_buffers_are_handed_back() -> None:
    assert cpu_linear._mkl_free_buffers() is not None
    done = subprocess.run([sys.executable, "-c", MKL_PROBE], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert int(done.stdout.strip().splitlines()[-1]) > 1024  # KiB: more than 1 MiB came back
