"""When the KV cache is too small for the load, the engine preempts sequences and recomputes them later,
and every request still gets exactly its run alone; a request the whole cache could never hold is
refused when it is added, with the numbers, instead of waiting forever."""

from __future__ import annotations

import pytest

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from scheduler.messages import SamplingParams
from tests.batching import Job, add, alone, assert_drained, run_batch

SMALL_CACHE = EngineCapacity(num_kv_blocks=12, block_size=4)  # 48 token slots
LONG_OUTPUTS = [
    Job("greedy-a", "Hi", SamplingParams(max_tokens=22)),
    Job("seeded-b", "héllo", SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5)),
    Job("greedy-c", "abcdefg", SamplingParams(max_tokens=18)),
    Job("seeded-d", "Ωμ", SamplingParams(max_tokens=24, temperature=1.1, top_k=40, seed=6)),
    Job("greedy-e", "x", SamplingParams(max_tokens=16)),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
@pytest.mark.parametrize("per_step", [1, len(LONG_OUTPUTS)], ids=["staggered", "all-at-once"])
def test_preempted_requests_end_exactly_like_their_runs_alone(engine: Engine, prefix_caching: bool,
                                                            per_step: int) -> None:
    capacity = EngineCapacity(num_kv_blocks=12, block_size=4, enable_prefix_caching=prefix_caching)
    batch = BatchEngine(engine, capacity)
    outputs = run_batch(batch, LONG_OUTPUTS, per_step=per_step)
    assert batch.stats.preemptions > 0
    for job in LONG_OUTPUTS:
        assert outputs[job.request_id] == alone(engine, job), job
    assert_drained(batch)


def test_a_prompt_longer_than_the_whole_cache_is_refused(engine: Engine) -> None:
    batch = BatchEngine(engine, SMALL_CACHE)
    with pytest.raises(ValueError, match=r"\(60 tokens\) needs 15 KV blocks.*whole cache of 12 blocks"):
        batch.add_request("long", [65] * 60, SamplingParams(max_tokens=1))
    assert batch.sequences == {} and not batch.has_work


def test_a_prompt_that_leaves_no_room_for_the_reserved_output_block_is_refused(engine: Engine) -> None:
    batch = BatchEngine(engine, SMALL_CACHE)
    with pytest.raises(ValueError, match=r"\(48 tokens\).*12 blocks"):
        batch.add_request("full", [65] * 48, SamplingParams(max_tokens=1))  # 12 blocks + 1 reserved


def test_a_prompt_plus_max_tokens_over_the_cache_is_refused(engine: Engine) -> None:
    batch = BatchEngine(engine, SMALL_CACHE)
    with pytest.raises(ValueError, match=r"\(8 tokens\) plus max_tokens \(60\) need 17 KV blocks.* has 12"):
        batch.add_request("greedy", [65] * 8, SamplingParams(max_tokens=60))
    assert batch.sequences == {} and not batch.has_work


def test_a_request_that_just_fits_the_whole_cache_runs_to_its_end(engine: Engine) -> None:
    job = Job("exact", "abcdefgh", SamplingParams(max_tokens=40))  # 8 + 40 tokens: all 12 blocks
    batch = BatchEngine(engine, SMALL_CACHE)
    assert run_batch(batch, [job]) == {"exact": alone(engine, job)}
    assert_drained(batch)


def test_a_resumed_request_that_fits_the_cache_is_run_or_refused_never_left_waiting(engine: Engine) -> None:
    """Prompt and max_tokens fit (the same request fresh is accepted and runs, as above), but the prompt
    with 39 resumed tokens needs all 12 blocks, and admission also wants a free reserved output block."""
    fresh = Job("exact", "abcdefgh", SamplingParams(max_tokens=40))
    done = alone(engine, fresh)
    job = Job("exact", fresh.prompt, fresh.sampling, tuple(step.token_id for step in done[:39]))
    batch = BatchEngine(engine, SMALL_CACHE)
    try:
        add(batch, job)
    except ValueError as refused:  # refusing it is fine, if it says why
        assert "12" in str(refused)
        return
    assert run_batch(batch, []) == {"exact": done[39:]}
    assert_drained(batch)
