"""The packed forward pass over a paged KV cache gives the logits a dense full recompute of each
sequence would: packed prefills of different lengths, decode steps of the batch, prefill chunks after
cached tokens, at any block size and with block tables scattered over the pool in any order."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.attention import PagedAttention, SequenceChunk, order_for_step
from gpu_worker.kv_cache import PagedKVCache
from gpu_worker.model import GPT, build_model

ATOL = 1e-4
BLOCK_SIZES = [1, 4, 16]
LAYOUTS = ["contiguous", "shuffled"]
MAX_LEN = 40  # tokens any sequence of these tests reaches at most


@pytest.fixture(scope="module")
def model() -> GPT:
    return build_model()


class Pool:
    """A paged cache and the block tables of its sequences: each sequence gets the blocks for
    ``MAX_LEN`` tokens up front, in pool order ("contiguous") or shuffled and interleaved."""

    def __init__(self, model: GPT, num_seqs: int, block_size: int, layout: str) -> None:
        per_seq = -(-MAX_LEN // block_size)
        num_blocks = num_seqs * per_seq + 3  # a few blocks nobody uses
        ids = list(range(num_blocks))
        if layout == "shuffled":
            random.Random(block_size).shuffle(ids)
        self.cache = PagedKVCache(model.cache_shape(), num_blocks, block_size)
        self.tables = [ids[i * per_seq:(i + 1) * per_seq] for i in range(num_seqs)]
        if layout == "shuffled":
            assert any(table != sorted(table) for table in self.tables)


@torch.inference_mode()
def packed_step(model: GPT, pool: Pool, rows: list[list[int]], num_cached: list[int],
                num_new: list[int]) -> list[torch.Tensor]:
    """One packed forward pass computing ``num_new[i]`` tokens of ``rows[i]`` after ``num_cached[i]``
    (a 0 skips the sequence); the logits [num_new, V] of every computed token, per sequence."""
    picked = [i for i in range(len(rows)) if num_new[i]]
    chunks = [SequenceChunk(pool.tables[i], num_cached[i], num_new[i]) for i in picked]
    order = order_for_step(chunks)
    token_ids: list[int] = []
    positions: list[int] = []
    starts: dict[int, int] = {}
    for j in order:
        i = picked[j]
        starts[i] = len(token_ids)
        token_ids.extend(rows[i][num_cached[i]:num_cached[i] + num_new[i]])
        positions.extend(range(num_cached[i], num_cached[i] + num_new[i]))
    attention = PagedAttention.build(pool.cache, [chunks[j] for j in order], "cpu")
    logits = model.forward_packed(torch.tensor(token_ids), torch.tensor(positions), attention,
                                  torch.arange(len(token_ids)))  # [N, V]: every row, to check them all
    return [logits[starts[i]:starts[i] + num_new[i]] if num_new[i] else logits[:0] for i in range(len(rows))]


@torch.inference_mode()
def assert_like_full_recompute(model: GPT, rows: list[list[int]], num_cached: list[int],
                               logits: list[torch.Tensor]) -> None:
    for row, cached, got in zip(rows, num_cached, logits, strict=True):
        if len(got):
            expected = model(torch.tensor([row]))[0, cached:cached + len(got)]  # [T, V]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def prompts(lengths: list[int]) -> list[list[int]]:
    return [[(31 * s + 7 * i + 3) % 256 for i in range(n)] for s, n in enumerate(lengths)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_a_packed_prefill_then_decode_steps_match_full_recompute(model: GPT, block_size: int,
                                                                layout: str) -> None:
    rows = prompts([5, 17, 2, 11])
    pool = Pool(model, len(rows), block_size, layout)
    cached = [0] * len(rows)
    # Step 1: every prompt prefilled in one packed pass.
    logits = packed_step(model, pool, rows, cached, [len(r) for r in rows])
    assert_like_full_recompute(model, rows, cached, logits)
    # Steps 2..n: one greedy token per sequence, their contexts of different lengths.
    for _ in range(6):
        for i, row in enumerate(rows):
            cached[i] = len(row)
            row.append(int(logits[i][-1].argmax()))
        logits = packed_step(model, pool, rows, cached, [1] * len(rows))
        assert_like_full_recompute(model, rows, cached, logits)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_steps_of_equally_long_sequences_match_full_recompute(model: GPT, block_size: int) -> None:
    rows = prompts([9, 9, 9])
    pool = Pool(model, len(rows), block_size, "shuffled")
    packed_step(model, pool, rows, [0, 0, 0], [9, 9, 9])
    for step in range(5):
        for row in rows:
            row.append((row[-1] * 5 + step) % 256)
        cached = [len(r) - 1 for r in rows]
        logits = packed_step(model, pool, rows, cached, [1, 1, 1])
        assert_like_full_recompute(model, rows, cached, logits)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefill_chunks_after_cached_tokens_match_full_recompute(model: GPT, block_size: int,
                                                                 layout: str) -> None:
    """A long prompt in chunks of 6, 1, 13 and 9 tokens, packed each time with another sequence's
    decode step and a third sequence's own prefill chunks."""
    rows = prompts([29, 4, 15])
    pool = Pool(model, len(rows), block_size, layout)
    cached = [0, 0, 0]
    for chunk_sizes in ([6, 4, 5], [1, 1, 7], [13, 1, 3], [9, 1, 0]):
        logits = packed_step(model, pool, rows, cached, chunk_sizes)
        assert_like_full_recompute(model, rows, cached, logits)
        for i, n in enumerate(chunk_sizes):
            cached[i] += n
            if cached[i] == len(rows[i]):  # prefill done: the next step decodes its greedy token
                rows[i].append(int(logits[i][-1].argmax()))
    assert cached == [29, 7, 15]


