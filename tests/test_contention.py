"""`worker.engine.contention`: one thread while other work takes the cores, and back when it stops."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.engine import contention, cpu_linear


class Clocks:
    """`time.perf_counter` and `time.process_time` as the test sets them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wall = self.cpu = 0.0
        monkeypatch.setattr(contention.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(contention.time, "process_time", lambda: self.cpu)

    def spend(self, wall: float, cores: float) -> None:
        self.wall += wall
        self.cpu += wall * cores


@pytest.fixture(autouse=True)
def no_earlier_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contention, "_last_end", None)


@pytest.fixture
def two_threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_it_drops_to_one_thread_under_contention_and_comes_back_when_it_ends(
        monkeypatch: pytest.MonkeyPatch, two_threads: None) -> None:
    clocks = Clocks(monkeypatch)
    with contention.governed(True) as governor:
        for _ in range(5):  # quiet: about 1.8 cores used of 2
            clocks.spend(0.5, 1.8)
            contention.step()
        assert torch.get_num_threads() == 2 and governor.switches == 0
        clocks.spend(0.5, 1.8)
        clocks.spend(2.0, 0.5)  # busy: the threads get half a core between them
        contention.step()
        assert torch.get_num_threads() == 1
        clocks.spend(2.5, 0.3)  # still busy: one thread gets a third of a core
        contention.step()
        assert torch.get_num_threads() == 1
        clocks.spend(2.5, 0.98)  # free again
        contention.step()
        assert torch.get_num_threads() == 2 and governor.switches == 2
        clocks.spend(2.5, 0.5)
        contention.step()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # restored on the way out


def test_a_call_just_after_one_that_ended_on_one_thread_starts_on_one(monkeypatch: pytest.MonkeyPatch,
                                                                        two_threads: None) -> None:
    clocks = Clocks(monkeypatch)
    with contention.governed(True):
        clocks.spend(2.5, 0.4)
        contention.step()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    clocks.spend(1.0, 0.0)
    with contention.governed(True) as governor:  # the next chunk's call, a second later
        assert torch.get_num_threads() == 1 and governor.threads == 2
        clocks.spend(2.5, 0.95)
        contention.step()
        assert torch.get_num_threads() == 2
    with contention.governed(True):  # ended on 2 threads: starts on 2
        assert torch.get_num_threads() == 2
        clocks.spend(2.5, 0.4)
        contention.step()
    clocks.spend(contention.REMEMBER + 1, 0.0)
    with contention.governed(True):  # long after
        assert torch.get_num_threads() == 2


def test_nothing_changes_when_off_or_on_one_thread(monkeypatch: pytest.MonkeyPatch, two_threads: None) -> None:
    clocks = Clocks(monkeypatch)
    for on, env in ((False, None), (True, "0")):
        if env is not None:
            monkeypatch.setenv(contention.ENV, env)
        with contention.governed(on) as governor:
            clocks.spend(3.0, 0.1)
            contention.step()
            assert not governor.enabled and torch.get_num_threads() == 2
    monkeypatch.delenv(contention.ENV)
    torch.set_num_threads(1)
    with contention.governed(True) as governor:
        assert not governor.enabled


@pytest.mark.parametrize("shape", [(1536, 576), (49152, 576), (576, 1536)])
def test_the_decode_steps_products_do_not_depend_on_the_thread_count(shape: tuple[int, int]) -> None:
    """What makes a switch safe: the demo model's linear shapes through oneDNN (and MKL) give the same
    bits on 1 and 2 threads (the attention kernel's own test: tests/test_attention.py)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen) * 0.05
    x = torch.randn(24, 1, shape[1], generator=gen)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            token = cpu_linear.ACTIVE.set(cpu_linear.available())  # as inside `cpu_linear.onednn`
            try:
                with torch.no_grad():
                    outs.append((cpu_linear.linear(x, weight, None), torch.nn.functional.linear(x, weight)))
            finally:
                cpu_linear.ACTIVE.reset(token)
    finally:
        torch.set_num_threads(before)
    for onednn, mkl in outs[1:]:
        assert torch.equal(onednn, outs[0][0]) and torch.equal(mkl, outs[0][1])
