"""Attention over the paged KV cache for one packed step, in plain PyTorch (SDPA).

Design note. A step packs every scheduled sequence's new tokens into one flat batch of N tokens:
first the sequences that compute one token (decodes, and prefill chunks of one token), then the
longer prefill chunks, each contiguous. Linear layers run on all N tokens at once; only attention
depends on the sequence. Each layer writes the step's keys and values into the pool at their slots,
then reads each sequence's whole context back through its block table:

- the one-token rows together, sorted by context length and cut into groups whose longest context is
  at most about twice their shortest (so one long context does not make every row pay for it): a
  group's block tables, padded to its longest, gather a [D, S] context; a mask hides each row's slots
  past its own length; one SDPA call a group.
- fresh prompts (nothing cached before them) of equal length T together, k of them in one causal
  SDPA call over the step's own keys and values ([k, heads, T, hd]): nothing to gather.
- each other longer chunk by itself: its context of L slots, queries the last T of them, causally.

Everything here that does not depend on the layer (slots, tables, masks) is built once per step by
``PagedAttention.build``, so that a layer costs two gathers and one SDPA call per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gpu_worker.kv_cache import PagedKVCache

GROUP_SLACK = 64  # positions a group's longest context may exceed twice its shortest


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of a step: ``num_new`` tokens appended after ``num_cached`` computed ones."""

    block_table: Sequence[int]
    num_cached: int
    num_new: int

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass
class _Rows:
    """One-token rows ``start..end-1`` of similar context length, attended together."""

    start: int
    end: int
    tables: torch.Tensor  # [D, M] block ids, padded with block 0 (masked)
    length: int  # S: the longest context of the group
    mask: torch.Tensor | None  # [D, 1, 1, S], None when every row has the longest context


@dataclass
class _Chunk:
    start: int  # first row of the chunk in the packed batch
    end: int
    table: torch.Tensor  # [M] block ids covering the context
    context_len: int
    mask: torch.Tensor | None  # [T, L], None when the chunk is the whole context (plain causal)


@dataclass
class _Fresh:
    """``count`` fresh prompts of ``length`` tokens each, packed one after the other from row ``start``."""

    start: int
    count: int
    length: int


