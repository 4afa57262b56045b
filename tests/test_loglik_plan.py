"""The log-likelihood chunk planner (`worker.loglik_plan`) over a fake generator, and the chunk path
that writes its records and scores in one transaction (both backends)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text

from contract.config import RunConfig
from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.runs import NewExample, NewVariant, create_run
from tests.fake_generator import FakeGenerator, fake_adapter_hash
from worker.chunk import Processed, process_chunk
from worker.generated import ScoreResult, ScoreRow
from worker.loglik_plan import argmax, count_words, run_loglik_chunk
from worker.planner import ChunkExample, VariantSpec, run_chunk

CHOICE = {"name": "mc", "task": "choice", "model": {"base": "demo", "adapters": {"a": "/a"}},
          "dataset": {"path": "d.jsonl", "prompt": "{{ q }}", "choices": "{{ options }}", "answer": "{{ label }}"}}
PERPLEXITY = {"name": "ppl", "task": "perplexity", "model": {"base": "demo", "adapters": {"a": "/a"}},
              "dataset": {"path": "d.jsonl", "text": "{{ text }}"}}
VARIANTS = [VariantSpec("base", None), VariantSpec("a", "/a", fake_adapter_hash("a"))]


@dataclass
class FakeScorer(FakeGenerator):
    """Characters are tokens; a continuation's log-probability is minus the sum of its ids / 100, and the
    adapter prefers the longest continuation (plus its length), so base and adapter choose differently."""

    prefix: int = 1
    score_calls: list[list[ScoreRow]] = field(default_factory=list)

    def encode_pairs(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                     dataset: Any) -> list[tuple[list[int], list[list[int]]]]:
        return [([ord(c) for c in ctx] or [self.prefix], [[ord(c) for c in cont] for cont in conts])
                for ctx, conts in zip(contexts, continuations)]

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        return [[ord(c) for c in t] for t in texts]

    def prefix_token_id(self) -> int:
        return self.prefix

    def score(self, rows: Sequence[ScoreRow], inference: Any, *, variants: int,
              options: Any) -> tuple[list[ScoreResult], list[str]]:
        self.score_calls.append(list(rows))
        out = []
        for row in rows:
            bonus = (lambda c: len(c)) if row.adapter else (lambda c: 0.0)
            out.append(ScoreResult(tuple(-sum(c) / 100 + bonus(c) for c in row.continuations),
                                   tuple(len(c) == 1 for c in row.continuations)))
        return out, []


def _examples() -> list[ChunkExample]:
    return [ChunkExample(0, "Q: 2+3?", "5", ("5", "6", "17"), 0),
            ChunkExample(1, "", "b", ("a", "b"), 1)]


def test_choice_rows_are_scored_in_one_call_with_their_context_and_every_choice() -> None:
    host = FakeScorer()
    config = RunConfig.from_dict(CHOICE)
    outcome = run_chunk(host, config, _examples(), VARIANTS)
    (call,) = host.score_calls  # base and adapter rows together
    assert [r.adapter for r in call] == [None, "peft-a", None, "peft-a"]
    assert call[0].context_ids == tuple(map(ord, "Q: 2+3?"))
    assert call[0].continuations == (tuple(map(ord, " 5")), tuple(map(ord, " 6")), tuple(map(ord, " 17")))
    assert call[2].context_ids == (host.prefix,)  # an empty context is the prefix token, as in the harness
    by = {(r.example_idx, r.variant): r for r in outcome.records}
    assert by[0, "base"].prediction == "5" and by[0, "base"].correct is True
    assert by[0, "a"].prediction == "17" and by[0, "a"].correct is False  # the adapter prefers long choices
    assert by[1, "base"].output == "a" and by[1, "base"].correct is False
    assert {r.finish_reason for r in outcome.records} == {"scored"}
    assert by[0, "base"].prompt_tokens == len("Q: 2+3?") and by[0, "base"].output_tokens == 0
    scores = [s for s in outcome.scores if (s.example_idx, s.variant) == (0, "base")]
    assert [(s.choice_idx, s.tokens, s.bytes, s.chars) for s in scores] == [(0, 2, 1, 1), (1, 2, 1, 1), (2, 3, 2, 2)]
    assert scores[0].logprob == pytest.approx(-(32 + 53) / 100)


def test_rows_already_written_are_not_scored_again() -> None:
    host = FakeScorer()
    outcome = run_loglik_chunk(host, RunConfig.from_dict(CHOICE), _examples(), VARIANTS,
                               skip=frozenset({(0, "base"), (0, "a"), (1, "a")}))
    assert [(r.example_idx, r.variant) for r in outcome.records] == [(1, "base")]
    assert [len(c) for c in host.score_calls] == [1]
    everything = frozenset((i, v.name) for i in (0, 1) for v in VARIANTS)
    assert run_loglik_chunk(host, RunConfig.from_dict(CHOICE), _examples(), VARIANTS, skip=everything).records == []


def test_a_document_is_scored_in_rolling_windows_that_cover_every_token_once() -> None:
    host = FakeScorer(max_positions=8)
    text_ = "Héllo wörld,\nthis is a document of more than eight tokens."
    outcome = run_chunk(host, RunConfig.from_dict(PERPLEXITY), [ChunkExample(0, text_, None)], VARIANTS)
    (call,) = host.score_calls
    base_windows = [r for r in call if r.adapter is None]
    assert len(base_windows) == math.ceil(len(text_) / 8)
    assert [t for r in base_windows for t in r.continuations[0]] == [ord(c) for c in text_]
    assert all(len(r.context_ids) + len(r.continuations[0]) - 1 <= 8 for r in base_windows)
    base = next(s for s in outcome.scores if s.variant == "base")
    assert base.logprob == pytest.approx(-sum(map(ord, text_)) / 100)
    assert (base.tokens, base.bytes, base.chars, base.words) == (len(text_), len(text_.encode()), len(text_), 11)
    assert {r.output for r in outcome.records} == {""} and {r.correct for r in outcome.records} == {None}


def test_argmax_and_word_count_follow_the_harness() -> None:
    assert argmax([-1.0, -0.5, -0.5]) == 1  # the first of equal maxima, as numpy's argmax
    assert count_words("a  b\nc ") == 4  # re.split(r"\s+") keeps the empty tail, as the harness counts


@pytest.mark.parametrize("task", ["choice", "perplexity"])
def test_a_chunk_writes_its_outputs_and_scores_once(any_db_url: str, task: str) -> None:
    engine = make_engine(any_db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    config = CHOICE if task == "choice" else PERPLEXITY
    examples = [NewExample(0, {}, "Q: 2+3?", "5", ["5", "6", "17"], 0), NewExample(1, {}, "", "b", ["a", "b"], 1)] \
        if task == "choice" else [NewExample(0, {}, "One short document.", None), NewExample(1, {}, "Two.", None)]
    with sessions.begin() as session:
        run_id = create_run(session, name=task, config=config, config_path=None, base_model="demo",
                            dataset_path="d.jsonl", dataset_sha256="0" * 64,
                            variants=[NewVariant("base", None, None), NewVariant("a", "/a", fake_adapter_hash("a"))],
                            examples=examples, chunk_size=2).id
    host = FakeScorer(max_positions=8)
    assert process_chunk(sessions, host, run_id, 0, worker="w", max_attempts=3) is Processed.DONE
    assert process_chunk(sessions, host, run_id, 0, worker="w", max_attempts=3) is Processed.SKIPPED
    with engine.connect() as conn:
        outputs = conn.execute(text("SELECT example_idx, variant, prediction, correct, finish_reason FROM outputs "
                                    "WHERE run_id = :r ORDER BY example_idx, variant"), {"r": run_id}).all()
        assert len(outputs) == 4 and {o.finish_reason for o in outputs} == {"scored"}
        if task == "choice":
            assert [(o.prediction, bool(o.correct)) for o in outputs] == [("17", False), ("5", True), ("a", False),
                                                                           ("a", False)]
            rows = conn.execute(text("SELECT example_idx, variant, choice_idx, choice, is_gold, logprob, base_logprob, "
                                     "delta_logprob FROM choice_scores WHERE run_id = :r AND variant = 'a' "
                                     "ORDER BY example_idx, choice_idx"), {"r": run_id}).all()
            assert [(r.choice, bool(r.is_gold)) for r in rows] == [("5", True), ("6", False), ("17", False),
                                                                   ("a", False), ("b", True)]
            assert rows[2].logprob - rows[2].base_logprob == pytest.approx(rows[2].delta_logprob) \
                and rows[2].delta_logprob == pytest.approx(3.0)
        else:
            docs = conn.execute(text("SELECT variant, nll, tokens, bytes, words, bits_per_byte, base_nll, delta_nll "
                                     "FROM document_scores WHERE run_id = :r AND example_idx = 0 ORDER BY variant"),
                                {"r": run_id}).all()
            assert [d.variant for d in docs] == ["a", "base"]
            adapter, base = docs
            assert base.nll == pytest.approx(sum(map(ord, "One short document.")) / 100)
            assert (base.tokens, base.bytes, base.words) == (19, 19, 3)
            assert base.bits_per_byte == pytest.approx(base.nll / 19 / math.log(2))
            assert adapter.base_nll == pytest.approx(base.nll) and adapter.delta_nll == pytest.approx(-19.0)
        count = conn.execute(text("SELECT count(*) FROM loglikelihoods WHERE run_id = :r"), {"r": run_id}).scalar()
        assert count == (10 if task == "choice" else 4)
    engine.dispose()
