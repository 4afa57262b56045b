"""The host's log-likelihood surface: the harness's tokenization, its model length, and `score`.

The tokenization cases are worked by hand from lm-evaluation-harness 0.4.13 (`TemplateLM._encode_pair`,
`TemplateLM.loglikelihood`, `HFLM.tok_encode`): a context's trailing white space moves to its
continuation, the continuation's tokens are the whole text's past the context's, an empty context is
the prefix token, the tokenizer's own special tokens are added unless the text starts with the
prefix token's text. The end-to-end check against the installed harness is tests/test_harness_*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from contract.config import DatasetConfig, InferenceConfig
from contract.settings import Settings
from tests.tiny_models import ADAPTERS, make_adapter, make_model
from worker.engine.loglik import ScoreOptions, score_plain
from worker.generated import ScoreRow
from worker.harness_encoding import TOKENIZER_INFINITY, context_limit, encode_choices, encode_pair, tok_encode
from worker.model_host import ModelHost

PLAIN = DatasetConfig(path="x.jsonl", prompt="{{ q }}", chat_template=False)
CHAT = DatasetConfig(path="x.jsonl", prompt="{{ q }}", chat_template=True)
CONTEXTS = ["Question: what is 12 plus 30?\nAnswer:", "Question: what is 12 plus 30?\nAnswer: ",
            "The fox jumps over the  ", "Pick one.\n", ""]
CHOICES = [" 42", " 41", " forty-two", " the lazy dog jumps over the quick brown fox"]


def check_split(tokenizer: Any, context: str, continuation: str) -> None:
    """What `encode_pair` must give for any pair, by the harness's definition."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    if context == "":
        assert ctx == [tokenizer.bos_token_id]
        assert cont == tokenizer.encode(continuation, add_special_tokens=False)
        return
    stripped = context.rstrip()
    moved = context[len(stripped):]
    assert ctx == tok_encode(tokenizer, stripped)
    assert ctx + cont == tok_encode(tokenizer, stripped + moved + continuation)
    assert tokenizer.decode(cont) == moved + continuation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loglik-host")
    base = make_model("llama", root / "llama")
    return {"base": base, "r1": make_adapter(base, "llama", ADAPTERS["r1"], root / "r1", seed=3),
            "patterns": make_adapter(base, "llama", ADAPTERS["patterns"], root / "patterns", seed=4)}


def test_the_harness_split_on_the_tiny_tokenizer(tiny: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["base"]))
    for context in CONTEXTS:
        for choice in CHOICES:
            check_split(tokenizer, context, choice)
    ctx, conts = encode_choices(tokenizer, "The fox jumps over the  ", ["lazy", "dog"])
    assert ctx == tokenizer.encode("The fox jumps over the") and tokenizer.decode(conts[0]) == "  lazy"
    assert encode_pair(tokenizer, "", "<|im_start|>lazy") == ([1], tokenizer.encode("lazy"))  # the prefix given up
    assert encode_pair(tokenizer, "   ", "x") == ([1], tokenizer.encode("   x"))  # the harness fails here


def test_a_tokenizer_that_adds_bos_adds_it_unless_the_text_has_it(tiny: dict[str, Path]) -> None:
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(tiny["base"]))
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                             special_tokens=[("<|im_start|>", 1)])
    plain = tokenizer.encode("the fox", add_special_tokens=False)
    assert tok_encode(tokenizer, "the fox") == [1, *plain]
    assert tok_encode(tokenizer, "<|im_start|>the fox") == [1, *plain]  # not two
    assert encode_pair(tokenizer, "the", " fox") == ([1, *tokenizer.encode("the", add_special_tokens=False)],
                                                      tokenizer.encode(" fox", add_special_tokens=False))
    assert encode_pair(tokenizer, "", " fox") == ([1], tokenizer.encode(" fox", add_special_tokens=False))


class _Config:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class _Tokenizer:
    def __init__(self, model_max_length: int | None) -> None:
        self.model_max_length = model_max_length


def test_the_model_length_is_the_harness_rule() -> None:
    assert context_limit(_Config(n_positions=1024, max_position_embeddings=2048), None) == 1024
    assert context_limit(_Config(max_position_embeddings=4096, n_ctx=512), None) == 4096
    assert context_limit(_Config(n_ctx=512), _Tokenizer(77)) == 512
    assert context_limit(_Config(text_config=_Config(max_position_embeddings=32768), n_positions=1200), None) == 32768
    assert context_limit(_Config(), _Tokenizer(300)) == 300
    assert context_limit(_Config(), _Tokenizer(TOKENIZER_INFINITY)) is None
    assert context_limit(_Config(), _Tokenizer(None)) is None