class PagedAttention:
    """How the N tokens of one step attend; shared by every layer of the forward pass."""

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, num_single: int, groups: list[_Rows],
                 chunks: list[_Chunk], fresh: list[_Fresh] | None = None) -> None:
        self.cache = cache
        self.slots = slots  # [N]
        self.num_single = num_single  # rows 0..num_single-1 are one-token sequences
        self.groups = groups  # of those rows
        self.chunks = chunks
        self.fresh = fresh or []

    @classmethod
    def build(cls, cache: PagedKVCache, chunks: Sequence[SequenceChunk],
              device: torch.device | str) -> PagedAttention:
        """The plan for a step whose packed rows follow ``chunks`` in order. One-token chunks must
        come first (``order_for_step`` sorts them so)."""
        bs = cache.block_size
        slots: list[int] = []
        for chunk in chunks:
            table = chunk.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(chunk.num_cached, chunk.context_len))
        num_single = 0
        while num_single < len(chunks) and chunks[num_single].num_new == 1:
            num_single += 1
        groups = [_rows(start, end, chunks[start:end], bs, device)
                  for start, end in _similar_lengths(chunks[:num_single])]
        planned, fresh, row = [], [], num_single
        for chunk in chunks[num_single:]:
            assert chunk.num_new > 1, "one-token chunks must come first"
            if chunk.num_cached == 0:  # a whole prompt: its keys are the step's own
                last = fresh[-1] if fresh else None
                if last and last.length == chunk.num_new and last.start + last.count * last.length == row:
                    last.count += 1
                else:
                    fresh.append(_Fresh(row, 1, chunk.num_new))
                row += chunk.num_new
                continue
            width = -(-chunk.context_len // bs)
            table = torch.tensor(list(chunk.block_table[:width]), dtype=torch.long, device=device)
            mask = None
            if chunk.num_cached:
                keys = torch.arange(chunk.context_len, device=device)  # [L]
                queries = torch.arange(chunk.num_cached, chunk.context_len, device=device)  # [T]
                mask = keys[None, :] <= queries[:, None]  # [T, L]
            planned.append(_Chunk(row, row + chunk.num_new, table, chunk.context_len, mask))
            row += chunk.num_new
        return cls(cache, torch.tensor(slots, dtype=torch.long, device=device), num_single, groups, planned,
                   fresh)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output [N, nh, hd] for queries [N, nh, hd]; ``k``/``v`` [N, kvh, hd] are the step's
        new keys and values, stored in the pool first."""
        self.cache.write(layer, self.slots, k, v)
        if len(self.groups) == 1 and self.num_single == q.size(0) and not self.chunks:
            return self._singles(layer, q, self.groups[0])
        out = torch.empty_like(q)  # [N, nh, hd]
        for group in self.groups:
            out[group.start:group.end] = self._singles(layer, q[group.start:group.end], group)
        for fresh in self.fresh:
            rows = slice(fresh.start, fresh.start + fresh.count * fresh.length)
            queries, keys, values = (t[rows].unflatten(0, (fresh.count, fresh.length)).transpose(1, 2)
                                     for t in (q, k, v))  # [count, heads, T, hd]
            y = _sdpa(queries, keys, values, None, causal=True)  # [count, nh, T, hd]
            out[rows] = y.transpose(1, 2).flatten(0, 1)
        for chunk in self.chunks:
            keys, values = self.cache.gather(layer, chunk.table[None])  # each [1, kvh, M*bs, hd]
            keys, values = keys[:, :, :chunk.context_len], values[:, :, :chunk.context_len]
            queries = q[chunk.start:chunk.end].transpose(0, 1)[None]  # [1, nh, T, hd]
            y = _sdpa(queries, keys, values, chunk.mask, causal=chunk.mask is None)  # [1, nh, T, hd]
            out[chunk.start:chunk.end] = y[0].transpose(0, 1)
        return out

    def _singles(self, layer: int, q: torch.Tensor, group: _Rows) -> torch.Tensor:
        keys, values = self.cache.gather(layer, group.tables)  # each [D, kvh, M*bs, hd]
        keys, values = keys[:, :, :group.length], values[:, :, :group.length]  # each [D, kvh, S, hd]
        y = _sdpa(q[:, :, None], keys, values, group.mask, causal=False)  # [D, nh, 1, hd]
        return y[:, :, 0]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool) -> torch.Tensor:
    # grouped-query attention (each kv head serves a group of query heads) without copying k and v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.size(1) != q.size(1))


def _similar_lengths(singles: Sequence[SequenceChunk]) -> list[tuple[int, int]]:
    """(start, end) ranges of ``singles`` (sorted by context length) whose longest context is at most
    twice their shortest, plus some slack: few groups, and none much padded."""
    ranges, start = [], 0
    for i in range(1, len(singles)):
        if singles[i].context_len > 2 * singles[start].context_len + GROUP_SLACK:
            ranges.append((start, i))
            start = i
    return [*ranges, (start, len(singles))] if singles else []


def _rows(start: int, end: int, singles: Sequence[SequenceChunk], bs: int,
          device: torch.device | str) -> _Rows:
    lengths = [c.context_len for c in singles]
    longest = max(lengths)
    width = -(-longest // bs)
    padded = [list(c.block_table[:width]) + [0] * (width - min(width, len(c.block_table))) for c in singles]
    mask = None
    if min(lengths) != longest:  # else every row sees the first ``longest`` slots: no mask
        positions = torch.arange(longest, device=device)  # [S]
        visible = positions[None, :] < torch.tensor(lengths, device=device)[:, None]  # [D, S]
        mask = visible[:, None, None, :]  # [D, 1, 1, S]
    return _Rows(start, end, torch.tensor(padded, dtype=torch.long, device=device), longest, mask)


def order_for_step(chunks: Sequence) -> list[int]:
    """Indices of ``chunks`` (anything with ``num_new`` and ``context_len``): the one-token ones first,
    shortest context first (``_similar_lengths`` groups them), then the longer chunks by length, so that
    fresh prompts of one length sit side by side and attend in one call."""
    def key(i: int) -> tuple:
        chunk = chunks[i]
        if chunk.num_new == 1:
            return (0, chunk.context_len)
        return (1, chunk.num_new, chunk.context_len != chunk.num_new)  # fresh ones first among equals

    return sorted(range(len(chunks)), key=key)
