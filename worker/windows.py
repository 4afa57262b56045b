"""The rolling windows of a perplexity document, exactly as lm-evaluation-harness cuts them.

The harness scores a text longer than the model's context in disjoint windows
(`HFLM.loglikelihood_rolling`): `make_disjoint_window` over `get_rolling_token_windows(tokens,
prefix_token, max_seq_len=max_length, context_len=1)` (lm_eval/utils.py, 0.4.x). Re-implemented here
without torch, so that the chunk planner can cut them:

- the first window predicts the first `min(max_len, n)` tokens from the prefix token (BOS, else EOS)
  followed by all but the last of them; its context, made disjoint, is the prefix token alone;
- every later window predicts the next `min(max_len, remaining)` tokens; its context is the
  `max_len - len(predicted) + 1` tokens just before them (the whole window, `max_len` tokens, is
  context + predicted[:-1]), so the last window still sees a full-sized context.

Every token is predicted exactly once; each window's context + continuation, less its last token,
is at most `max_len` tokens (what the model is given). The document's log-likelihood is the sum of
its windows' log-likelihoods, each scored as a (context, continuation) pair.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

#: The harness's `max_length` when neither the model config nor the tokenizer gives one
#: (lm_eval.models.utils.DEFAULT_MAX_LENGTH).
DEFAULT_MAX_LENGTH = 2048


def harness_max_length(limit: int | None) -> int:
    """The harness's `max_length` for a model whose context limit (`ChunkGenerator.context_limit`)
    is `limit`: that limit, or the harness's default when unknown."""
    return DEFAULT_MAX_LENGTH if limit is None else limit


def _rolling_token_windows(tokens: Sequence[int], prefix_token: int,
                           max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """`get_rolling_token_windows(tokens, prefix_token, max_seq_len=max_len, context_len=1)`:
    (input tokens, predicted tokens) per window; the last len(predicted) inputs predict them."""
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix_token, *tokens[:first - 1]], list(tokens[:first])
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, max_len)  # pred_len = max_len - context_len + 1
        end = predicted + count
        yield list(tokens[end - max_len - 1:end - 1]), list(tokens[end - count:end])  # end - max_len - 1 >= 0 here
        predicted += count


def _disjoint(window: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """`make_disjoint_window`: the context without the inputs that are also predicted tokens."""
    inputs, predicted = window
    return inputs[:len(inputs) - (len(predicted) - 1)], predicted


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs whose continuations are `tokens`, in order, each scored after its
    context as the harness scores a long document (`max_len`: the model's `max_length`, at least 1).
    No tokens: no windows (the harness scores such a document 0.0)."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    return [_disjoint(window) for window in _rolling_token_windows(tokens, prefix_token, max_len)]
