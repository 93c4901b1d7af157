"""On a CPU the batching engine's decodes read their context from dense rows (``gpu_worker.decode_rows``)
instead of gathering it from the pool's blocks at every step: the rows hold bit for bit what the pool
holds, outputs are those of the gathers (and of each request alone) through staggered arrivals,
preemptions, cancels, skewed lengths and a budget too small for them, and a row is let go as soon as its
sequence stops decoding."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.decode_rows import DecodeRows
from gpu_worker.engine import Engine
from gpu_worker.kv_cache import CacheShape, PagedKVCache
from scheduler.messages import SamplingParams
from tests.batching import Job, alone, assert_drained, mixed_jobs, run_batch

ROOMY = 1 << 30  # a budget no test reaches


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


def with_rows(engine: Engine, capacity: EngineCapacity, budget_bytes: int = ROOMY) -> BatchEngine:
    batch = BatchEngine(engine, capacity)
    batch.decode_rows = DecodeRows(batch.cache, budget_bytes)
    return batch


def gathering(engine: Engine, capacity: EngineCapacity) -> BatchEngine:
    batch = BatchEngine(engine, capacity)
    batch.decode_rows = None  # every decode gathers its context from the blocks
    return batch


def test_a_cpu_engine_keeps_dense_rows_within_a_quarter_of_its_pool(engine: Engine) -> None:
    batch = BatchEngine(engine, EngineCapacity(num_kv_blocks=64, block_size=16))
    rows = batch.decode_rows
    assert rows is not None
    assert rows.budget_bytes == rows.slot_bytes * 64 * 16 // 4


CAPACITIES = {
    "default": EngineCapacity(),
    "tight-token-budget": EngineCapacity(max_num_batched_tokens=5),
    "two-seqs": EngineCapacity(max_num_seqs=2),
}


@pytest.mark.parametrize("capacity", CAPACITIES.values(), ids=CAPACITIES.keys())
def test_outputs_are_those_of_the_gathers_and_of_each_request_alone(engine: Engine,
                                                                     capacity: EngineCapacity) -> None:
    jobs = mixed_jobs(8, max_tokens=10)
    dense = with_rows(engine, capacity)
    most_rows = []
    outputs = run_batch(dense, jobs, after_step=lambda n, out: most_rows.append(dense.decode_rows.num_rows))
    assert outputs == run_batch(gathering(engine, capacity), jobs)
    for job in jobs:
        assert outputs[job.request_id] == alone(engine, job), job
    assert max(most_rows) == min(capacity.max_num_seqs, 8) or capacity.max_num_batched_tokens < 8
    assert max(most_rows) > 1
    assert_drained(dense)
    assert dense.decode_rows.num_rows == 0


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_preempted_requests_start_new_rows_and_end_like_their_runs_alone(engine: Engine,
                                                                        prefix_caching: bool) -> None:
    capacity = EngineCapacity(num_kv_blocks=12, block_size=4, enable_prefix_caching=prefix_caching)
    jobs = [Job("greedy-a", "Hi", SamplingParams(max_tokens=22)),
            Job("seeded-b", "héllo", SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5)),
            Job("greedy-c", "abcdefg", SamplingParams(max_tokens=18)),
            Job("greedy-e", "x", SamplingParams(max_tokens=16))]
    batch = with_rows(engine, capacity)
    most_rows = []
    outputs = run_batch(batch, jobs, after_step=lambda n, out: most_rows.append(batch.decode_rows.num_rows))
    assert batch.stats.preemptions > 0 and max(most_rows) > 1
    for job in jobs:
        assert outputs[job.request_id] == alone(engine, job), job
    assert outputs == run_batch(gathering(engine, capacity), jobs)
    assert_drained(batch)
    assert batch.decode_rows.num_rows == 0


def test_the_rows_hold_bit_for_bit_what_the_pool_holds(engine: Engine) -> None:
    batch = with_rows(engine, EngineCapacity(block_size=4, num_kv_blocks=256))
    checked = []

    def compare(number: int, outputs) -> None:
        rows, cache = batch.decode_rows, batch.cache
        for r, seq in enumerate(rows.rows):
            length = rows.length[r]
            assert length == seq.num_computed
            slots = torch.tensor([seq.block_table[p // 4] * 4 + p % 4 for p in range(length)])
            for layer in range(len(cache.k)):
                for dense, pool in ((rows.k[layer], cache.k[layer]), (rows.v[layer], cache.v[layer])):
                    expected = pool.view(-1, *pool.shape[2:]).index_select(0, slots)
                    assert torch.equal(dense[r, :, :length], expected.transpose(0, 1))
            checked.append(seq.request_id)

    run_batch(batch, mixed_jobs(6, max_tokens=12), after_step=compare)
    assert len(set(checked)) == 6


def test_a_skewed_batch_gathers_and_gets_the_same_outputs(engine: Engine) -> None:
    """A long context beside short ones would make every row pay for it: those steps gather instead."""
    long = Job("long", "A much longer prompt that runs on and on. " * 8, SamplingParams(max_tokens=12))
    jobs = [*mixed_jobs(4, max_tokens=12), long]
    batch = with_rows(engine, EngineCapacity())
    skewed = []

    def watch(number: int, outputs) -> None:
        if batch.num_running > 1 and batch.decode_rows.num_rows == 0:
            skewed.append(number)

    outputs = run_batch(batch, jobs, after_step=watch)
    assert skewed, "no step gathered"
    for job in jobs:
        assert outputs[job.request_id] == alone(engine, job), job
    assert_drained(batch)


def test_rows_beyond_the_budget_give_way_to_the_gathers(engine: Engine) -> None:
    capacity = EngineCapacity()
    probe = with_rows(engine, capacity)
    tight = with_rows(engine, capacity, budget_bytes=probe.decode_rows.slot_bytes * 64 * 2)  # 2 rows of 64
    rows_seen = []
    jobs = mixed_jobs(6, max_tokens=10)
    outputs = run_batch(tight, jobs, after_step=lambda n, out: rows_seen.append(tight.decode_rows.num_rows))
    assert max(rows_seen) <= 2
    assert 0 in rows_seen[3:]  # three decoding at once: none kept
    assert outputs == run_batch(gathering(engine, capacity), jobs)


def test_a_cancelled_request_lets_its_row_go_at_once(engine: Engine) -> None:
    batch = with_rows(engine, EngineCapacity())
    jobs = mixed_jobs(4, max_tokens=20)
    cancelled = []

    def cancel(number: int, outputs) -> None:
        held = {seq.request_id for seq in batch.decode_rows.rows}
        if number == 8:
            assert "req-1" in held
            batch.cancel("req-1")
        if number == 9:
            assert "req-1" not in held and batch.decode_rows.num_rows == batch.num_running
            cancelled.append(True)

    run_batch(batch, jobs, after_step=cancel)
    assert cancelled
    assert_drained(batch)
    assert batch.decode_rows.num_rows == 0


def test_a_row_that_does_not_hold_what_its_sequence_has_computed_is_made_again() -> None:
    """Whatever made a sequence's computed tokens and its row disagree (a recompute the engine did not tell
    of), its row is copied from the pool again rather than read as it is."""
    cache = PagedKVCache(CacheShape(num_layers=2, num_kv_heads=2, head_dim=4), num_blocks=8, block_size=4)
    for layer in range(2):
        values = torch.arange(cache.k[layer].numel(), dtype=torch.float32)
        cache.k[layer].copy_(values.view_as(cache.k[layer]))
        cache.v[layer].copy_(-cache.k[layer])

    class Owner:
        block_table = [5, 2]

    rows, owner = DecodeRows(cache, ROOMY), Owner()
    assert rows.arrange([owner], [6]) == [0]
    rows.plan([owner], [6], "cpu")
    with torch.inference_mode():  # as the engine's forward pass
        rows.k[0][0, :, :6] = 0  # not what the pool holds any more
    assert rows.arrange([owner], [7]) == [0]  # it holds 7 slots (the step wrote one): kept
    assert rows.arrange([owner], [5]) == [0] and rows.num_rows == 0  # 5 computed now: let go
    rows.plan([owner], [5], "cpu")
    expected = cache.k[0].view(-1, 2, 4)[torch.tensor([20, 21, 22, 23, 8])]
    assert torch.equal(rows.k[0][0, :, :5], expected.transpose(0, 1))
