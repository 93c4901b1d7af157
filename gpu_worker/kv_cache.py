"""The paged KV cache: a pool of fixed-size blocks per layer, and the block manager that lends them.

Design note (after nano-vllm's block manager and vLLM's prefix caching; our own code). A sequence's
keys and values live in blocks of ``block_size`` token slots; its block table lists them in order, so
token ``p`` of the sequence sits in slot ``table[p // block_size] * block_size + p % block_size`` of
every layer's pool. Blocks are reference counted. A block that is full and computed gets a key: a
hash chained over its tokens and the key of the block before it, so equal keys mean equal prefixes.
When a sequence is admitted, the leading full blocks of what it needs computed are looked up by key;
a hit shares the block (its reference count goes up) and skips that part of the prefill. A block whose
count falls to zero goes to the back of the free list but keeps its key, so a later sequence with the
same prefix can still take it back; it is only forgotten when the free list hands it out again
(eviction is lazy, least recently freed first). A key is registered only once the block's keys and
values have been computed, so nobody can hit a block a chunked prefill has not written yet.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class KVCacheFull(RuntimeError):
    """No free block is left for a sequence that needs one (the engine preempts and tries again)."""


@dataclass(frozen=True)
class CacheShape:
    """What one token's keys and values take in every layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    def bytes_per_block(self, block_size: int) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element  # k and v


class PagedKVCache:
    """The pool: ``k[layer]`` and ``v[layer]`` are [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one slot, got "
                             f"num_blocks={num_blocks}, block_size={block_size}")
        dims = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        self.k = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.v = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the keys/values [N, kvh, hd] of N tokens at their ``slots`` [N] of ``layer``."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the blocks in ``tables`` [B, M]: each [B, kvh, M * block_size, hd]."""
        B, M = tables.shape
        flat = tables.reshape(-1)  # [B * M]
        k = self.k[layer].index_select(0, flat).view(B, M * self.block_size, *self.k[layer].shape[2:])
        v = self.v[layer].index_select(0, flat).view(B, M * self.block_size, *self.v[layer].shape[2:])
        return k.transpose(1, 2), v.transpose(1, 2)  # each [B, kvh, S, hd]


def block_key(previous: int | None, tokens: Sequence[int]) -> int:
    """The key of a full block holding ``tokens`` after the block keyed ``previous`` (None: first)."""
    return hash((previous, tuple(tokens)))


class BlockManager:
    """Lends the pool's blocks to sequences: allocation, growth, freeing, and prefix sharing.

    A sequence is anything with ``block_table`` (list of block ids), ``block_keys`` (keys of its
    leading registered blocks) and ``token_ids``; the engine's ``Sequence`` is one.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.keys: list[int | None] = [None] * num_blocks  # a full block's key once computed
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # what the key was made of
        self.by_key: dict[int, int] = {}  # key -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # FIFO
        self.num_lookups = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # of which found there

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some may still hold a cached prefix, given back on demand)."""
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def hit_rate(self) -> float | None:
        """Tokens found in the prefix cache / tokens looked up; None before any lookup."""
        return self.num_hits / self.num_lookups if self.num_lookups else None

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, seq, num_tokens: int, lookup: bool = True) -> int:
        """Gives ``seq`` (holding no block) the blocks for its first ``num_tokens`` tokens, sharing
        cached full blocks of its prefix (unless not ``lookup``: its keys and values come from
        elsewhere). Returns how many leading tokens are already computed.

        The last token is never taken from the cache: its logits are what the prefill is for.
        """
        assert not seq.block_table, "allocate is for a sequence that holds no block"
        needed = self.blocks_for(num_tokens)
        if needed > len(self.free):
            raise KVCacheFull(f"{needed} blocks needed, {len(self.free)} free")
        cached = self._cached_prefix(seq, num_tokens) if self.enable_prefix_caching and lookup else []
        for block in cached:
            self._take(block)
        seq.block_table.extend(cached)
        seq.block_keys.extend(self.keys[b] for b in cached)
        for _ in range(needed - len(cached)):
            seq.block_table.append(self._take_free())
        return len(cached) * self.block_size

    def _cached_prefix(self, seq, num_tokens: int) -> list[int]:
        """Block ids of the longest cached run of ``seq``'s leading full blocks (before its last token)."""
        lookable = (num_tokens - 1) // self.block_size  # full blocks wholly before the last token
        self.num_lookups += num_tokens
        found: list[int] = []
        key = None
        for i in range(lookable):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            key = block_key(key, tokens)
            block = self.by_key.get(key)
            if block is None or self.tokens[block] != tokens:  # a miss (or a hash collision) ends the run
                break
            found.append(block)
        self.num_hits += len(found) * self.block_size
        return found

    def grow(self, seq, num_tokens: int) -> bool:
        """Makes room in ``seq``'s blocks for ``num_tokens`` tokens in all; False when the pool has
        too few free blocks (nothing is taken then)."""
        more = self.blocks_for(num_tokens) - len(seq.block_table)
        if more > len(self.free):
            return False
        for _ in range(more):
            seq.block_table.append(self._take_free())
        return True

    def register_computed(self, seq, num_computed: int) -> None:
        """Keys the blocks of ``seq`` that are now full and computed, so others can share them."""
        if not self.enable_prefix_caching:
            return
        full = num_computed // self.block_size
        for i in range(len(seq.block_keys), full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            key = block_key(seq.block_keys[-1] if seq.block_keys else None, tokens)
            seq.block_keys.append(key)
            block = seq.block_table[i]
            if key in self.by_key:  # computed twice at once: the first copy stays the shared one
                continue
            self.keys[block], self.tokens[block] = key, tokens
            self.by_key[key] = block

    def free_blocks(self, seq) -> None:
        """Returns ``seq``'s blocks, last first, so that its prefix blocks are evicted last."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed more often than taken"
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.block_keys.clear()

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.keys[block] is not None:  # evicts the cached prefix it held
            if self.by_key.get(self.keys[block]) == block:
                del self.by_key[self.keys[block]]
            self.keys[block] = self.tokens[block] = None
        self.ref_counts[block] = 1
        return block