def test_the_host_scores_pairs_it_encoded_as_plain_peft_does(tiny: dict[str, Path]) -> None:
    host = ModelHost(Settings.from_env(), device="cpu")
    host.ensure_base(str(tiny["base"]), dtype="float32")
    names = [host.ensure_adapter(variant, str(tiny[variant]))[0] for variant in ("r1", "patterns")]
    assert host.context_limit() == 1024 and host.prefix_token_id() == 1
    for dataset in (PLAIN, CHAT):
        pairs = host.encode_pairs(CONTEXTS, [CHOICES] * len(CONTEXTS), dataset)
        rows = [ScoreRow(tuple(ctx), tuple(tuple(c) for c in conts), adapter)
                for ctx, conts in pairs for adapter in (None, *names)]
        got, notes = host.score(rows, InferenceConfig(batch_size=2), variants=3, options=None)
        expected = score_plain(host.model, rows, max_length=1024)
        assert notes == []
        for g, e in zip(got, expected, strict=True):
            assert g.greedy == e.greedy
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-5)
        separate, _ = host.score(rows, InferenceConfig(batch_size=2, use_peft_directly=False), variants=3,
                                 options=ScoreOptions(share_context=False))
        assert all(torch.allclose(torch.tensor(s.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-5)
                   for s, e in zip(separate, expected, strict=True))
    templated = host.encode_pairs(["hi"], [[" there"]], CHAT)[0][0]
    assert str(host.tokenizer.decode(templated)).startswith("<|im_start|>user\nhi")
    assert host.encode_text(["the fox "]) == [host.tokenizer.encode("the fox ")]


@pytest.mark.slow
def test_the_demo_model_and_adapter_score_as_plain_peft(demo_model: Path, settings: Settings) -> None:
    """SmolLM2-135M-Instruct and the shipped demo adapter: the harness's split on its tokenizer
    (contexts ending in spaces), its length, and the fast path against plain PEFT, each option off.

    To 1e-5 relative (absolute below 1): float32 rounding alone moves these sums of about -20 by up to
    2e-5 (measured: the engine one row per pass, one variant at a time, differs from plain PEFT by
    1.9e-5 at -40; the fast path by 1e-5, each option off by 1.3e-5 at most)."""
    host = ModelHost(settings, device="cpu")
    host.ensure_base("demo", dtype="float32")
    adapter, _hash = host.ensure_adapter("arith", str(Path("producer/demo/adapters/arith").resolve()))
    assert host.context_limit() == 8192 and host.prefix_token_id() == 1  # <|im_start|>
    for context in CONTEXTS:
        for choice in CHOICES:
            check_split(host.tokenizer, context, choice)
    long = "The quick brown fox jumps over the lazy dog. " * 8
    pairs = host.encode_pairs(["What is 23 plus 41?\nAnswer: ", "What is 7 plus 8? ", "", long],
                              [[" 64", " 63", " 46", " sixty-four"], ["15", "16"], [" fifteen"],
                               ["It was a sunny day and the fox slept under a tree for many hours."]], PLAIN)
    assert [host.tokenizer.decode(c) for c in pairs[1][1]] == [" 15", " 16"]  # the space moved to the choices
    rows = [ScoreRow(tuple(ctx), tuple(tuple(c) for c in conts), name) for ctx, conts in pairs
            for name in (None, adapter)]
    expected = score_plain(host.model, rows, max_length=8192)
    assert expected[0].logprobs != expected[1].logprobs  # the adapter changes the scores
    for options in (ScoreOptions(), ScoreOptions(share_context=False), ScoreOptions(share_prefix=False),
                    ScoreOptions(route_lora=False), ScoreOptions(mixed_batches=False),
                    ScoreOptions(needed_positions_only=False)):
        got, notes = host.score(rows, InferenceConfig(batch_size=2), variants=2, options=options)
        assert notes == []
        for g, e in zip(got, expected, strict=True):
            assert g.greedy == e.greedy
            assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(g.logprobs, e.logprobs)), (options, g, e)
