"""`lora-compare verify`: plain PEFT, one prompt at a time, reproduces a float32 run in full; a row that
differs is found at its first differing token with the logit gap there; what cannot be reproduced is
refused in one line; `report` shows the figure.

The fast tests use the tiny random-weight Llama of `tiny_models` (its own BPE tokenizer and chat
template) and two of its random LoRA adapters, one named with a dot, which PEFT cannot take as an
adapter name. The slow test runs the real demo model in bfloat16 and in float32.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from producer.cli import cli
from tests.conftest import write_arith_dataset
from tests.tiny_models import ADAPTERS, VOCAB, make_adapter, make_model

ROWS = [(3, 4), (10, 20), (7, 8), (1, 1), (50, 45), (9, 9), (2, 30), (11, 12)]
CONFIG = """
model:
  base: {base}
  adapters:
    qv: {qv}
    mlp.v2: {mlp}
  dtype: float32
dataset:
  path: data.jsonl
  prompt: "what is {{{{ a }}}} plus {{{{ b }}}}"
  reference: "{{{{ answer }}}}"
  system_prompt: "add the two numbers"
generation:
  max_new_tokens: 8
  do_sample: {sample}
inference:
  batch_size: 3
  chunk_size: 4
"""


def _cli(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", *args])


def _ok(db: Path, *args: str) -> Result:
    result = _cli(db, *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model, two adapters, and a finished float32 run of 8 examples on the CPU."""
    root = tmp_path_factory.mktemp("verify")
    base = make_model("llama", root / "base")
    qv = make_adapter(base, "llama", ADAPTERS["r1"], root / "qv", seed=1)  # rank 1 on attention
    mlp = make_adapter(base, "llama", ADAPTERS["r64_rslora"], root / "mlp", seed=2)  # rank 64 on the MLP
    write_arith_dataset(root / "data.jsonl", ROWS)
    for sample in ("false", "true"):
        (root / f"sample-{sample}.yaml").write_text(CONFIG.format(base=base, qv=qv, mlp=mlp, sample=sample))
    db = root / "results.db"
    run_id = int(_ok(db, "run", "--device", "cpu", "-q", str(root / "sample-false.yaml")).stdout.splitlines()[-1])
    return {"root": root, "db": db, "run_id": run_id, "base": base, "adapters": {"qv": qv, "mlp.v2": mlp}}


