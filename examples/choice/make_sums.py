"""Write sums.jsonl: multiple-choice two-digit sums for the `task: choice` example.

The 60 pairs are the demo's held-out sums (producer/demo/arith.jsonl: none of them, in either order,
was seen when the demo adapter was trained). Each row asks "What is {a} plus {b}?" and offers four
numbers as strings: the sum and three near misses (off by one or by ten, none below zero, all
distinct); the gold answer's position cycles through 0..3 in a shuffled order, so each position holds
it 15 times. `label` is its 0-based index. Deterministic: the same file for the same seed.

Usage (from the repository root): python examples/choice/make_sums.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = HERE.parent.parent / "producer" / "demo" / "arith.jsonl"
OFFSETS = (-11, -10, -9, -1, 1, 9, 10, 11)


def rows(seed: int) -> list[dict[str, object]]:
    """One row per held-out pair, in the demo's order."""
    rng = random.Random(seed)
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    positions = [i % 4 for i in range(len(pairs))]
    rng.shuffle(positions)
    out: list[dict[str, object]] = []
    for pair, gold_at in zip(pairs, positions):
        a, b = pair["a"], pair["b"]
        total = a + b
        wrong = rng.sample([total + d for d in OFFSETS if total + d >= 0], 3)
        options = [str(n) for n in wrong]
        options.insert(gold_at, str(total))
        out.append({"a": a, "b": b, "question": f"What is {a} plus {b}?", "options": options, "label": gold_at})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=HERE / "sums.jsonl")
    args = parser.parse_args()
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows(args.seed)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