def test_blocks_nobody_holds_are_left_untouched(model: GPT) -> None:
    pool = Pool(model, 2, 4, "shuffled")
    held = {b for table in pool.tables for b in table}
    rows = prompts([MAX_LEN - 1, 3])
    packed_step(model, pool, rows, [0, 0], [MAX_LEN - 1, 3])
    for layer in range(model.config.n_layer):
        for block in set(range(pool.cache.num_blocks)) - held:
            assert not pool.cache.k[layer][block].any() and not pool.cache.v[layer][block].any()


@torch.inference_mode()
def test_decode_rows_of_very_different_lengths_attend_in_groups_and_match(model: GPT) -> None:
    rows = prompts([3, 4, 150, 160])
    block_size = 4
    cache = PagedKVCache(model.cache_shape(), 120, block_size)
    tables, start = [], 0
    for row in rows:
        width = -(-(len(row) + 1) // block_size)
        tables.append(list(range(start, start + width)))
        start += width
    prefill = [SequenceChunk(t, 0, len(r)) for t, r in zip(tables, rows, strict=True)]
    model.forward_packed(torch.tensor(sum(rows, [])), torch.tensor([p for r in rows for p in range(len(r))]),
                         PagedAttention.build(cache, prefill, "cpu"), torch.tensor([0]))
    for i, row in enumerate(rows):
        row.append((7 * i + 1) % 256)
    decode = [SequenceChunk(t, len(r) - 1, 1) for t, r in zip(tables, rows, strict=True)]
    order = order_for_step(decode)
    attention = PagedAttention.build(cache, [decode[i] for i in order], "cpu")
    assert [(g.start, g.end) for g in attention.groups] == [(0, 2), (2, 4)]  # short ones pay no padding
    logits = model.forward_packed(torch.tensor([rows[i][-1] for i in order]),
                                  torch.tensor([len(rows[i]) - 1 for i in order]), attention, torch.arange(4))
    for slot, i in enumerate(order):
        torch.testing.assert_close(logits[slot], model(torch.tensor([rows[i]]))[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [4, 16])
def test_fresh_prompts_of_one_length_attend_together_and_match(model: GPT, block_size: int) -> None:
    """Three fresh prompts of 7 tokens (one SDPA call over the step's own keys), two of 5, one of 7 after
    cached tokens (a chunk of its own) and a decode row, all in one step, then decoding together."""
    rows = prompts([7, 5, 7, 12, 7, 5, 3])
    pool = Pool(model, len(rows), block_size, "shuffled")
    packed_step(model, pool, rows, [0] * 7, [0, 0, 0, 5, 0, 0, 3])  # the chunked one, and the decoder
    rows[6].append(11)
    cached = [0, 0, 0, 5, 0, 0, 3]
    new = [7, 5, 7, 7, 7, 5, 1]
    chunks = [SequenceChunk(pool.tables[i], cached[i], new[i]) for i in range(7)]
    attention = PagedAttention.build(pool.cache, [chunks[i] for i in order_for_step(chunks)], "cpu")
    assert [(f.count, f.length) for f in attention.fresh] == [(2, 5), (3, 7)]
    logits = packed_step(model, pool, rows, cached, new)
    assert_like_full_recompute(model, rows, cached, logits)
    for _ in range(3):
        for i, row in enumerate(rows):
            cached[i] = len(row)
            row.append(int(logits[i][-1].argmax()))
        logits = packed_step(model, pool, rows, cached, [1] * len(rows))
        assert_like_full_recompute(model, rows, cached, logits)
