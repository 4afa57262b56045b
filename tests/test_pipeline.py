"""Embedded mode end to end on the real demo model, checked against plain transformers + peft."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from producer.cli import cli
from tests.conftest import ARITH_ROWS, write_arith_dataset

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24

CONFIG = """
name: equivalence
model:
  base: demo
  adapters:
    attn: {attn}
    mlp: {mlp}
  dtype: float32
dataset:
  path: data.jsonl
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: {max_new_tokens}
inference:
  batch_size: {batch_size}
  chunk_size: 3
  use_peft_directly: {direct}
scoring:
  match: numeric
"""


def _run(tmp_path: Path, adapters: dict[str, Path], *, direct: bool, batch_size: int = 6) -> tuple[Path, int]:
    write_arith_dataset(tmp_path / "data.jsonl")
    config = tmp_path / f"cfg-{direct}.yaml"
    config.write_text(CONFIG.format(attn=adapters["attn"], mlp=adapters["mlp"], max_new_tokens=MAX_NEW_TOKENS,
                                    batch_size=batch_size, direct=str(direct).lower()))
    db = tmp_path / "results.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "run", "--device", "cpu", "-q",
                                      str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_id = int(result.output.strip().splitlines()[-1])
    return db, run_id


def _outputs(db: Path, run_id: int) -> dict[tuple[int, str], str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT example_idx, variant, output FROM outputs WHERE run_id = ?", (run_id,)).fetchall()
    return {(idx, variant): output for idx, variant, output in rows}


@pytest.fixture(scope="module")
def references(demo_model: Path, test_adapters: dict[str, Path]) -> dict[str, Any]:
    """Each prompt alone (batch 1, greedy, float32): plain transformers for base, peft for each adapter,
    and `disable_adapter()` on the PeftModel for base again."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    model = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32).eval()

    def generate(m: Any, a: int, b: int) -> str:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} plus {b}?"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = m.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
        return str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))

    refs: dict[str, Any] = {"plain": {}, "disabled": {}}
    for idx, (a, b) in enumerate(ARITH_ROWS):
        refs["plain"][(idx, "base")] = generate(model, a, b)
    peft_model = PeftModel.from_pretrained(model, str(test_adapters["attn"]), adapter_name="attn")
    peft_model.load_adapter(str(test_adapters["mlp"]), adapter_name="mlp")
    peft_model.eval()
    for name in ("attn", "mlp"):
        peft_model.set_adapter(name)
        for idx, (a, b) in enumerate(ARITH_ROWS):
            refs["plain"][(idx, name)] = generate(peft_model, a, b)
    with peft_model.disable_adapter():
        for idx, (a, b) in enumerate(ARITH_ROWS):
            refs["disabled"][(idx, "base")] = generate(peft_model, a, b)
    return refs


def _agreement(got: dict[tuple[int, str], str], want: dict[tuple[int, str], str]) -> float:
    assert set(got) == set(want)
    return sum(got[k] == want[k] for k in want) / len(want)


def test_adapters_really_change_outputs(references: dict[str, Any]) -> None:
    plain = references["plain"]
    for name in ("attn", "mlp"):
        changed = sum(plain[(i, name)] != plain[(i, "base")] for i in range(len(ARITH_ROWS)))
        assert changed >= len(ARITH_ROWS) // 2, name  # otherwise the equivalence below proves little


def test_mixed_batches_equal_single_prompt_generation(tmp_path: Path, test_adapters: dict[str, Path],
                                                      references: dict[str, Any]) -> None:
    db, run_id = _run(tmp_path, test_adapters, direct=True)
    got = _outputs(db, run_id)
    assert len(got) == len(ARITH_ROWS) * 3
    agreement = _agreement(got, references["plain"])
    print(f"mixed-batch agreement with batch-1 transformers/peft: {agreement:.1%}")
    assert agreement >= 0.95
    base_rows = {k: v for k, v in got.items() if k[1] == "base"}
    assert _agreement(base_rows, references["disabled"]) >= 0.95


def test_merged_passes_equal_single_prompt_generation(tmp_path: Path, test_adapters: dict[str, Path],
                                                      references: dict[str, Any]) -> None:
    db, run_id = _run(tmp_path, test_adapters, direct=False, batch_size=4)
    got = _outputs(db, run_id)
    agreement = _agreement(got, references["plain"])
    print(f"merged-pass agreement with batch-1 transformers/peft: {agreement:.1%}")
    assert agreement >= 0.95


