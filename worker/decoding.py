"""The decode loop: greedy or sampled generation of one batch, in which finished rows leave.

`transformers.generate` keeps a finished row in its batch (padding it) until the longest row ends;
here a row that reaches EOS, a stop string or its token budget is dropped from the batch and from
the KV cache at once, so it costs nothing more. Base and adapter rows share the batch through
PEFT's `adapter_names`, which is narrowed with the batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from producer.config import GenerationConfig

# transformers 5.x renames `past_key_values` to `cache` (before 5.40); older releases only know the
# old name, which we keep so that the whole supported range works, without the warning in every run.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def _sample(logits: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """Next token per row from logits [rows, vocab]: argmax, or temperature + top-p sampling."""
    if not gen.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)  # [rows, vocab]
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > gen.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1).squeeze(-1)


@torch.inference_mode()
def decode(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    mask: torch.Tensor,
    gen: GenerationConfig,
    *,
    eos_ids: set[int],
    adapter_names: Sequence[str] | None,
) -> list[list[int]]:
    """New tokens of each row of the left-padded batch `ids` [rows, width] (EOS included when hit)."""
    rows = ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows, device=ids.device)  # original row index of each row still in the batch
    names = list(adapter_names) if adapter_names is not None else None
    extra = {"adapter_names": names} if names is not None else {}
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [rows, width]; pads are masked anyway
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **extra)
    logits = out.logits[:, -1, :]  # [rows, vocab]
    next_position = positions[:, -1] + 1  # [rows]
    window = max((len(s) for s in gen.stop), default=0) + 2  # tokens that can hold a just-completed stop string
    for step in range(gen.max_new_tokens):
        chosen = _sample(logits, gen).tolist()
        keep: list[int] = []
        for slot, (row, token) in enumerate(zip(active.tolist(), chosen)):
            tokens[row].append(token)
            if token in eos_ids:
                continue
            if gen.stop:
                tail = tokenizer.decode(tokens[row][-window:], skip_special_tokens=True)
                if any(stop in tail for stop in gen.stop):
                    continue
            keep.append(slot)
        if not keep or step == gen.max_new_tokens - 1:
            break
        if len(keep) < len(active):  # finished rows leave the batch and the KV cache
            index = torch.tensor(keep, device=ids.device)
            active, mask, next_position = active[index], mask[index], next_position[index]
            cache.batch_select_indices(index)
            if names is not None:
                names = [names[k] for k in keep]
                extra["adapter_names"] = names
        next_ids = torch.tensor([[chosen[k]] for k in keep], device=ids.device)  # [rows, 1]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)  # [rows, width + step + 1]
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=next_position[:, None],
                    past_key_values=cache, use_cache=True, **extra)
        logits = out.logits[:, -1, :]
        next_position = next_position + 1
    return tokens
