"""The KV cache of a batch in flight: per decoder layer, the shared prefix once per variant, then the
rows' own columns in one buffer written in place (`RowsLayer`)."""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import attention
from .lora_routing import Run, segments

#: CPU buffers of at least this many bytes are mapped pages of their own (`zeros`).
OWN_PAGES = 1 << 16


def zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A tensor of zeros of `shape`, `like`'s dtype and device. On CPU, from `OWN_PAGES` bytes up, in
    pages mapped for it alone (anonymous memory, zero until written): returned to the system as soon
    as it is freed, where the C heap keeps what it frees for reuse. A cache grows in steps and each
    decode call makes its own, so in the heap the freed smaller buffers stayed resident beside the new
    ones (bench/README.md, memory)."""
    nbytes = math.prod(shape) * like.element_size()
    anonymous = getattr(mmap, "MAP_ANONYMOUS", 0)  # POSIX; elsewhere the heap
    if like.device.type != "cpu" or not anonymous or nbytes == 0 or nbytes < OWN_PAGES:
        return like.new_zeros(shape)
    try:
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | anonymous)  # this process's alone
    except OSError:  # out of mappings (vm.max_map_count) or memory: the heap's allocator decides
        return like.new_zeros(shape)
    return torch.frombuffer(pages, dtype=like.dtype).view(shape)


class Scratch:
    """Working memory for the caches of one decode call (the whole keys and values handed to
    attention, the rows being compacted), reused so that a decode step allocates nothing.

    Invariant: a tensor `take`n for a slot is valid until that slot is taken again. `RowsLayer` uses
    slot 0 for the rows it moves or compacts and for the whole keys it hands attention (consumed by
    attention before the next move), slot 1 for the whole values.
    """

    def __init__(self) -> None:
        #: slot -> a flat buffer [at least the numel last asked for], reused while big enough.
        self._flat: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of `shape` (contents undefined), valid until `slot` is taken again."""
        numel = math.prod(shape)
        flat = self._flat.get(slot)
        if flat is None or flat.numel() < numel or flat.dtype != like.dtype or flat.device != like.device:
            self._flat.pop(slot, None)  # freed before its successor is made
            flat = self._flat[slot] = zeros((numel + numel // 4,), like)  # room to grow a little
        return flat[:numel].view(shape)


#: `Scratch` slots: rows being moved or compacted, and the whole keys and values for attention.
_STAGING, _WHOLE_KEYS, _WHOLE_VALUES = 0, 0, 1


class PendingRows(NamedTuple):
    """Rows opened for (`RowsLayer.open`) and not yet committed: where their prefill is written."""

    first_row: int
    end_row: int
    first_column: int  # their own columns: [first_column, end_column) of the buffer
    end_column: int
    batch_start: int  # the batch's first own column once they join (the new rows' padding included)
    pick: list[int]  # their variants (row of the shared prefix)


class RowsLayer(DynamicLayer):
    """One decoder layer's KV entries for a batch, written in place: a decode step writes its column
    into spare columns, finished rows are compacted, joining rows are prefilled straight into the
    buffer; no step copies the layer's cache into a new tensor.

    Invariants:
    - the shared prefix is held once per variant; row i reads variant `pick[i]` (all zeros: no prefix);
    - rows in use are buffer rows [0, m); their own columns are buffer columns [start, start + n),
      right-aligned: every row's newest entry is in the last column, shorter rows padded on the left
      (masked out by the batch's attention mask); `keys` / `values` are views of exactly that;
    - on a decode step under `attention.in_place`, `update` returns the own columns in place and hands
      the prefix to attention beside them (`attention.hand_off`); otherwise (a prefill, or attention
      other than `sdpa`) it returns the whole [rows, heads, prefix + n, dim] (the prefix copied in
      front, per run of rows of one variant, into `scratch`); to the model (mask sizes, positions) the
      layer is `plen + n` long (`plen + columns written` while rows are pending);
    - between `open` and `commit`, the next `update` is the joining rows' prefill, written at `_pending`.
    """

    #: The fewest columns allocated beyond those in use ...
    SPARE = 4
    #: ... and at least 1/GROWTH of the columns in use (0: SPARE only).
    GROWTH = 4

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, pick: Sequence[int] = (),
                 scratch: Scratch | None = None, reserve: int = 0, limit: int = 0) -> None:
        super().__init__()
        #: (keys, values) of the shared prefix, each [variants, heads, prefix, head_dim]; None: no prefix.
        self.prefix = prefix
        self.pick = list(pick)
        self.scratch = scratch if scratch is not None else Scratch()
        self.reserve = reserve  # rows to allocate at least (the batch's capacity)
        #: The most columns any row can use (its prompt after the prefix + its token budget; 0: unknown):
        #: the spare never goes beyond it.
        self.limit = limit
        #: [reserved rows, heads, allocated columns, head_dim]; None until the first `update`.
        self._k: torch.Tensor | None = None
        #: [reserved rows, heads, allocated columns, head_dim], as `_k`.
        self._v: torch.Tensor | None = None
        self._m = self._start = self._n = 0  # rows in use; first column and columns in use
        self._pending: PendingRows | None = None
        self._written = 0  # columns the pending rows have written

    @property
    def plen(self) -> int:
        return 0 if self.prefix is None else int(self.prefix[0].shape[2])

    def _own(self, buffer: torch.Tensor) -> torch.Tensor:
        """The rows and columns in use of `buffer`: [m, heads, n, head_dim]."""
        return buffer[:self._m, :, self._start:self._start + self._n]

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        return self._k, self._v

    def _sync(self) -> None:
        """`keys`/`values`: views of the columns in use."""
        if self._k is not None and self._v is not None:
            self.keys, self.values = self._own(self._k), self._own(self._v)

    def _reallocate(self, rows: int, columns: int, like: torch.Tensor, at: int = 0) -> None:
        """New buffers of at least `rows` rows and `columns` (+ spare: SPARE, or 1/GROWTH more, but
        never past `limit`) columns, zeros but for the rows in use, copied in at column `at`. The
        spare grows with the columns, so that reallocating costs a few columns per step however long
        the rows get."""
        spare = max(self.SPARE, columns // self.GROWTH if self.GROWTH else 0)
        if self.limit:
            spare = min(spare, max(0, self.limit - columns))
        shape = (max(rows, self.reserve), like.shape[1], columns + spare, like.shape[3])
        k, v = zeros(shape, like), zeros(shape, like)
        if self._k is not None and self._v is not None:
            k[:self._m, :, at:at + self._n], v[:self._m, :, at:at + self._n] = self._own(self._k), self._own(self._v)
        self._k, self._v, self._start = k, v, at

    def _move(self, at: int) -> None:
        """Move the rows in use to start at column `at`, in place."""
        for buffer in self._buffers():
            own = self._own(buffer)
            staged = self.scratch.take(_STAGING, tuple(own.shape), own)
            staged.copy_(own)
            buffer[:self._m, :, at:at + self._n] = staged
        self._start = at
        self._sync()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key_states` / `value_states` [rows, heads, tokens, head_dim] (or write the pending
        rows' prefill); return the whole keys and values attention reads."""
        t = key_states.shape[2]
        if self._pending is not None:  # rows joining the batch: written into their reserved place
            p = self._pending
            assert (p.end_row - p.first_row, p.end_column - p.first_column) == (key_states.shape[0], t)
            k, v = self._buffers()
            k[p.first_row:p.end_row, :, p.first_column:p.end_column] = key_states
            v[p.first_row:p.end_row, :, p.first_column:p.end_column] = value_states
            self._written = t
            runs = segments(p.pick)
            return (self._whole(k[p.first_row:p.end_row, :, p.first_column:p.end_column], 0, runs),
                    self._whole(v[p.first_row:p.end_row, :, p.first_column:p.end_column], 1, runs))
        if self._k is None:
            self.is_initialized, self.device = True, key_states.device
            self._m = key_states.shape[0]
            self.pick = self.pick or [0] * self._m
            self._reallocate(self._m, t, key_states)
        elif self._start + self._n + t > self._k.shape[2]:  # no column free on the right
            if self._n + t <= self._k.shape[2]:
                self._move(0)  # the trimmed columns on the left make room
            else:
                self._reallocate(self._m, self._n + t, self._k)
        k, v = self._buffers()
        end = self._start + self._n
        k[:self._m, :, end:end + t] = key_states
        v[:self._m, :, end:end + t] = value_states
        self._n += t
        own_k, own_v = self.keys, self.values = self._own(k), self._own(v)  # as `_sync`, views made once
        runs = segments(self.pick)
        if t == 1 and self.prefix is not None and attention.active():  # a decode step: read in place
            attention.hand_off(attention.Handoff(own_k, own_v, self.prefix[0], self.prefix[1], runs))
            return own_k, own_v
        return self._whole(own_k, 0, runs), self._whole(own_v, 1, runs)

    def _whole(self, own: torch.Tensor, which: int, runs: Sequence[Run]) -> torch.Tensor:
        """The prefix (each run of rows with its variant's) followed by the rows' own columns `own`
        [rows, heads, columns, head_dim]: [rows, heads, prefix + columns, head_dim]."""
        if self.prefix is None:
            return own
        prefix = self.prefix[which]
        p = prefix.shape[2]
        slot = _WHOLE_KEYS if which == 0 else _WHOLE_VALUES
        out = self.scratch.take(slot, (own.shape[0], own.shape[1], p + own.shape[2], own.shape[3]), own)
        out[:, :, p:] = own
        for run in runs:
            out[run.start:run.end, :, :p] = prefix[run.value]
        return out

    def get_seq_length(self) -> int:
        if self._pending is not None:
            return self.plen + self._written
        return self.plen + self._n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows, in this order (transformers' API; reads the indices back to the host)."""
        self.select(indices.tolist(), indices)

    def select(self, slots: Sequence[int], index: torch.Tensor) -> None:
        """Keep rows `slots`, in this order, compacted in place; `index` [len(slots)] holds the same
        row numbers on the cache's device (so that nothing is read back from it)."""
        if self._k is None or self._v is None:
            return
        m, end = len(slots), self._start + self._n
        for buffer in self._buffers():
            own = self._own(buffer)
            kept = self.scratch.take(_STAGING, (m, *own.shape[1:]), own)
            torch.index_select(own, 0, index, out=kept)
            buffer[:m, :, self._start:end] = kept
        self.pick = [self.pick[i] for i in slots]
        self._m = m
        self._sync()

    def trim(self, first: int) -> None:
        """Drop the first `first` own columns (no row uses them)."""
        self._start, self._n = self._start + first, self._n - first
        self._sync()

    def open(self, pick: list[int], columns: int) -> None:
        """Make room for `len(pick)` rows (variants `pick`) with `columns` own columns ending at this
        layer's last column, zeros on the left of the shorter rows; the next `update` writes theirs
        (their prefill), `commit` adds them to the rows in use."""
        assert self._pending is None
        k, _v = self._buffers()
        rows, width = self._m + len(pick), max(self._n, columns)
        end = self._start + self._n
        if rows > k.shape[0] or width > k.shape[2]:  # no room below or across: a new buffer
            self._reallocate(rows, width, k, at=width - self._n)
            end = width
        elif end < width:  # no room on the left: move right
            self._move(width - self._n)
            end = width
        start = end - width
        for buffer in self._buffers():
            buffer[:self._m, :, start:end - self._n] = 0
            buffer[self._m:rows, :, start:end - columns] = 0
        self._pending = PendingRows(first_row=self._m, end_row=rows, first_column=end - columns, end_column=end,
                                    batch_start=start, pick=list(pick))
        self._written = 0

    def commit(self) -> None:
        """The rows opened for are now in use."""
        p = self._pending
        assert p is not None
        self.pick = self.pick + p.pick
        self._m, self._start, self._n, self._pending = p.end_row, p.batch_start, p.end_column - p.batch_start, None
        self._sync()


def rows_cache(layers: list[RowsLayer] | None = None, scratch: Scratch | None = None, reserve: int = 0,
               limit: int = 0) -> DynamicCache:
    """A cache of `RowsLayer`s: these, or (no shared prefix) one made per decoder layer as it runs."""
    cache = DynamicCache()
    if layers:
        cache.layers = list[Any](layers)
        cache.layer_class_to_replicate = None
    else:
        cache.layers = []
        made: Any = functools.partial(RowsLayer, scratch=scratch, reserve=reserve, limit=limit)
        cache.layer_class_to_replicate = made
    return cache


def cache_layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer entries (each with `keys` and `values` [rows, heads, columns, head_dim])."""
    return list(cache.layers)