def test_results_are_queryable_with_sqlite3_and_the_cli(tmp_path: Path, test_adapters: dict[str, Path]) -> None:
    db, run_id = _run(tmp_path, test_adapters, direct=True, batch_size=24)
    n = len(ARITH_ROWS)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone() == ("completed",)
        assert conn.execute("SELECT count(*) FROM outputs WHERE run_id = ?", (run_id,)).fetchone() == (3 * n,)
        assert conn.execute("SELECT count(*) FROM comparisons WHERE run_id = ?", (run_id,)).fetchone() == (2 * n,)
        rows = conn.execute("SELECT example_idx, variant, reference, prediction, correct, finish_reason, "
                            "output_tokens FROM outputs ORDER BY example_idx, variant").fetchall()
        for idx, _variant, reference, prediction, correct, finish_reason, tokens in rows:
            assert reference == str(sum(ARITH_ROWS[idx]))
            assert correct == (prediction == reference)
            assert finish_reason in ("eos", "length") and 0 < tokens <= MAX_NEW_TOKENS
        hashes = conn.execute("SELECT DISTINCT variant, adapter_hash FROM generations").fetchall()
        assert {v for v, h in hashes if h} == {"attn", "mlp"} and all(h is None for v, h in hashes if v == "base")
    runner = CliRunner()
    url = ["--database-url", f"sqlite:///{db}"]
    result = runner.invoke(cli, [*url, "sql", "--format", "json", "SELECT variant, count(*) AS n FROM outputs "
                                 "GROUP BY variant ORDER BY variant"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"variant": "attn", "n": n}, {"variant": "base", "n": n},
                                         {"variant": "mlp", "n": n}]
    result = runner.invoke(cli, [*url, "sql", "--format", "csv", "SELECT id, status FROM runs"])
    assert result.output.splitlines() == ["id,status", f"{run_id},completed"]
    result = runner.invoke(cli, [*url, "results", str(run_id), "--format", "jsonl", "--variant", "mlp"])
    records = [json.loads(line) for line in result.output.splitlines()]
    assert len(records) == n and set(records[0]["variants"]) == {"base", "mlp"}
    result = runner.invoke(cli, [*url, "status", str(run_id), "--format", "json"])
    status = json.loads(result.output)
    assert status["status"] == "completed" and status["rows_done"] == status["rows_total"] == 3 * n
    result = runner.invoke(cli, [*url, "results", str(run_id), "--only-diff", "--format", "json"])
    assert all(any(r["variants"][v]["output"] != r["variants"]["base"]["output"] for v in ("attn", "mlp"))
               for r in json.loads(result.output))


def test_a_new_adapter_on_an_evaluated_dataset_reuses_every_base_row(tmp_path: Path,
                                                                    test_adapters: dict[str, Path]) -> None:
    import time

    write_arith_dataset(tmp_path / "data.jsonl")
    db = tmp_path / "results.db"
    runner = CliRunner()
    timings, ids = [], []
    for name in ("attn", "mlp"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"""
model: {{base: demo, adapters: {{{name}: {test_adapters[name]}}}, dtype: float32}}
dataset: {{path: data.jsonl, prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?", reference: "{{{{ answer }}}}"}}
generation: {{max_new_tokens: {MAX_NEW_TOKENS}}}
scoring: {{match: numeric}}
""")
        started = time.perf_counter()
        result = runner.invoke(cli, ["--database-url", f"sqlite:///{db}", "run", "-q", "--device", "cpu", str(config)])
        timings.append(time.perf_counter() - started)
        assert result.exit_code == 0, result.output
        ids.append(int(result.output.strip().splitlines()[-1]))
    print(f"first run {timings[0]:.1f} s, second run (base rows from the cache) {timings[1]:.1f} s")
    with sqlite3.connect(db) as conn:
        first_base = dict(conn.execute("SELECT example_idx, output FROM generations WHERE run_id = ? AND "
                                       "variant = 'base'", (ids[0],)).fetchall())
        second = conn.execute("SELECT example_idx, variant, output, reused_from FROM generations WHERE run_id = ?",
                              (ids[1],)).fetchall()
    base_rows = [r for r in second if r[1] == "base"]
    assert len(base_rows) == len(ARITH_ROWS) and all(r[3] is not None for r in base_rows)
    assert {r[0]: r[2] for r in base_rows} == first_base
    assert all(r[3] is None for r in second if r[1] == "mlp")  # a new adapter is generated
    status = json.loads(runner.invoke(cli, ["--database-url", f"sqlite:///{db}", "status", str(ids[1]),
                                            "--format", "json"]).output)
    assert status["rows_reused"] == len(ARITH_ROWS)
