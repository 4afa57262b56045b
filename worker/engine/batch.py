"""The rows in flight (or just prefilled, about to join them), with their KV cache and masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .kv_cache import RowsLayer, cache_layers
from .sampling import SamplingParams, sample

if TYPE_CHECKING:
    from .call import DecodeCall


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as an int64 tensor [len(values)] on `device`, copied without waiting for the device
    (pinned memory on CUDA), so that no host-device sync is forced."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """`mask` [rows, columns] with zero columns on the left up to `width`: [rows, width]."""
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


@dataclass
class Batch:
    """Rows with their KV cache, attention mask, next positions, adapter names and next-token logits.

    Invariants:
    - slot s holds prompt `rows[s]`, through adapter `names[s]` (None: the model as it is), with
      cache row s (`RowsLayer`);
    - the mask's first `plen` columns are the shared prefix (all ones); the rest are the rows' own
      columns, right-aligned as in the cache: row s's real tokens are its last `lengths[s]` own
      columns, padding on their left (zeros), so the first own column some row uses is
      `own width - max(lengths)`, known on the host (nothing is read back from the device);
    - `next_pos[s]` is the position of row s's next token (real tokens only: padding takes none);
    - `logits` are the next-token logits of every row until they are sampled (`choose`), then None
      until `step`; `chosen` holds the tokens sampled from them until the loop takes them (or None).
    """

    rows: list[int]
    cache: DynamicCache
    #: [rows, plen + own columns]; 1 = a real token
    mask: torch.Tensor
    #: [rows]
    next_pos: torch.Tensor
    names: list[str] | None
    #: [rows, vocab]
    logits: torch.Tensor | None
    plen: int
    #: per row, its real own columns (prompt tail + tokens fed back), on the host
    lengths: list[int]
    #: [rows] int64, each row's next token sampled from `logits` (`choose`); None until then
    chosen: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, slots: list[int]) -> torch.Tensor | None:
        """Keep only these slots, in this order; drop the own columns that no remaining row uses.
        Returns the slots as an index on the device, or None when every slot is kept in place."""
        if slots == list(range(len(self.rows))):
            return None
        index = to_device(slots, self.mask.device)
        self.rows = [self.rows[s] for s in slots]
        self.lengths = [self.lengths[s] for s in slots]
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        if self.logits is not None:
            self.logits = self.logits[index]
        if self.chosen is not None:
            self.chosen = self.chosen[index]
        for layer in cache_layers(self.cache):
            if isinstance(layer, RowsLayer):
                layer.select(slots, index)
            else:
                layer.batch_select_indices(index)
        if self.names is not None:
            self.names = [self.names[s] for s in slots]
        longest = max(self.lengths, default=0)
        first = self.mask.shape[1] - self.plen - longest if longest > 0 else 0
        if first > 0:
            self.mask = torch.cat([self.mask[:, :self.plen], self.mask[:, self.plen + first:]], dim=1)
            for layer in cache_layers(self.cache):
                layer.trim(first)
        return index

    def group(self) -> None:
        """Order the rows by adapter, so that each adapter's rows are one contiguous range."""
        if self.names is not None:
            names = self.names
            self.keep(sorted(range(len(names)), key=lambda s: names[s]))

    def choose(self, sampling: SamplingParams) -> None:
        """Sample each row's next token from `logits` into `chosen` and drop the logits (no-op when
        chosen already)."""
        if self.chosen is None:
            assert self.logits is not None
            self.chosen, self.logits = sample(self.logits, params=sampling), None

    def absorb(self, fresh: Batch) -> None:
        """Append the rows of `fresh`, prefilled into this batch's cache (`scheduler.prefill(into=...)`);
        the shorter rows' columns are padded on the left. Both have `chosen` their next tokens, so no
        [rows, vocab] logits are copied to join them."""
        p = self.plen
        width = max(self.mask.shape[1], fresh.mask.shape[1]) - p
        self.rows += fresh.rows
        self.lengths += fresh.lengths
        self.mask = torch.cat([torch.cat([m[:, :p], _pad_left(m[:, p:], width)], dim=1)
                               for m in (self.mask, fresh.mask)])
        self.next_pos = torch.cat([self.next_pos, fresh.next_pos])
        if self.names is not None and fresh.names is not None:
            self.names += fresh.names
        assert self.chosen is not None and fresh.chosen is not None and fresh.cache is self.cache
        self.chosen = torch.cat([self.chosen, fresh.chosen])
        for layer in cache_layers(self.cache):
            layer.commit()

    def step(self, call: DecodeCall, tokens: torch.Tensor) -> None:
        """One decode step: append `tokens` [rows, 1] (on the device) and compute the next logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=-1)
        out = call.forward(self.names, input_ids=tokens, attention_mask=self.mask,
                           position_ids=self.next_pos[:, None], past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1
        self.lengths = [n + 1 for n in self.lengths]
