"""Requests batched together, arriving one per step, each get exactly the steps ``Engine.generate``
yields for them alone (tokens, text, finish reasons), whatever the batch's capacity; resumed requests
go on where the earlier run left off; and the batch really runs them together."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.model import KVCache
from scheduler.messages import SamplingParams
from tests.batching import Job, alone, assert_drained, computed_tokens, mixed_jobs, run_batch

CAPACITIES = {
    "default": EngineCapacity(),
    "tight-token-budget": EngineCapacity(max_num_batched_tokens=5),  # prompts prefilled in chunks
    "two-seqs": EngineCapacity(max_num_seqs=2),
    "small-blocks": EngineCapacity(block_size=4, num_kv_blocks=256),
}
EOS = 256


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


@pytest.mark.parametrize("capacity", CAPACITIES.values(), ids=CAPACITIES.keys())
def test_staggered_requests_each_get_their_run_alone(engine: Engine, capacity: EngineCapacity) -> None:
    jobs = mixed_jobs(8)
    batch = BatchEngine(engine, capacity)
    batch_sizes: list[int] = []
    outputs = run_batch(batch, jobs, after_step=lambda n, out: batch_sizes.append(batch.num_running))
    for job in jobs:
        assert outputs[job.request_id] == alone(engine, job), job
    assert 1 < max(batch_sizes) <= capacity.max_num_seqs
    assert_drained(batch)


def test_a_tight_token_budget_never_computes_more_than_it_per_step(engine: Engine) -> None:
    capacity = EngineCapacity(max_num_batched_tokens=5)
    batch = BatchEngine(engine, capacity)
    with computed_tokens(engine) as computed:
        run_batch(batch, mixed_jobs(4))
    assert max(computed) == 5 and len(computed) == batch.stats.steps


@pytest.mark.parametrize("capacity", [EngineCapacity(), EngineCapacity(max_num_batched_tokens=3)],
                         ids=["default", "tight-token-budget"])
def test_resumed_requests_give_the_rest_of_the_same_output(engine: Engine, capacity: EngineCapacity) -> None:
    jobs = mixed_jobs(5, max_tokens=7)
    full = {job.request_id: alone(engine, job) for job in jobs}
    resumed = []
    for k, job in enumerate(jobs):  # resume after 0, 1, 2, ... tokens; the last one after all of them
        k = len(full[job.request_id]) if k == len(jobs) - 1 else k
        tokens = tuple(step.token_id for step in full[job.request_id][:k])
        resumed.append(replace(job, resume_token_ids=tokens))
    batch = BatchEngine(engine, capacity)
    outputs = run_batch(batch, resumed)
    for job in resumed:
        k = len(job.resume_token_ids)
        expected = alone(engine, job)
        assert outputs[job.request_id] == expected, job
        if k < job.sampling.max_tokens:
            assert expected == full[job.request_id][k:]
        else:
            assert [(s.index, s.token_id, s.finish_reason) for s in expected] == [(k, -1, "length")]
    assert_drained(batch)


def test_eight_requests_together_take_far_fewer_steps_than_tokens(engine: Engine) -> None:
    jobs = [Job(f"req-{i}", f"Prompt number {i}: ", alone_job.sampling)
            for i, alone_job in enumerate(mixed_jobs(8, max_tokens=8))]
    batch = BatchEngine(engine)
    batch_sizes: list[int] = []
    outputs = run_batch(batch, jobs, per_step=len(jobs),
                        after_step=lambda n, out: batch_sizes.append(batch.num_running))
    generated = sum(1 for steps in outputs.values() for step in steps if step.token_id >= 0)
    assert generated == batch.stats.generated_tokens >= 8 * 6
    assert batch.stats.steps <= max(job.sampling.max_tokens for job in jobs)  # one step per token, for all
    assert batch_sizes[0] == 8
    for job in jobs:
        assert outputs[job.request_id] == alone(engine, job)
    assert_drained(batch)


@contextmanager
def end_of_text_after_position(engine: Engine, position: int) -> Iterator[None]:
    """The real model, except that the logits at ``position`` make end of text certain, in the dense
    forward (``Engine.generate``) and the packed one (``BatchEngine``) alike."""
    model = engine.model
    dense, packed = model.forward, model.forward_packed

    def forward(idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        logits = dense(idx, kv_cache)  # [B, T, V]
        T = idx.size(1)
        positions = torch.arange(T)[None] if kv_cache is None else (
            torch.arange(kv_cache.length - T, kv_cache.length)[None] - kv_cache.pad[:, None])  # [B, T]
        logits[:, :, EOS].masked_fill_(positions == position, 1e9)
        return logits

    def forward_packed(token_ids, positions, attention, logits_rows) -> torch.Tensor:
        logits = packed(token_ids, positions, attention, logits_rows)  # [M, V]
        logits[:, EOS].masked_fill_(positions[logits_rows] == position, 1e9)
        return logits

    model.forward, model.forward_packed = forward, forward_packed
    try:
        yield
    finally:
        del model.forward, model.forward_packed


def test_requests_ending_in_end_of_text_mid_batch_end_like_their_runs_alone(engine: Engine) -> None:
    jobs = [Job(f"len-{n}", "abcdefghijklmn"[:n], SamplingParams(max_tokens=6, seed=n, temperature=n % 2))
            for n in (3, 10, 12, 14)]
    batch = BatchEngine(engine, EngineCapacity(block_size=4, num_kv_blocks=64))
    with end_of_text_after_position(engine, 12):
        expected = {job.request_id: alone(engine, job) for job in jobs}
        outputs = run_batch(batch, jobs)
    assert outputs == expected
    assert [steps[-1].finish_reason for steps in expected.values()] == ["length", "stop", "stop", "length"]
    assert expected["len-10"][-1].index == 3 and expected["len-12"][-1].index == 1
    assert_drained(batch)


def test_the_admission_budget_counts_what_waiting_requests_will_take(engine: Engine) -> None:
    capacity = EngineCapacity(num_kv_blocks=12, block_size=4, max_num_batched_tokens=32, max_num_seqs=4)
    batch = BatchEngine(engine, capacity)
    assert batch.admission_budget() == (12, 32, 4)
    batch.add_request("nine", list(range(65, 74)), SamplingParams(max_tokens=3))
    assert batch.admission_budget() == (12 - 3 - 1, 32 - 9, 3)  # its prompt's blocks, the reserved one
    batch.step()  # admitted and prefilled: it holds its 3 blocks and has one token to compute
    assert batch.admission_budget() == (12 - 3, 32 - 1, 3)
