"""Tokenizing contexts, continuations and documents exactly as lm-evaluation-harness does (HFLM, 0.4.13).

- `tok_encode(text)`: the tokenizer's own `encode`, with its default special tokens (a BOS where the
  tokenizer adds one), except that a text already starting with the prefix token's text (a chat
  template's BOS) gets none added (`HFLM.tok_encode`, `has_bos_prefix`);
- `encode_pair(context, continuation)` (`LM._encode_pair`): trailing white space of the context
  moves to the front of the continuation; the continuation's tokens are those of the whole text past
  the context's own tokens, so that the boundary is where the tokenizer puts it for the whole text;
- an empty context (`LM.loglikelihood`): the context is the prefix token (BOS, else EOS), the
  continuation encoded without special tokens; a continuation that starts with that token gives it
  up as the context. Where the harness fails instead (a context of white space alone, which encodes
  to no tokens), the context is the prefix token too;
- the prefix token (`HFLM.prefix_token_id`): the tokenizer's BOS, else its EOS;
- the model's length (`HFLM.max_length`, `resolve_max_length`): `context_limit`, then 2048 where
  that is unknown (`worker.windows.harness_max_length`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


#: What transformers sets a tokenizer's `model_max_length` to when it knows no limit (`VERY_LARGE_INTEGER`,
#: the harness's `TOKENIZER_INFINITY`).
TOKENIZER_INFINITY = int(1e30)
#: The config attributes that carry a context length, in the order the harness reads them.
_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


def context_limit(config: Any, tokenizer: Any) -> int | None:
    """The harness's `max_length` of a model, less its 2048 default: the first of `n_positions`,
    `max_position_embeddings`, `n_ctx` set on the config's `text_config` (else on the config itself),
    else the tokenizer's `model_max_length` unless it is transformers' "no limit"; else None."""
    config = getattr(config, "text_config", None) or config
    for attr in _LENGTH_ATTRS:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else None


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an empty context, and the first perplexity window, is scored after."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to score an empty context after")
    return int(token)


def tok_encode(tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool | None = None) -> list[int]:
    """`HFLM.tok_encode` (add_bos_token unset): the tokenizer's default special tokens, none when the
    text already starts with the prefix token's text, or as `add_special_tokens` says."""
    kwargs: dict[str, Any] = {}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    elif text.startswith(str(tokenizer.decode(prefix_token_id(tokenizer)))):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request, as the harness scores it."""
    prefix = prefix_token_id(tokenizer)
    if context == "":
        tokens = tok_encode(tokenizer, continuation, add_special_tokens=False)
        if tokens and tokens[0] == prefix:
            return tokens[:1], tokens[1:]
        return [prefix], tokens
    spaces = len(context) - len(context.rstrip())
    if spaces > 0:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok_encode(tokenizer, context + continuation)
    context_ids = tok_encode(tokenizer, context)
    if not context_ids:  # white space alone: where the harness would fail, the empty context's rule
        return [prefix], whole
    return context_ids, whole[len(context_ids):]


def encode_choices(tokenizer: PreTrainedTokenizerBase, context: str,
                   continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """One context and each continuation after it: (context tokens, [continuation tokens]). The
    context's tokens do not depend on the continuation (`encode_pair`), so they are given once."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    if not pairs:
        return encode_pair(tokenizer, context, "")[0], []
    assert all(p[0] == pairs[0][0] for p in pairs), "the harness's context tokens depend only on the context"
    return pairs[0][0], [p[1] for p in pairs]
