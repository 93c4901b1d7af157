"""The decoding sequences' keys and values, also kept dense: one row per sequence, read without a gather.

Design note. On a CPU the paged attention of a decode step costs mostly its gathers: every layer copies
each sequence's whole context out of the pool's blocks (two ``index_select`` calls of every block of
every row), although all but one slot of it are what the previous step copied already. ``DecodeRows``
keeps that copy between steps instead: layer by layer, ``k[layer]`` and ``v[layer]`` are
[rows, kv heads, capacity, head dim] (SDPA's own layout, each head's keys contiguous), row ``r``
holding the first ``length[r]`` slots of one decoding sequence's context, in position order. A step
writes each decoding sequence's new key and value to the pool (which stays the only truth: prefix
caching, preemption and the KV handoff read it) and to its row, then attends over the rows with one
SDPA call, a view of them and no copy.

A sequence gets a row at its first one-token step, copied from its blocks once (all layers at once:
the pool holds its whole context by then). Its row is let go when a step does not decode it, and when
the engine preempts, ends or aborts it: so a row is only ever read for the run of steps that wrote
it, and a sequence whose blocks changed (a recompute after a preemption) starts a new one. Rows are
kept packed: a row let go is filled with the last one. Everything here is an optimisation: its
absence (``plan`` returning None) leaves the gathers, with the same values.

Memory: the rows take at most ``budget_bytes`` (a quarter of the pool's own memory by default); a step
that would need more (a long context, many rows) goes back to the gathers and the rows are let go. It
is used on a CPU only, where the gathers cost more than the attention they feed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_worker.kv_cache import PagedKVCache

MIN_CAPACITY = 64  # slots of a row at first; doubled while a context needs more
MIN_ROWS = 4  # rows at first; doubled while more sequences decode
BUDGET_FRACTION = 0.25  # of the pool's memory, by default


@dataclass
class DenseStep:
    """How the one-token rows ``0..count-1`` of a step (dense row i is packed row i) use the dense rows."""

    count: int
    writes: torch.Tensor  # [count * kvh]: where each row's new key of each head goes, in ``DecodeRows.flat``
    length: int  # the longest context, new token included
    mask: torch.Tensor | None  # [count, 1, 1, length] (``length_mask``); None when every context is that long


class DecodeRows:
    """The dense rows of the sequences decoding, beside ``cache``; see the note. A step first has its
    one-token rows ``arrange``d (rows kept first, in row order), then ``plan``s with them in that order."""

    def __init__(self, cache: PagedKVCache, budget_bytes: int | None = None) -> None:
        self.cache = cache
        pool = cache.k[0]
        self.heads, self.head_dim = pool.shape[2], pool.shape[3]
        self.slot_bytes = 2 * len(cache.k) * self.heads * self.head_dim * pool.element_size()
        if budget_bytes is None:
            budget_bytes = int(BUDGET_FRACTION * self.slot_bytes * cache.num_blocks * cache.block_size)
        self.budget_bytes = budget_bytes
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows: list[object] = []  # the owner (a sequence) of each row, packed from row 0
        self.length: list[int] = []  # slots filled in each row
        self.capacity = 0  # slots per row
        self.arranged = 0  # the one-token rows ``arrange`` ordered for the next ``plan``; 0: none
        self.positions = torch.arange(0, device=pool.device)  # 0..capacity-1, for masks

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @torch.inference_mode()  # its tensors are made in the engine's forward pass: inference tensors
    def drop(self, owner: object) -> None:
        """Lets ``owner``'s row go (it was preempted, ended or aborted)."""
        for r, held in enumerate(self.rows):
            if held is owner:
                self._remove(r)
                return

    def clear(self) -> None:
        self.rows, self.length, self.arranged = [], [], 0

    @torch.inference_mode()
    def arrange(self, owners: Sequence[object], cached: Sequence[int]) -> list[int] | None:
        """The order in which the one-token rows of ``owners`` (``cached[i]`` slots computed before their
        new token) are to be packed: those holding a row first, in row order, then the others. Rows of
        sequences not among them, or not holding what they need, are let go first. None, and no row
        kept, when they would take more than the budget."""
        wanted = {id(owner): i for i, owner in enumerate(owners)}
        for r in range(len(self.rows) - 1, -1, -1):  # from the end: a hole is filled by a row kept
            i = wanted.get(id(self.rows[r]))
            if i is None or self.length[r] != cached[i]:  # not decoding now, or not what it holds
                self._remove(r)
        if not owners or not self._fit(len(owners), max(cached) + 1):
            self.clear()
            return None
        held = [wanted[id(owner)] for owner in self.rows]
        kept = set(held)
        self.arranged = len(owners)
        return held + [i for i in range(len(owners)) if i not in kept]

    @torch.inference_mode()
    def plan(self, owners: Sequence[object], cached: Sequence[int], device: torch.device | str) -> DenseStep:
        """The step of the one-token rows of ``owners``, in ``arrange``'s order (their block tables are
        ``owners[i].block_table``): the rows not held yet are made, copied from the pool."""
        held, self.arranged = len(self.rows), 0
        assert all(a is b for a, b in zip(self.rows, owners, strict=False)), "rows not arranged"
        if len(owners) > held:
            self._copy_in(owners[held:], cached[held:])
        capacity, heads = self.capacity, self.heads
        writes = [(r * heads + h) * capacity + c for r, c in enumerate(cached) for h in range(heads)]
        self.length = lengths = [c + 1 for c in cached]  # the step writes the new token (``write``)
        longest = max(lengths)
        if min(lengths) == longest:
            writes_t = torch.tensor(writes, dtype=torch.long, device=device)
            return DenseStep(len(owners), writes_t, longest, None)
        both = torch.tensor(writes + lengths, dtype=torch.long, device=device)
        mask = length_mask(self.positions[:longest], both[len(writes):], self.cache.k[0].dtype)
        return DenseStep(len(owners), both[:len(writes)], longest, mask)

    def write(self, layer: int, step: DenseStep, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the new keys and values [count, kvh, hd] (packed order) of ``layer``."""
        self.flat(self.k[layer]).index_copy_(0, step.writes, k.reshape(-1, self.head_dim))
        self.flat(self.v[layer]).index_copy_(0, step.writes, v.reshape(-1, self.head_dim))

    def flat(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense`` [rows, kvh, capacity, hd] as [rows * kvh * capacity, hd] (a view)."""
        return dense.view(-1, self.head_dim)

    def read(self, layer: int, step: DenseStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the rows, each [count, kvh, length, hd] (dense order): views, no copy."""
        rows, length = step.count, step.length
        return self.k[layer][:rows, :, :length], self.v[layer][:rows, :, :length]

    # -- rows -----------------------------------------------------------------------------------------
    def _remove(self, r: int) -> None:
        last = len(self.rows) - 1
        if r != last:  # the last row fills the hole
            filled = self.length[last]
            for pool in (*self.k, *self.v):
                pool[r, :, :filled] = pool[last, :, :filled]
            self.rows[r], self.length[r] = self.rows[last], filled
        self.rows.pop()
        self.length.pop()

    def _fit(self, rows: int, longest: int) -> bool:
        """Room for ``rows`` rows of ``longest`` slots, within the budget (grown if need be)."""
        if rows <= (self.k[0].size(0) if self.k else 0) and longest <= self.capacity:
            return True
        capacity = max(self.capacity, MIN_CAPACITY)
        while capacity < longest:
            capacity *= 2
        num_rows = self.k[0].size(0) if self.k else 0
        num_rows = max(rows, 2 * num_rows, MIN_ROWS) if rows > num_rows else num_rows
        if num_rows * capacity * self.slot_bytes > self.budget_bytes:
            self.k, self.v, self.capacity = [], [], 0
            return False
        pool = self.cache.k[0]
        shape = (num_rows, self.heads, capacity, self.head_dim)
        grown_k = [torch.zeros(shape, dtype=pool.dtype, device=pool.device) for _ in self.cache.k]
        grown_v = [torch.zeros(shape, dtype=pool.dtype, device=pool.device) for _ in self.cache.v]
        for new, old in zip((*grown_k, *grown_v), (*self.k, *self.v), strict=False):
            new[:old.size(0), :, :self.capacity] = old
        self.k, self.v, self.capacity = grown_k, grown_v, capacity
        self.positions = torch.arange(capacity, device=pool.device)
        return True

    def _copy_in(self, owners: list[object], cached: list[int]) -> None:
        """New rows for ``owners``, their first ``cached`` slots copied from their blocks (every layer)."""
        bs, heads, capacity, sources, targets = self.cache.block_size, self.heads, self.capacity, [], []
        for owner, length in zip(owners, cached, strict=True):
            r = len(self.rows)
            table = owner.block_table
            sources.extend(table[p // bs] * bs + p % bs for p in range(length))
            targets.extend((r * heads + h) * capacity + p for p in range(length) for h in range(heads))
            self.rows.append(owner)
            self.length.append(length)
        if not sources:
            return
        device = self.cache.k[0].device
        src = torch.tensor(sources, dtype=torch.long, device=device)
        dst = torch.tensor(targets, dtype=torch.long, device=device)
        for dense, pool in zip((*self.k, *self.v), (*self.cache.k, *self.cache.v), strict=True):
            rows = pool.view(-1, self.heads, self.head_dim).index_select(0, src)  # [slots, kvh, hd]
            self.flat(dense).index_copy_(0, dst, rows.view(-1, self.head_dim))


def length_mask(positions: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's mask [D, 1, 1, S] for one query per row over ``positions`` [S] (0..S-1) of rows of ``lengths``
    [D] keys: added to the scores, 0 where a row has a key and -inf past its length (a float mask: SDPA
    takes it as it is, where it turns a boolean one into this in every call)."""
    past = positions[None, :] >= lengths[:, None]  # [D, S]
    return torch.zeros((), dtype=dtype, device=past.device).masked_fill(past, float("-inf"))[:, None, None, :]
