"""Requests with a common prompt prefix share its KV blocks instead of computing them again, with the
same outputs as without sharing; and the block manager's bookkeeping behind it (reference counts, lazy
eviction, the last prompt token, registration once computed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.kv_cache import BlockManager, KVCacheFull
from gpu_worker.steps import GenerationStep
from scheduler.messages import SamplingParams
from tests.batching import Job, alone, assert_drained, computed_tokens, run_batch

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and exactly. "  # 57 tokens: 3 full blocks of 16
SHARED = [Job(f"q{i}", SYSTEM_PROMPT + question, SamplingParams(max_tokens=5, seed=i, temperature=i % 2))
          for i, question in enumerate(["What is 2+2?", "Name a colour.", "Où est Paris?", "Why?"])]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


def run_counting(engine: Engine, capacity: EngineCapacity, jobs: list[Job]
                 ) -> tuple[BatchEngine, dict[str, list[GenerationStep]], int]:
    """Runs ``jobs`` one per step; also returns how many tokens the forward passes computed."""
    batch = BatchEngine(engine, capacity)
    with computed_tokens(engine) as computed:
        outputs = run_batch(batch, jobs)
    return batch, outputs, sum(computed)


def test_a_shared_prefix_is_computed_once_and_changes_no_output(engine: Engine) -> None:
    on, on_outputs, on_computed = run_counting(engine, EngineCapacity(), SHARED)
    off, off_outputs, off_computed = run_counting(engine, EngineCapacity(enable_prefix_caching=False), SHARED)
    assert on_outputs == off_outputs == {job.request_id: alone(engine, job) for job in SHARED}
    prefix_blocks = len(SYSTEM_PROMPT) // 16
    assert on.blocks.num_hits == (len(SHARED) - 1) * prefix_blocks * 16  # all but the first hit the prefix
    assert on_computed == off_computed - on.blocks.num_hits
    assert 0 < on.blocks.hit_rate < 1
    assert off.blocks.hit_rate is None and off.blocks.num_hits == 0
    assert_drained(on)
    assert_drained(off)


def test_the_hit_rate_is_none_before_any_lookup_and_zero_without_shared_prefixes(engine: Engine) -> None:
    batch = BatchEngine(engine)
    assert batch.blocks.hit_rate is None
    outputs = run_batch(batch, [Job("a", "Nothing in common here " * 2, SamplingParams(max_tokens=3)),
                                Job("b", "and different prefixes " * 2, SamplingParams(max_tokens=3))])
    assert all(len(steps) == 3 for steps in outputs.values())
    assert batch.blocks.hit_rate == 0


def test_identical_prompts_with_caching_on_and_off_give_the_same_outputs(engine: Engine) -> None:
    prompt = "Repeat after me: " * 3 + "!"  # 52 tokens: 13 full blocks, the last one ending the prompt
    jobs = [Job(f"same-{i}", prompt, SamplingParams(max_tokens=4, temperature=0.8, seed=i)) for i in range(4)]
    capacity = EngineCapacity(block_size=4, num_kv_blocks=64)
    on, on_outputs, on_computed = run_counting(engine, capacity, jobs)
    _, off_outputs, off_computed = run_counting(
        engine, EngineCapacity(block_size=4, num_kv_blocks=64, enable_prefix_caching=False), jobs)
    assert on_outputs == off_outputs == {job.request_id: alone(engine, job) for job in jobs}
    assert on_computed < off_computed
    assert_drained(on)


# -- the block manager ----------------------------------------------------------------------------

@dataclass
class Seq:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)


PROMPT = list(range(100, 109))  # 9 tokens: two full blocks of 4, then the last token alone


def computed(blocks: BlockManager, tokens: list[int]) -> Seq:
    """A sequence allocated and prefilled: its full blocks registered."""
    seq = Seq(list(tokens))
    blocks.allocate(seq, len(tokens))
    blocks.register_computed(seq, len(tokens))
    return seq


def test_two_sequences_share_their_common_blocks_by_reference_count() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    a = computed(blocks, PROMPT)
    b = Seq(PROMPT[:8] + [7, 7, 7])
    assert blocks.allocate(b, len(b.token_ids)) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [blocks.ref_counts[block] for block in b.block_table] == [2, 2, 1]
    assert blocks.num_free_blocks == 8 - 4
    blocks.free_blocks(a)
    assert [blocks.ref_counts[block] for block in b.block_table] == [1, 1, 1]
    assert blocks.num_free_blocks == 8 - 3
    blocks.free_blocks(b)
    assert blocks.num_free_blocks == 8 and not any(blocks.ref_counts)
    assert blocks.hit_rate == 8 / (9 + 11)


def test_a_freed_block_is_taken_back_until_it_is_handed_out_again() -> None:
    blocks = BlockManager(num_blocks=5, block_size=4)
    a = computed(blocks, PROMPT)
    prefix = a.block_table[:2]
    blocks.free_blocks(a)
    other = Seq([1] * 8)
    blocks.allocate(other, 8)  # takes the two blocks nobody ever used, first in line
    assert not set(other.block_table) & set(prefix)
    again = Seq(list(PROMPT))
    assert blocks.allocate(again, 9) == 8 and again.block_table[:2] == prefix  # still cached: a hit
    blocks.free_blocks(again)
    blocks.free_blocks(other)
    hog = Seq([2] * 20)
    blocks.allocate(hog, 20)  # every block: the cached prefix is evicted now
    blocks.free_blocks(hog)
    late = Seq(list(PROMPT))
    assert blocks.allocate(late, 9) == 0


def test_the_last_prompt_token_is_never_served_from_the_cache() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    computed(blocks, PROMPT)
    exact = Seq(PROMPT[:8])  # two full blocks, both cached; the second holds the last token
    assert blocks.allocate(exact, 8) == 4
    assert blocks.num_hits == 4 and blocks.num_lookups == 9 + 8


def test_a_block_is_shared_only_once_registered_as_computed() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    a = Seq(list(PROMPT))
    blocks.allocate(a, 9)
    assert blocks.allocate(Seq(list(PROMPT)), 9) == 0  # allocated, not computed: no hit
    blocks.register_computed(a, 6)  # a chunk of 6 tokens: one full block computed
    assert blocks.allocate(Seq(list(PROMPT)), 9) == 4
    blocks.register_computed(a, 9)
    assert blocks.allocate(Seq(list(PROMPT)), 9) == 8


def test_without_prefix_caching_nothing_is_shared_or_looked_up() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    computed(blocks, PROMPT)
    assert blocks.allocate(Seq(list(PROMPT)), 9) == 0
    assert blocks.hit_rate is None and blocks.by_key == {}


def test_allocation_beyond_the_free_blocks_takes_nothing() -> None:
    blocks = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(KVCacheFull):
        blocks.allocate(Seq([1] * 9), 9)
    assert blocks.num_free_blocks == 2
