"""Base vs K adapters, three ways, on the same prompts and settings, side by side in one run.

(a) old:       the base model plus a merged copy per adapter (`merge_and_unload`), each over the whole set,
               prompts formatted for every pass;
(b) reference: one PeftModel, prompts formatted once per chunk, a base pass with the adapter disabled,
               then one pass per adapter (the optimised reference script);
(c) ours:      lora-compare's own chunk path (`worker.chunk.run_chunk`): base and adapter rows in shared
               batches on one copy of the weights.

Each strategy runs in its own process (so its peak memory is its own) and prints wall time, rows/s,
generated tokens/s, peak memory (RSS on CPU, peak allocated on GPU) and agreement with (b); then the
ratios against (b).

    .venv/bin/python bench/compare_strategies.py                      # demo model, 64 prompts, 1 and 3 adapters
    .venv/bin/python bench/compare_strategies.py --prompts 8 --new-tokens 8 --adapters 1
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STRATEGIES = ("a", "b", "c")


def prompts(n: int) -> list[str]:
    pairs = [(10 + (7 * i) % 90, 10 + (13 * i + 5) % 90) for i in range(n)]
    return [f"What is {a} plus {b}?" for a, b in pairs]


def make_adapters(base: Path, out: Path, k: int) -> list[Path]:
    """The demo adapter first, then seeded random adapters of other ranks and targets."""
    from tests.adapters import make_adapter

    found = [REPO / "examples/adapters/arith"]
    shapes = [(4, ["q_proj", "v_proj"]), (16, ["gate_proj", "up_proj", "down_proj"]), (8, ["o_proj", "k_proj"])]
    for i in range(k - 1):
        rank, targets = shapes[i % len(shapes)]
        found.append(make_adapter(base, out / f"random{i}", rank=rank, targets=targets, seed=100 + i))
    return found[:k]


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _generate(model: Any, tokenizer: Any, texts: list[str], batch: int, new_tokens: int,
              device: str) -> list[list[int]]:
    import torch

    outs: list[list[int]] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
        outs += out[:, enc["input_ids"].shape[1]:].tolist()
    return outs


def _format(tokenizer: Any, prompt: str) -> str:
    return str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False))


def run_strategy(name: str, base: Path, adapters: list[Path], texts: list[str], *, batch: int, new_tokens: int,
                 chunk: int, device: str) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.generation import finish

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.padding_side = "left"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(device).eval()
    eos = {tokenizer.eos_token_id}
    outputs: dict[str, list[str]] = {}
    tokens = 0
    started = time.perf_counter()
    if name == "a":
        for variant, path in [("base", None), *[(f"ad{i}", p) for i, p in enumerate(adapters)]]:
            if path is None:
                current = model
            else:  # the old way: a second, merged copy of the weights per adapter
                current = PeftModel.from_pretrained(copy.deepcopy(model), str(path)).merge_and_unload().eval()
            formatted = [_format(tokenizer, t) for t in texts]  # formatted again for every pass
            gen = _generate(current, tokenizer, formatted, batch, new_tokens, device)
            outputs[variant] = [finish(tokenizer, g, eos_ids=eos, stop=()).text for g in gen]
            tokens += sum(finish(tokenizer, g, eos_ids=eos, stop=()).output_tokens for g in gen)
            del current
    elif name == "b":
        peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="ad0")
        for i, path in enumerate(adapters[1:], start=1):
            peft.load_adapter(str(path), adapter_name=f"ad{i}")
        peft.eval()
        for variant in ["base", *[f"ad{i}" for i in range(len(adapters))]]:
            outputs[variant] = []
        for start in range(0, len(texts), chunk):
            formatted = [_format(tokenizer, t) for t in texts[start:start + chunk]]  # once per chunk
            with peft.disable_adapter():
                gen = _generate(peft, tokenizer, formatted, batch, new_tokens, device)
            results = {"base": gen}
            for i in range(len(adapters)):
                peft.set_adapter(f"ad{i}")
                results[f"ad{i}"] = _generate(peft, tokenizer, formatted, batch, new_tokens, device)
            for variant, gens in results.items():
                done = [finish(tokenizer, g, eos_ids=eos, stop=()) for g in gens]
                outputs[variant] += [d.text for d in done]
                tokens += sum(d.output_tokens for d in done)
    else:
        from producer.config import DatasetConfig, GenerationConfig, InferenceConfig, ModelConfig, RunConfig
        from producer.settings import Settings
        from worker.chunk import ChunkExample, VariantSpec, run_chunk
        from worker.model_host import ModelHost

        del model
        host = ModelHost(Settings.from_env(), device=device)
        config = RunConfig(
            name="bench",
            model=ModelConfig(base=str(base), adapters=tuple((f"ad{i}", str(p)) for i, p in enumerate(adapters)),
                              dtype="float32" if device == "cpu" else "bfloat16"),
            dataset=DatasetConfig(path="-", prompt="-"),
            generation=GenerationConfig(max_new_tokens=new_tokens),
            inference=InferenceConfig(batch_size=batch, chunk_size=chunk),
        )
        host.ensure_base(config.model.base, dtype=config.model.dtype)
        started = time.perf_counter()  # like (a) and (b): the base model is loaded before the clock starts
        variants = [VariantSpec("base", None), *[VariantSpec(n, p) for n, p in config.model.adapters]]
        for variant in variants:
            outputs[variant.name] = []
        for start in range(0, len(texts), chunk):
            examples = [ChunkExample(start + i, t, None) for i, t in enumerate(texts[start:start + chunk])]
            outcome = run_chunk(host, config, examples, variants)
            for record in outcome.records:
                outputs[record.variant].append(record.output)
                tokens += record.output_tokens
    wall = time.perf_counter() - started
    rows = sum(len(v) for v in outputs.values())
    return {"strategy": name, "wall_s": wall, "rows": rows, "rows_per_s": rows / wall, "tokens_per_s": tokens / wall,
            "peak_bytes": _peak_bytes(device), "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("STRATEGY", "SPEC"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.one:
        spec = json.loads(Path(args.one[1]).read_text())
        result = run_strategy(args.one[0], Path(spec["base"]), [Path(p) for p in spec["adapters"]], spec["texts"],
                              batch=args.batch, new_tokens=args.new_tokens, chunk=args.chunk, device=args.device)
        print(json.dumps(result))
        return

    from producer.settings import Settings
    from worker.demo_model import prepare_demo_model

    base = prepare_demo_model(Settings.from_env().demo_model_dir)
    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        all_adapters = make_adapters(base, Path(tmp), max(args.adapters))
        print(f"device {args.device}, demo model, {args.prompts} prompts, batch {args.batch}, "
              f"{args.new_tokens} new tokens, greedy")
        for k in args.adapters:
            spec = Path(tmp) / f"spec{k}.json"
            spec.write_text(json.dumps({"base": str(base), "adapters": [str(p) for p in all_adapters[:k]],
                                        "texts": texts}))
            results = {}
            for name in STRATEGIES:
                cmd = [sys.executable, __file__, "--one", name, str(spec), "--batch", str(args.batch), "--new-tokens",
                       str(args.new_tokens), "--chunk", str(args.chunk), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[name] = json.loads(out.strip().splitlines()[-1])
            reference = results["b"]["outputs"]
            print(f"\n{k} adapter(s): {args.prompts} x {k + 1} = {args.prompts * (k + 1)} rows")
            print(f"{'strategy':<12}{'wall s':>9}{'rows/s':>9}{'tok/s':>9}{'peak MiB':>10}{'agree (b)':>11}"
                  f"{'speed vs b':>12}{'mem vs b':>10}")
            for name, r in results.items():
                same = sum(x == y for v in reference for x, y in zip(r["outputs"][v], reference[v]))
                total = sum(len(v) for v in reference.values())
                print(f"{name:<12}{r['wall_s']:>9.2f}{r['rows_per_s']:>9.2f}{r['tokens_per_s']:>9.1f}"
                      f"{r['peak_bytes'] / 2**20:>10.0f}{same / total:>11.1%}"
                      f"{results['b']['wall_s'] / r['wall_s']:>11.2f}x"
                      f"{r['peak_bytes'] / results['b']['peak_bytes']:>9.2f}x")


if __name__ == "__main__":
    main()
