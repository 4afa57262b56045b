"""`worker.planner`: which rows of a chunk are skipped, reused, refused or generated, with a fake
generator (no model, no database), and the generation cache's key."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest

from contract.config import GenerationConfig, RunConfig
from contract.errors import FatalChunkError
from tests.fake_generator import IDENTITY, FakeGenerator, fake_adapter_hash, fake_text
from worker.engine.generation import GenRow
from worker.planner import (
    CACHE_KEY_VERSION,
    ChunkExample,
    Reusable,
    RowState,
    VariantSpec,
    cache_key,
    plan_rows,
    prepare_rows,
    prompts_to_encode,
    reuse_cached,
    run_chunk,
    unservable,
)

VARIANTS = [VariantSpec("base", None), VariantSpec("a", "/adapters/a")]
ADAPTERS = {"base": (None, None), "a": ("peft-a", "hash-a".ljust(64, "0"))}


def config(**generation: Any) -> RunConfig:
    return RunConfig.from_dict({
        "name": "t", "model": {"base": "demo", "adapters": {"a": "/adapters/a"}},
        "dataset": {"path": "d.jsonl", "prompt": "{{ q }}"},
        "generation": {"max_new_tokens": 4, **generation},
        "scoring": {"match": "exact"},
    })


def examples(*prompts: str) -> list[ChunkExample]:
    return [ChunkExample(10 + i, p, "base|" + ",".join(str(ord(c)) for c in p)) for i, p in enumerate(prompts)]


# --- the pure planning ----------------------------------------------------------------------------


def test_done_pairs_are_skipped_and_a_fully_done_example_is_not_encoded() -> None:
    exs = examples("one", "two", "three")
    rows = plan_rows(exs, VARIANTS, frozenset({(10, "base"), (10, "a"), (11, "a")}))
    assert [(r.example.idx, r.variant.name, r.state) for r in rows] == [
        (10, "base", RowState.SKIP), (10, "a", RowState.SKIP),
        (11, "base", RowState.GENERATE), (11, "a", RowState.SKIP),
        (12, "base", RowState.GENERATE), (12, "a", RowState.GENERATE),
    ]
    assert [ex.idx for ex in prompts_to_encode(rows)] == [11, 12]


def test_empty_and_too_long_prompts_are_refused_without_a_cache_key() -> None:
    exs = examples(" \n", "short", "x" * 20)
    rows = plan_rows(exs, VARIANTS[:1], frozenset())
    ids = {10: [1, 2], 11: [1] * 5, 12: [1] * 20}
    prepare_rows(rows, ids, ADAPTERS, IDENTITY, config(), max_positions=12)  # 20 + 4 new tokens > 12
    assert [(r.state, r.result and r.result.finish_reason, r.cache_key is None) for r in rows] == [
        (RowState.REFUSE, "empty_prompt", True),
        (RowState.GENERATE, None, False),
        (RowState.REFUSE, "prompt_too_long", True),
    ]
    assert unservable("ok", 8, 12, GenerationConfig(max_new_tokens=4)) is None  # exactly fits
    assert unservable("ok", 9, 12, GenerationConfig(max_new_tokens=4)) is not None
    assert unservable("ok", 10_000, None, GenerationConfig()) is None  # no known limit


def test_a_cache_hit_fills_its_row_and_a_miss_stays_to_generate() -> None:
    rows = plan_rows(examples("hi"), VARIANTS, frozenset())
    prepare_rows(rows, {10: [104, 105]}, ADAPTERS, IDENTITY, config(), None)
    base, adapted = rows
    assert base.cache_key and adapted.cache_key and base.cache_key != adapted.cache_key
    reuse_cached(rows, {adapted.cache_key: Reusable(77, "earlier", 3, "stop", (4, 5, 6))})
    assert base.state is RowState.GENERATE and base.result is None
    assert adapted.state is RowState.REUSE and adapted.reused_from == 77
    assert adapted.result is not None and (adapted.result.text, adapted.result.token_ids) == ("earlier", (4, 5, 6))


# --- run_chunk over a fake generator ---------------------------------------------------------------


def test_run_chunk_generates_only_what_is_not_done_cached_or_refused() -> None:
    gen = FakeGenerator(max_positions=12)
    exs = examples("ab", "", "c" * 20, "d")
    cfg = config()
    hit_key = cache_key(IDENTITY, ADAPTERS["a"][1], (ord("d"),), cfg.generation, path="mixed")
    asked: list[list[str]] = []

    def lookup(keys: list[str]) -> dict[str, Reusable]:
        asked.append(keys)
        return {hit_key: Reusable(5, "from the cache", 2, "eos", None)} if hit_key in keys else {}

    out = run_chunk(gen, cfg, exs, VARIANTS, skip=frozenset({(10, "a")}), cached=lookup)
    got = {(r.example_idx, r.variant): r for r in out.records}
    assert list(got) == [(10, "base"), (11, "base"), (11, "a"), (12, "base"), (12, "a"), (13, "base"), (13, "a")]
    assert gen.encoded == [["ab", "", "c" * 20, "d"]]  # each prompt once
    assert [[(r.adapter, r.input_ids) for r in call] for call in gen.generated] == [
        [(None, (97, 98)), (None, (100,))]]  # not the done, refused or cached rows
    assert len(asked) == 1 and len(asked[0]) == 3  # the refused rows' keys are not looked up
    assert got[(10, "base")].output == fake_text(GenRow((97, 98), None)) and got[(10, "base")].correct is True
    assert got[(10, "base")].output_ids == [5, 6, 2] and got[(10, "base")].cache_key
    assert (got[(11, "a")].finish_reason, got[(11, "a")].cache_key, got[(11, "a")].output_ids) == (
        "empty_prompt", None, None)
    assert got[(12, "base")].finish_reason == "prompt_too_long" and got[(12, "base")].prompt_tokens == 20
    reused = got[(13, "a")]
    assert (reused.output, reused.reused_from, reused.cache_key, reused.output_ids) == ("from the cache", 5, hit_key,
                                                                                       None)
    assert reused.adapter_hash == ADAPTERS["a"][1] and reused.base_model_hash == IDENTITY.base_hash
    assert (out.device, out.dtype, out.engine) == ("cpu", "float32", None)


def test_nothing_to_do_touches_no_prompt() -> None:
    gen = FakeGenerator()
    out = run_chunk(gen, config(), examples("x"), VARIANTS, skip=frozenset({(10, "base"), (10, "a")}))
    assert (out.records, out.device, gen.encoded, gen.generated) == ([], None, [], [])


def test_sampled_rows_have_no_cache_key_and_are_never_looked_up() -> None:
    gen = FakeGenerator()
    out = run_chunk(gen, config(do_sample=True), examples("x"), VARIANTS, cached=lambda keys: pytest.fail("asked"))
    assert [r.cache_key for r in out.records] == [None, None] and len(gen.generated[0]) == 2


def test_engine_notes_name_adapters_as_the_user_does() -> None:
    gen = FakeGenerator(notes=["one pass per variant: peft-a has DoRA", "one pass per variant: peft-a has DoRA"])
    assert run_chunk(gen, config(), examples("x"), VARIANTS).engine == "one pass per variant: 'a' has DoRA"


def test_a_generator_error_is_left_to_the_caller() -> None:
    with pytest.raises(FatalChunkError, match="no room"):
        run_chunk(FakeGenerator(fail=FatalChunkError("no room")), config(), examples("x"), VARIANTS)
    with pytest.raises(RuntimeError, match="device lost"):
        run_chunk(FakeGenerator(fail=RuntimeError("device lost")), config(), examples("x"), VARIANTS)


def test_an_adapter_changed_since_submission_fails_the_chunk_naming_both_hashes() -> None:
    """The generator hashes the files it loads; another hash than the one recorded at submission would
    mix two adapter versions in one run, so the chunk fails before anything is generated."""
    recorded = [VariantSpec("base", None), VariantSpec("a", "/adapters/a", fake_adapter_hash("a"))]
    assert len(run_chunk(FakeGenerator(), config(), examples("x"), recorded).records) == 2  # unchanged: runs
    gen = FakeGenerator(adapter_hashes={"a": "e" * 64})
    with pytest.raises(FatalChunkError) as caught:
        run_chunk(gen, config(), examples("x"), recorded)
    message = str(caught.value)
    assert "adapter 'a' (/adapters/a) changed since the run was submitted" in message
    assert fake_adapter_hash("a") in message and "e" * 64 in message
    assert "restore the adapter's files" in message and "submit a new run" in message
    assert gen.encoded == [] and gen.generated == []
    assert len(run_chunk(gen, config(), examples("x"), VARIANTS).records) == 2  # nothing recorded: not checked


def test_an_output_that_cannot_be_scored_fails_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> Any:
        raise ValueError("bad pattern")

    monkeypatch.setattr("worker.planner.score", broken)
    with pytest.raises(FatalChunkError, match="scoring example 10 variant 'base': ValueError: bad pattern"):
        run_chunk(FakeGenerator(), config(), examples("x"), VARIANTS)


# --- the cache key ----------------------------------------------------------------------------------


def test_the_cache_key_is_the_hash_of_its_documented_payload() -> None:
    """Pinned byte for byte: a changed key would silently stop every earlier output from being reused."""
    payload = ('{"v":2,"base":"' + "b" * 64 + '","tokenizer":"' + "t" * 64 + '","dtype":"float32","device":"cpu",'
               '"eos":[2],"path":"mixed","adapter":"h","ids":[1,2,3],"max_new_tokens":8,"stop":["\\n"]}')
    gen = GenerationConfig(max_new_tokens=8, stop=("\n",))
    assert CACHE_KEY_VERSION == 2
    assert cache_key(IDENTITY, "h", [1, 2, 3], gen, path="mixed") == hashlib.sha256(payload.encode()).hexdigest()
    assert cache_key(IDENTITY, "h", (1, 2, 3), gen, path="mixed") == cache_key(IDENTITY, "h", [1, 2, 3], gen,
                                                                                 path="mixed")


EIGHT = GenerationConfig(max_new_tokens=8)


@pytest.mark.parametrize("change", [
    lambda k: k(model=replace(IDENTITY, base_hash="c" * 64)),
    lambda k: k(model=replace(IDENTITY, tokenizer_hash="u" * 64)),
    lambda k: k(model=replace(IDENTITY, dtype="bfloat16")),
    lambda k: k(model=replace(IDENTITY, device="cuda")),
    lambda k: k(model=replace(IDENTITY, eos_ids=(2, 3))),
    lambda k: k(adapter=None),
    lambda k: k(ids=[1, 2]),
    lambda k: k(gen=GenerationConfig(max_new_tokens=9)),
    lambda k: k(gen=GenerationConfig(max_new_tokens=8, stop=("\n",))),
    lambda k: k(path="merged"),
], ids=["base", "tokenizer", "dtype", "device", "eos", "adapter", "ids", "max_new_tokens", "stop", "path"])
def test_every_input_changes_the_cache_key(change: Any) -> None:
    def key(model: Any = IDENTITY, adapter: str | None = "h", ids: Any = (1, 2, 3),
            gen: GenerationConfig = EIGHT, path: str = "mixed") -> str | None:
        return cache_key(model, adapter, ids, gen, path=path)

    assert key() == key() and key() is not None
    assert change(key) != key()


@pytest.mark.parametrize("gen", [GenerationConfig(), GenerationConfig(max_new_tokens=7, stop=("\n", "é\"\\", "🙂")),
                                 GenerationConfig(do_sample=True)], ids=["default", "stops", "sampling"])
@pytest.mark.parametrize("path", ["mixed", "merged"])
def test_a_chunk_s_keys_are_exactly_cache_key_s(gen: GenerationConfig, path: str) -> None:
    """`ChunkKeys` serializes the shared parts once; the keys must not change (earlier outputs would no
    longer be found), so each is compared with `cache_key` itself."""
    from worker.cache_keys import ChunkKeys

    identities = [IDENTITY, replace(IDENTITY, eos_ids=(2, 0, 128009), dtype="bfloat16", device="cuda")]
    for identity in identities:
        keys = ChunkKeys(identity, gen, path=path)
        for adapter in (None, fake_adapter_hash("a"), "ü\"x"):
            for ids in ((), (1,), (5, 0, 70000, 2**40), tuple(range(300))):
                assert keys.key(adapter, ids) == cache_key(identity, adapter, ids, gen, path=path)
