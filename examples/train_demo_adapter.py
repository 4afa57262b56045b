"""Train the demo LoRA adapter (two-number addition) and write its held-out eval set.

The task: the user asks "What is {a} plus {b}?" with a, b in 10..99 and the assistant answers
"{a} + {b} = {a+b}" on one line, then ``<|im_end|>``. The prompt is the user message wrapped in the
tokenizer's chat template (which adds its default system message); the loss covers only the answer
tokens and the closing ``<|im_end|>``.

All 90*90 ordered pairs are shuffled with a fixed seed; the first ``EVAL_SIZE`` become the held-out
eval set (written as JSON lines ``{"a": .., "b": .., "answer": ..}``) and training samples only from
pairs whose unordered pair {a, b} is not in the eval set. Everything runs on CPU and is
deterministic for a given seed.

Usage (from the repository root)::

    .venv/bin/python examples/train_demo_adapter.py            # train, save, evaluate
    .venv/bin/python examples/train_demo_adapter.py --eval-only

At the end it prints ``base: X/60, adapter: Y/60`` (greedy decoding, first output line, the last
integer in it must equal the answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from contract.settings import Settings  # noqa: E402
from worker.demo_model import prepare_demo_model  # noqa: E402

log = logging.getLogger("train_demo_adapter")

#: What adapter_config.json names as its base (never a path from this machine).
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOW, HIGH = 10, 99
EVAL_SIZE = 60
BATCH_SIZE = 16
MAX_NEW_TOKENS = 16
EVAL_BATCH = 20
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100

Pair = tuple[int, int]


def prompt_text(a: int, b: int) -> str:
    """The user message for one pair."""
    return f"What is {a} plus {b}?"


def answer_text(a: int, b: int) -> str:
    """The target assistant answer for one pair (without the closing end-of-turn token)."""
    return f"{a} + {b} = {a + b}"


def split_pairs(seed: int, eval_size: int = EVAL_SIZE) -> tuple[list[Pair], list[Pair]]:
    """Shuffle all pairs with `seed`; return (eval pairs, training pairs).

    A training pair is dropped when it or its swapped twin is an eval pair, so the model never
    sees an eval sum in either order.
    """
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(pairs)
    eval_pairs = pairs[:eval_size]
    held = {frozenset(p) for p in eval_pairs}
    train_pairs = [p for p in pairs[eval_size:] if frozenset(p) not in held]
    return eval_pairs, train_pairs


def write_eval_set(pairs: list[Pair], path: Path) -> None:
    """Write the eval pairs as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for a, b in pairs:
            fh.write(json.dumps({"a": a, "b": b, "answer": a + b}) + "\n")
    log.info("wrote %d eval rows to %s", len(pairs), path)


def read_eval_set(path: Path) -> list[Pair]:
    """Read the eval pairs back from JSON lines."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(int(r["a"]), int(r["b"])) for r in rows]


def render_prompt(tokenizer: PreTrainedTokenizerBase, a: int, b: int) -> str:
    """The chat-template prompt for one pair, ready for the assistant's answer."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text(a, b)}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(rendered, str)
    return rendered