@pytest.fixture
def db(tiny: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the run's database that the test may change."""
    copy = tmp_path / "results.db"
    source, target = sqlite3.connect(tiny["db"]), sqlite3.connect(copy)
    source.backup(target)  # with what is still in the write-ahead log
    source.close()
    target.close()
    return copy


def _sql(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(query, params).fetchall()
    conn.close()
    return rows


def _verify(db: Path, run_id: int, *args: str) -> dict[str, Any]:
    result = _ok(db, "verify", str(run_id), "--format", "json", *args)
    return json.loads(result.stdout)


def _ids(db: Path, idx: int, variant: str) -> list[int]:
    (value,), = _sql(db, "SELECT output_ids FROM generations WHERE example_idx = ? AND variant = ?", idx, variant)
    return json.loads(value)


# --- the fast tests -------------------------------------------------------------------------------


def test_the_reference_runs_where_most_examples_ran_and_compares_from_the_first_difference() -> None:
    from db.verifications import ChunkSetting
    from worker.verify import Recorded, first_difference, recorded_setting

    chunks = [ChunkSetting(0, "cuda:0", "bfloat16", 200), ChunkSetting(1, "cpu", "float32", 250),
              ChunkSetting(2, "cuda:1", "bfloat16", 200)]
    assert recorded_setting(chunks) == Recorded("cuda:0", "bfloat16", [0, 2])  # 400 examples on GPUs, 250 on cpu
    assert recorded_setting([ChunkSetting(0, None, None, 3)]) == Recorded(None, None, [0])
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_a_float32_run_is_reproduced_in_full_and_recorded(tiny: dict[str, Any], db: Path) -> None:
    run_id = tiny["run_id"]
    # Not vacuous: each adapter changes outputs, and rows end both at EOS and at the length.
    for adapter in ("qv", "mlp.v2"):
        assert any(_ids(db, i, adapter) != _ids(db, i, "base") for i in range(len(ROWS))), adapter
    reasons = {r for (r,) in _sql(db, "SELECT finish_reason FROM generations")}
    assert {"eos", "length"} <= reasons, reasons

    result = _ok(db, "verify", str(run_id))
    lines = result.stdout.splitlines()
    assert lines[0] == f"run {run_id}: 8 examples regenerated alone with plain PEFT on cpu, float32"
    for variant in ("base", "qv", "mlp.v2"):
        assert any(line.split() == [variant, "8", "8", "100%"] for line in lines), result.stdout
    assert "disagreements" not in result.stdout
    recorded = _sql(db, "SELECT variant, sampled, agreed, device, dtype, details FROM verifications ORDER BY id")
    assert recorded == [(v, 8, 8, "cpu", "float32", "[]") for v in ("base", "qv", "mlp.v2")]


def test_a_changed_row_is_found_at_its_first_differing_token_with_the_gap(tiny: dict[str, Any], db: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.prompts import encode_prompts

    run_id = tiny["run_id"]
    # qv: a row's second token replaced, so the run "chose" another token after the same first one.
    idx = next(i for i in range(len(ROWS)) if len(_ids(db, i, "qv")) >= 2)
    ids = _ids(db, idx, "qv")
    changed = (ids[1] + 7) % VOCAB
    _sql(db, "UPDATE generations SET output_ids = ? WHERE example_idx = ? AND variant = 'qv'",
         json.dumps([ids[0], changed, *ids[2:]]), idx)
    # base, example 5: no token ids stored, another text: compared by text, no gap.
    _sql(db, "UPDATE generations SET output_ids = NULL, output = 'not this' WHERE example_idx = 5 AND variant = 'base'")
    # mlp.v2, example 6: no token ids stored, the same text: agrees.
    _sql(db, "UPDATE generations SET output_ids = NULL WHERE example_idx = 6 AND variant = 'mlp.v2'")

    report = _verify(db, run_id)
    by_variant = {v["variant"]: v for v in report["variants"]}
    assert {v: (r["sampled"], r["agreed"]) for v, r in by_variant.items()} == {
        "base": (8, 7), "qv": (8, 7), "mlp.v2": (8, 8)}
    (token_diff,) = by_variant["qv"]["disagreements"]
    assert (token_diff["example_idx"], token_diff["position"]) == (idx, 1)
    assert (token_diff["plain_token"], token_diff["run_token"]) == (ids[1], changed)
    (text_diff,) = by_variant["base"]["disagreements"]
    assert text_diff["position"] is None and text_diff["gap"] is None and text_diff["run_text"] == "not this"

    # The gap is the reference's logit of its token minus that of the run's, after the same first token.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny["base"]))
    (prompt,), = _sql(db, "SELECT prompt FROM examples WHERE idx = ?", idx)
    (prompt_ids,) = encode_prompts(tokenizer, [prompt], system_prompt="add the two numbers", chat_template=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32),
                                      str(tiny["adapters"]["qv"])).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([[*prompt_ids, ids[0]]])).logits[0, -1]  # [vocab]
    assert token_diff["gap"] > 0
    assert token_diff["gap"] == pytest.approx(float(logits[ids[1]] - logits[changed]), abs=1e-4)

    table = _ok(db, "verify", str(run_id)).stdout.splitlines()
    header = ["variant", "example_idx", "token_position", "plain_token", "run_token", "gap"]
    assert header in [line.split() for line in table]
    row = next(line for line in table if line.startswith("qv ") and "(" in line)
    assert row.split()[:3] == ["qv", str(idx), "1"] and f"({ids[1]})" in row and f"({changed})" in row
    assert math.isclose(float(row.split()[-1]), token_diff["gap"], rel_tol=1e-3)
    details = json.loads(_sql(db, "SELECT details FROM verifications WHERE variant = 'qv' ORDER BY id DESC")[0][0])
    assert details == [token_diff]


def test_the_sample_is_seeded_and_the_same_for_every_variant(tiny: dict[str, Any], db: Path) -> None:
    first = _verify(db, tiny["run_id"], "--sample", "3")
    again = _verify(db, tiny["run_id"], "--sample", "3")
    other = _verify(db, tiny["run_id"], "--sample", "3", "--seed", "5")
    assert len(first["examples"]) == 3 and first["examples"] == again["examples"]
    assert other["examples"] != first["examples"]
    assert [v["sampled"] for v in first["variants"]] == [3, 3, 3]


def test_report_shows_the_latest_verification(tiny: dict[str, Any], db: Path, tmp_path: Path) -> None:
    run_id = tiny["run_id"]
    before = json.loads(_ok(db, "report", str(run_id), "--format", "json").stdout)
    assert all("verified" not in v for v in before["variants"])  # the public JSON is unchanged until then
    assert "verified" not in _ok(db, "report", str(run_id)).stdout

    _ok(db, "verify", str(run_id), "--sample", "2")  # 2/2 everywhere; then qv changes: the report shows the latest
    _sql(db, "UPDATE generations SET output = 'changed', output_ids = NULL WHERE example_idx = 0 AND variant = 'qv'")
    _ok(db, "verify", str(run_id))
    table = _ok(db, "report", str(run_id), "--html", str(tmp_path / "r.html")).stdout
    line = "verified against plain PEFT: base 8/8 (100%), qv 7/8 (87.5%), mlp.v2 8/8 (100%) on cpu, float32"
    assert line in table.splitlines()
    after = json.loads(_ok(db, "report", str(run_id), "--format", "json").stdout)
    assert {v["variant"]: v["verified"] for v in after["variants"]}["qv"] == {
        "sampled": 8, "agreed": 7, "agreement": 0.875, "device": "cpu", "dtype": "float32"}
    assert {k for k in after["variants"][0]} == {k for k in before["variants"][0]} | {"verified"}
    assert line in (tmp_path / "r.html").read_text()


def test_what_cannot_be_reproduced_is_refused_in_one_line(tiny: dict[str, Any], db: Path) -> None:
    import torch

    run_id = tiny["run_id"]
    _one_line_error(_cli(db, "verify", "99"), "no run with id 99")

    sampled = _ok(db, "run", "--device", "cpu", "-q", str(tiny["root"] / "sample-true.yaml"))
    _one_line_error(_cli(db, "verify", sampled.stdout.splitlines()[-1]), "do_sample: true", "cannot be reproduced")

    _sql(db, "UPDATE variants SET adapter_hash = 'x' WHERE run_id = ? AND name = 'qv'", run_id)
    _one_line_error(_cli(db, "verify", str(run_id)), "adapter 'qv'", "changed since run", "hashed x at submission")
    _sql(db, "UPDATE variants SET adapter_hash = (SELECT adapter_hash FROM generations WHERE run_id = ? AND "
         "variant = 'qv' LIMIT 1) WHERE run_id = ? AND name = 'qv'", run_id, run_id)

    if not torch.cuda.is_available():
        _sql(db, "UPDATE chunks SET device = 'cuda:0' WHERE run_id = ?", run_id)
        _one_line_error(_cli(db, "verify", str(run_id)), "generated on cuda:0", "no GPU", "--device cpu")
    assert _sql(db, "SELECT count(*) FROM verifications") == [(0,)]  # a refusal records nothing
    assert _verify(db, run_id, "--device", "cpu", "--sample", "2")["device"] == "cpu"


def test_verify_and_report_on_postgresql(tiny: dict[str, Any], pg_url: str) -> None:
    def invoke(*args: str) -> Result:
        result = CliRunner().invoke(cli, ["--database-url", pg_url, *args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    run_id = invoke("run", "--device", "cpu", "-q", str(tiny["root"] / "sample-false.yaml")).stdout.splitlines()[-1]
    verified = json.loads(invoke("verify", run_id, "--sample", "3", "--format", "json").stdout)
    assert [(v["sampled"], v["agreed"]) for v in verified["variants"]] == [(3, 3)] * 3
    report = json.loads(invoke("report", run_id, "--format", "json").stdout)
    assert [v["verified"]["agreed"] for v in report["variants"]] == [3, 3, 3]


# --- the real model, in bfloat16 and float32 ------------------------------------------------------


DEMO = """
name: verify-{dtype}
model:
  base: demo
  adapters:
    arith: {adapter}
  dtype: {dtype}
dataset:
  path: data.jsonl
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: 16
  stop: ["\\n"]
inference:
  batch_size: 8
scoring:
  match: numeric
"""
#: Demo rows (examples/arith.jsonl, 5 to 8) where, on a 2-core AMD EPYC, the base model's bfloat16 run
#: and plain PEFT part at a near-tie (gaps of 1/8 and 1/4); other CPUs round otherwise.
DEMO_ROWS = [(11, 62), (73, 18), (14, 56), (41, 17)]
#: Examples regenerated per variant in the slow test (bfloat16 matmuls are slow on most CPUs).
DEMO_SAMPLE = len(DEMO_ROWS)
#: A logit gap below this is a near-tie that rounding can flip (bfloat16 logits of this model are
#: multiples of 1/8 to 1/4 at their size); the gap of a wrong token is whole units.
NEAR_TIE = 2.0


@pytest.mark.slow
def test_the_demo_in_bfloat16_shows_near_ties_and_in_float32_agrees_in_full(demo_model: Path, tmp_path: Path) -> None:
    adapter = Path(__file__).resolve().parent.parent / "examples" / "adapters" / "arith"
    write_arith_dataset(tmp_path / "data.jsonl", DEMO_ROWS)
    db = tmp_path / "results.db"
    runs = {}
    for dtype in ("bfloat16", "float32"):
        config = tmp_path / f"{dtype}.yaml"
        config.write_text(DEMO.format(adapter=adapter, dtype=dtype))
        runs[dtype] = int(_ok(db, "run", "--device", "cpu", "-q", str(config)).stdout.splitlines()[-1])

    # bfloat16: per-variant agreement, and each disagreement with its gap, a near-tie's.
    result = _ok(db, "verify", str(runs["bfloat16"]), "--sample", str(DEMO_SAMPLE))
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"{DEMO_SAMPLE} examples regenerated alone with plain PEFT on cpu, bfloat16")
    recorded = _sql(db, "SELECT variant, sampled, agreed, details FROM verifications WHERE run_id = ? ORDER BY id",
                    runs["bfloat16"])
    assert [(v, n) for v, n, _a, _d in recorded] == [("base", DEMO_SAMPLE), ("arith", DEMO_SAMPLE)]
    for variant, sampled, agreed, details in recorded:
        share = f"{100 * agreed / sampled:.1f}".removesuffix(".0")
        assert [variant, str(sampled), str(agreed), f"{share}%"] in [line.split() for line in lines]
        found = json.loads(details)
        assert len(found) == sampled - agreed
        for d in found:
            assert d["gap"] is not None and 0 <= d["gap"] < NEAR_TIE, d
            row = next(line for line in lines if line.split()[:3] == [variant, str(d["example_idx"]),
                                                                         str(d["position"])])
            assert math.isclose(float(row.split()[-1]), d["gap"], rel_tol=1e-3)

    # float32: everything agrees.
    result = _ok(db, "verify", str(runs["float32"]), "--sample", str(DEMO_SAMPLE))
    print(result.stdout)
    for variant in ("base", "arith"):
        assert [variant, str(DEMO_SAMPLE), str(DEMO_SAMPLE), "100%"] in [line.split() for line in
                                                                        result.stdout.splitlines()]
    # ... and a row the run did not produce (its first token replaced by an unrelated one, 5000 ids on)
    # is found with a gap far beyond a near-tie's.
    from worker.verify import pick_sample

    idx = pick_sample(range(len(DEMO_ROWS)), DEMO_SAMPLE, seed=0)[0]  # in the sample the next call draws
    ids = json.loads(_sql(db, "SELECT output_ids FROM generations WHERE run_id = ? AND variant = 'arith' AND "
                              "example_idx = ?", runs["float32"], idx)[0][0])
    _sql(db, "UPDATE generations SET output_ids = ? WHERE run_id = ? AND variant = 'arith' AND example_idx = ?",
         json.dumps([ids[0] + 5000, *ids[1:]]), runs["float32"], idx)
    report = _verify(db, runs["float32"], "--sample", str(DEMO_SAMPLE))
    (bug,) = [d for v in report["variants"] for d in v["disagreements"]]
    assert (bug["example_idx"], bug["position"], bug["run_token"]) == (idx, 0, ids[0] + 5000)
    assert bug["gap"] > NEAR_TIE, bug
