"""How a forward pass's cost grows with the rows in it, on this machine: the evidence behind the
decode engine's capacity, refill and output-projection choices (bench/README.md).

For the demo model (float32 on CPU), prints side by side, per row count: one decode pass of the
whole model (a 40-token cache, best of several), and the output projection alone (the 49152 x 576
LM head), run as is and on the row count padded to a multiple of 8 as `worker.engine.cpu_head` does on CPU.

    .venv/bin/python bench/rows_per_pass.py                 # about a minute on 2 cores
    .venv/bin/python bench/rows_per_pass.py --rows 8 13 16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_ms(fn: Callable[..., Any], *args: Any, repeat: int = 3, number: int = 10) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn(*args)
        best = min(best, (time.perf_counter() - started) / number)
    return best * 1e3


def one_pass(model: Any, token: Any, cache: Any) -> None:
    model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.crop(-1)  # back to the same cache length every time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 12, 13, 14, 16, 24, 32])
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from contract.settings import Settings
    from worker.demo_model import prepare_demo_model
    from worker.engine.cpu_head import PAD_ROWS, padded_rows_forward

    model = AutoModelForCausalLM.from_pretrained(prepare_demo_model(Settings.from_env().demo_model_dir),
                                                 dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    print(f"demo model, float32, {torch.get_num_threads()} threads; milliseconds, best of 3")
    print(f"{'rows':>4}  {'pass':>7}  {'per row':>7}  {'head':>7}  {'head, rows padded to 8k':>23}")
    PAD_ROWS.set(True)  # as inside `decode_rows` on CPU
    with torch.inference_mode():
        for rows in args.rows:
            cache = DynamicCache()
            model(input_ids=torch.randint(100, 1000, (rows, 40)), past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
            token = torch.randint(100, 1000, (rows, 1))
            hidden = torch.randn(rows, 1, head.in_features)
            passed = best_ms(one_pass, model, token, cache, number=5)
            plain = best_ms(torch.nn.functional.linear, hidden, head.weight)
            padded = best_ms(padded_rows_forward, head, hidden)
            print(f"{rows:>4}  {passed:>7.1f}  {passed / rows:>7.2f}  {plain:>7.1f}  {padded:>23.1f}")


if __name__ == "__main__":
    main()