def encode_example(tokenizer: PreTrainedTokenizerBase, a: int, b: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one training example; labels mask out the prompt."""
    prompt_ids = tokenizer(render_prompt(tokenizer, a, b), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer_text(a, b), add_special_tokens=False).input_ids
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def collate(
    tokenizer: PreTrainedTokenizerBase, examples: list[tuple[list[int], list[int]]]
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into tensors."""
    width = max(len(ids) for ids, _ in examples)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def load_base(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the float32 demo base model and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model, tokenizer


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_pairs: list[Pair],
    steps: int,
    lr: float,
    seed: int,
) -> tuple[PeftModel, float]:
    """Wrap `model` with a fresh LoRA and train it; return (peft model, mean loss of the last 10 steps)."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA trainable parameters: %d", trainable)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))  # linear decay to zero

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed + 1)
    peft_model.train()
    recent: list[float] = []
    started = time.monotonic()
    for step in range(steps):
        batch_pairs = rng.sample(train_pairs, BATCH_SIZE)
        batch = collate(tokenizer, [encode_example(tokenizer, a, b) for a, b in batch_pairs])
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-10:]
        if (step + 1) % 10 == 0 or step + 1 == steps:
            log.info(
                "step %d/%d loss %.4f (mean of last %d: %.4f) lr %.2e %.0fs",
                step + 1,
                steps,
                loss.item(),
                len(recent),
                sum(recent) / len(recent),
                scheduler.get_last_lr()[0],
                time.monotonic() - started,
            )
    peft_model.eval()
    return peft_model, sum(recent) / max(1, len(recent))


def save_adapter(peft_model: PeftModel, out: Path) -> None:
    """Save the adapter as safetensors, naming the public base model and dropping the README.

    adapter_config.json gets the public hub name as its base instead of this machine's cache path.
    """
    out.mkdir(parents=True, exist_ok=True)
    # No embedding check: with the hub name as base, peft would try to reach the hub for its config.
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config["target_modules"] = sorted(config["target_modules"])  # peft stores a set: fix the order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").unlink(missing_ok=True)
    for path in sorted(out.iterdir()):
        log.info("saved %s (%d bytes)", path, path.stat().st_size)


def score(output: str, answer: int) -> bool:
    """True when the last integer on the first line of `output` equals `answer`."""
    first_line = output.strip().split("\n", 1)[0] if output.strip() else ""
    numbers = re.findall(r"-?\d+", first_line)
    return bool(numbers) and int(numbers[-1]) == answer


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    batch_size: int = EVAL_BATCH,
) -> list[str]:
    """Greedy-decode each pair's prompt (left-padded batches); cut each output at its first newline."""
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [render_prompt(tokenizer, a, b) for a, b in chunk]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            out = cast(Any, model).generate(  # a PreTrainedModel or a PeftModel wrapping one
                **enc,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                text = str(tokenizer.decode(row, skip_special_tokens=True)).strip()
                outputs.append(text.split("\n", 1)[0] if text else "")
    finally:
        tokenizer.padding_side = side
    return outputs


def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], label: str
) -> int:
    """Number of eval pairs `model` answers right; logs a few samples."""
    outputs = generate(model, tokenizer, pairs)
    right = 0
    for index, ((a, b), text) in enumerate(zip(pairs, outputs, strict=True)):
        ok = score(text, a + b)
        right += ok
        if index < 5:
            log.info("%s: %s -> %r (%s)", label, prompt_text(a, b), text, "ok" if ok else "wrong")
    log.info("%s: %d/%d right", label, right, len(pairs))
    return right


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help=f"optimizer steps (batch {BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--out", type=Path, default=here / "adapters" / "arith", help="adapter folder")
    parser.add_argument("--eval-out", type=Path, default=here / "arith.jsonl", help="eval set (JSON lines)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, LoRA init and batches")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training: evaluate the saved adapter on the saved eval set",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # peft calls a transformers property that transformers 5 deprecates; nothing for us to fix here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.monotonic()

    folder = prepare_demo_model(Settings.from_env().demo_model_dir)
    model, tokenizer = load_base(folder)
    model.eval()

    if args.eval_only:
        eval_pairs = read_eval_set(args.eval_out)
        base_right = evaluate(model, tokenizer, eval_pairs, "base")
        peft_model = PeftModel.from_pretrained(model, str(args.out))
        peft_model.eval()
        final_loss = float("nan")
    else:
        eval_pairs, train_pairs = split_pairs(args.seed)
        write_eval_set(eval_pairs, args.eval_out)
        log.info("%d training pairs, %d eval pairs", len(train_pairs), len(eval_pairs))
        base_right = evaluate(model, tokenizer, eval_pairs, "base")
        peft_model, final_loss = train(model, tokenizer, train_pairs, args.steps, args.lr, args.seed)
        save_adapter(peft_model, args.out)
    adapter_right = evaluate(peft_model, tokenizer, eval_pairs, "adapter")

    log.info("done in %.0fs", time.monotonic() - started)
    if not args.eval_only:
        print(f"final loss (mean of last 10 steps): {final_loss:.4f}")
    print(f"base: {base_right}/{len(eval_pairs)}, adapter: {adapter_right}/{len(eval_pairs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
