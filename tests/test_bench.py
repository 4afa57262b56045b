"""The benchmark scripts run, in their small modes: compare_strategies.py's GPU mode (random-weight
Llama shapes, fixed output length) on CPU with a tiny shape, so it is ready for a lent GPU
(`--device cuda --shape 1b --shape 8b`); rows_per_pass.py; control_plane.py with a few simulated
workers; loglik_vs_harness.py on a tiny model against lm-evaluation-harness; contention.py small;
linear_kernels.py on the tiny shape; compare_strategies.py's record of the thread governor's switches."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import harness_installed

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_gpu_mode_runs_on_cpu_with_a_tiny_shape() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/compare_strategies.py"), "--shape", "tiny", "--prompts", "6",
         "--new-tokens", "6", "--adapters", "1", "3", "--bandwidth-gbs", "100", "--repeat", "1",
         "--strategies", "base,a,b,c"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "random-weight Llama tiny, float32, fixed output length" in out
    for k, rows in ((1, 12), (3, 24)):
        assert f"{k} adapter(s): 6 prompts x {k + 1} variants = {rows} rows" in out
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^(base|a|b|c) .*$", out, re.MULTILINE)}
    assert set(lines) == {"base", "a", "b", "c"}
    # float32 on CPU: lora-compare's engine gives exactly (b)'s tokens, and every row is the fixed length
    assert re.search(r"^c\s+\S+\s+\S+\s+\S+\s+\S+\s+100\.0%", out, re.MULTILINE), out
    assert "bandwidth floor" in out and "(c) decode:" in out
    assert "embedded mode" not in out  # that part runs on the demo model only


def test_the_decode_steps_script_runs_tiny() -> None:
    """bench/decode_steps.py on the tiny shape: our engine's steps are recorded (`worker.engine.steps`),
    every row stays in flight, the table has a line per context (ours with torch's flash attention beside,
    vLLM where its venv is installed), and the keys' and values' reads give a floor."""
    from bench.vllm_peer import client

    engines = "ours,flash,vllm" if client.python() is not None else "ours,flash"
    done = subprocess.run([sys.executable, str(REPO / "bench/decode_steps.py"), "--shape", "tiny", "--prompts", "2",
                           "--adapters", "1", "--new-tokens", "24", "--contexts", "70", "80", "--engines", engines],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "2 prompts x (base + 1 adapters) = 4 rows in flight, 24 new tokens each" in out
    # 24 new tokens: the prefill gives the first, 23 decode steps the rest, each over all 4 rows
    assert re.search(r"^ours: [\d.]+ s for the 23 steps", out, re.MULTILINE), out
    assert re.search(r"^flash: [\d.]+ s for the 23 steps", out, re.MULTILINE), out
    assert re.search(r"^\s+~80\s+[\d.]+\s+4\s+\d+\s+[\d.]+\s+4\s+\d+.*\s+[\d.]+x$", out, re.MULTILINE), out
    assert re.search(r"^\s+~80\s+[\d.]+\s+4\s+\d+", out, re.MULTILINE), out
    assert re.search(r"^floor: keys and values read per step .* no lower than about [\d.]+x$", out, re.MULTILINE), out
    if engines == "ours,flash,vllm":
        assert re.search(r"^vllm: [\d.]+ s for the \d+ steps", out, re.MULTILINE), out


def test_the_contention_benchmark_runs_small(demo_model: Path) -> None:
    """bench/contention.py: a quiet and a loaded run of the chunk path per setting, the same outputs."""
    done = subprocess.run([sys.executable, str(REPO / "bench/contention.py"), "--prompts", "1", "--adapters", "1",
                           "--new-tokens", "3", "--load", "1", "--settings", "worker"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = r"^worker\s+GOMP_SPINCOUNT=10000\s+[\d.]+s.*[\d.]+x\s+yes$"
    assert re.search(line, done.stdout, re.MULTILINE), done.stdout


def test_the_vllm_peer_runs_tiny_with_the_same_outputs() -> None:
    """The vLLM-CPU peer as a strategy of compare_strategies.py, on the tiny shape (weights and adapters
    saved for it): the same token ids as plain PEFT (b) and lora-compare (c) on every row."""
    from bench.vllm_peer import client

    if client.python() is None:
        pytest.skip(client.missing())
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/compare_strategies.py"), "--shape", "tiny", "--prompts", "4",
         "--new-tokens", "6", "--adapters", "2", "--bandwidth-gbs", "100", "--repeat", "1",
         "--strategies", "base,b,c,vllm"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "vLLM-CPU peer and lora-compare (c) on the same prompt token ids (12 rows" in out, out
    assert re.search(r"^c\s+[\d.]+\s+[\d.]+\s+12/12\s+-\s+12/12", out, re.MULTILINE), out
    assert re.search(r"^vllm\s+[\d.]+\s+[\d.]+\s+12/12\s+12/12\s+-", out, re.MULTILINE), out


def test_the_rows_per_pass_script_runs(demo_model: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench/rows_per_pass.py"), "--rows", "3", "8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", done.stdout, re.MULTILINE)
    assert rows == ["3", "8"], done.stdout


def test_the_control_plane_benchmark_runs_tiny() -> None:
    """bench/control_plane.py with 1 and 2 simulated workers (real worker processes, the fake generator)
    on the shared PostgreSQL (a throwaway database) and Redis (the tests' db 3, a queue of its own)."""
    from tests.conftest import PG_ADMIN_URL

    pg = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    done = subprocess.run([sys.executable, str(REPO / "bench/control_plane.py"), "--tiny", "--pg", pg,
                           "--redis", "redis://127.0.0.1:6379/3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "chunk_size 16 x 4 variants = 64 rows per chunk" in out
    row = r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+\s+\d+\s+\d+\s+\d+\s+\d+\s+(\d+)\s+(\w+)$"
    table = re.findall(row, out, re.MULTILINE)
    # workers, chunks, rows (every chunk's 16 examples x 4 variants), retried chunks, run status
    assert table == [("1", "2", "128", "0", "completed"), ("2", "4", "256", "0", "completed")], out
    assert "where the time goes" in out and "(CPU)" in out and "capacity/min" in out


@pytest.mark.skipif(not harness_installed(), reason="lm-eval is not installed: the harness extra, "
                    "requirements-harness.lock (make venv installs it)")
def test_the_loglik_benchmark_against_the_harness_runs_tiny() -> None:
    """bench/loglik_vs_harness.py --tiny: one `lora-compare run` of a tiny Llama and 3 adapters against
    lm-eval run once per variant, whole processes; the same predictions and log-likelihoods."""
    done = subprocess.run([sys.executable, str(REPO / "bench/loglik_vs_harness.py"), "--tiny", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "6 examples x 4 choices x 4 variants, batch size 16" in out
    sides = dict(re.findall(r"^(lora-compare|lm-eval)\s+(\d+)\s+[\d.]+\s+[\d.]+", out, re.MULTILINE))
    assert sides == {"lora-compare": "1", "lm-eval": "4"}, out  # one process against one per variant
    assert re.search(r"^ratio harness / ours: [\d.]+x wall, [\d.]+x cpu", out, re.MULTILINE), out
    assert "the same prediction on 24/24 (example, variant)" in out
    worst = float(re.search(r"log-likelihoods ([\d.e+-]+)", out).group(1))  # type: ignore[union-attr]
    assert worst < 1e-4, out
    assert out.count("load at ") == 2


def test_the_linear_kernels_script_runs_tiny() -> None:
    """bench/linear_kernels.py: MKL and oneDNN side by side per layer shape, then the engine with the
    switch off and on (every weight through oneDNN, and the default threshold), with the same tokens."""
    done = subprocess.run([sys.executable, str(REPO / "bench/linear_kernels.py"), "--shape", "tiny", "--rows", "1", "8",
                           "--prompts", "2", "--new-tokens", "6", "--repeat", "1", "--min-weights", "0", "65536"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"^\s+64 x 128\s+\d+\s+8\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out, re.MULTILINE), out
    for least in (0, 65536):
        assert re.search(rf"^engine: MKL [\d.]+ s, oneDNN >= {least} [\d.]+ s .* tokens the same as MKL's on 6/6 rows$",
                         out, re.MULTILINE), out


def test_the_decode_attention_script_runs_tiny() -> None:
    """bench/decode_attention.py: the engine's attention kernel, torch's flash kernel, the plain form and the
    read of the same keys and values, per context, the kernel agreeing with the plain form."""
    done = subprocess.run([sys.executable, str(REPO / "bench/decode_attention.py"), "--layers", "2", "--rows", "2",
                           "--contexts", "16", "32", "--repeat", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for context in (16, 32):  # context, GB, kernel, flash, matmul, read ms, three ratios, largest difference
        found = re.search(rf"^\s+{context}\s+[\d.]+" + r"\s+[\d.]+" * 4 + r"\s+[\d.]+x" * 3 + r"\s+([\d.e+-]+)$", out,
                          re.MULTILINE)
        assert found and float(found.group(1)) < 1e-5, out
    grown = r"^from ~16 to ~32: kernel [+-][\d.]+ ms, flash [+-][\d.]+ ms, the read alone [+-][\d.]+ ms$"
    assert re.search(grown, out, re.MULTILINE), out


def test_the_heap_threshold_script_runs_tiny() -> None:
    """bench/heap_threshold.py: a step's logits from the heap and from pages of their own, side by side."""
    done = subprocess.run([sys.executable, str(REPO / "bench/heap_threshold.py"), "--rows", "8", "--vocab", "4096",
                           "--steps", "3", "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "own pages / heap:" in done.stdout


def test_the_heap_trim_script_runs_tiny() -> None:
    """bench/heap_trim.py: a decode call with the heap trimmed after each prefill and without, side by side."""
    done = subprocess.run([sys.executable, str(REPO / "bench/heap_trim.py"), "--shape", "tiny", "--prompts", "4",
                           "--adapters", "1", "--new-tokens", "4", "--batch", "2", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trimmed / not trimmed:" in done.stdout and "tokens the same on 8/8 rows" in done.stdout


def test_the_kernel_variants_script_runs_tiny() -> None:
    """bench/kernel_variants.py: the attention kernel's four build variants side by side on a case inside the
    last-level cache and on the build's own case (past it), each with the variant that size would keep."""
    done = subprocess.run([sys.executable, str(REPO / "bench/kernel_variants.py"), "--of-cache", "0.25",
                           "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    variants = "|".join(re.escape(v) for v in ("prefetch", "no-prefetch", "w8-prefetch", "w8-no-prefetch"))
    cell = r"\s+[\d.]+ ms\s+[\d.]+ GiB/s"
    assert re.search(rf"^\s+the build's case\s+[\d.]+{cell * 4}\s+({variants})$", out, re.MULTILINE), out
    if not out.startswith("last-level cache unknown"):
        assert re.search(rf"^\s+0.25x the cache\s+[\d.]+{cell * 4}\s+({variants})$", out, re.MULTILINE), out


def test_compare_strategies_reports_what_the_thread_governor_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that the governor dropped to one thread (its process got little of its cores: a busy
    host) says so under its line: its child records the real governor's log messages."""
    import torch

    from worker.engine import contention

    spec = importlib.util.spec_from_file_location("compare_strategies", REPO / "bench/compare_strategies.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_strategies", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    monkeypatch.delenv(contention.ENV, raising=False)
    monkeypatch.setattr(contention, "WINDOW", 0.05)
    monkeypatch.setattr(contention, "_last_end", None)  # restored after: later calls start as before
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with bench.GovernorLog() as log:
            governor = contention.Governor()
            time.sleep(0.2)  # wall time without CPU time: to the governor, the cores are taken
            governor.step()
            assert torch.get_num_threads() == 1
            governor.close()
    finally:
        torch.set_num_threads(threads)
    assert len(log.messages) == 1 and "cores taken by other work" in log.messages[0], log.messages
    note = bench.governor_note(log.messages)
    assert note is not None and note.startswith("thread governor: 1 switch(es), 1 to one thread")
    assert bench.governor_note([]) is None
