"""Cancelling one request of a running batch ends it at the next step with a "cancelled" marker and
gives its blocks back in that step, whether it was running or still waiting; aborting drops it without
a word. The other requests' outputs do not change."""

from __future__ import annotations

import pytest

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.steps import GenerationStep
from tests.batching import Job, alone, assert_drained, mixed_jobs, run_batch

# Prompts and outputs short enough (under 16 tokens) that nobody takes a new block after admission:
# added all at once, the number of free blocks then only changes where a request ends.
JOBS = [Job(job.request_id, f"Job {i}", job.sampling) for i, job in enumerate(mixed_jobs(4, max_tokens=6))]
VICTIM = JOBS[1]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


def cancelled_alone(engine: Engine, job: Job, after: int) -> list[GenerationStep]:
    """``Engine.generate`` for ``job`` alone, told to stop after ``after`` tokens."""
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > after

    return list(engine.generate(engine.tokenizer.encode(job.prompt), job.sampling, should_stop=should_stop))


def test_cancel_ends_a_running_request_at_the_next_step_and_frees_its_blocks(engine: Engine) -> None:
    batch = BatchEngine(engine)
    seen: list[int] = []
    freed: dict[str, int] = {}

    def cancel_after_two_tokens(number: int, outputs: list[tuple[str, GenerationStep]]) -> None:
        seen.extend(step.token_id for request_id, step in outputs if request_id == VICTIM.request_id)
        if len(seen) == 2 and "held" not in freed:
            freed["held"] = len(batch.sequences[VICTIM.request_id].block_table)
            freed["free_before"] = batch.blocks.num_free_blocks
            batch.cancel(VICTIM.request_id)
        elif "held" in freed and "free_after" not in freed:
            freed["free_after"] = batch.blocks.num_free_blocks
            assert VICTIM.request_id not in batch.sequences

    outputs = run_batch(batch, JOBS, per_step=len(JOBS), after_step=cancel_after_two_tokens)
    assert outputs[VICTIM.request_id] == cancelled_alone(engine, VICTIM, after=2)
    assert outputs[VICTIM.request_id][-1] == GenerationStep(2, -1, "", "cancelled")
    assert freed["held"] > 0 and freed["free_after"] == freed["free_before"] + freed["held"]
    for job in JOBS:
        if job is not VICTIM:
            assert outputs[job.request_id] == alone(engine, job), job
    assert_drained(batch)


def test_cancel_of_a_request_still_waiting_ends_it_with_only_the_marker(engine: Engine) -> None:
    batch = BatchEngine(engine, EngineCapacity(max_num_seqs=1))
    last = JOBS[-1]

    def cancel_the_last_while_it_waits(number: int, outputs: list[tuple[str, GenerationStep]]) -> None:
        if number == len(JOBS) - 1:
            seq = batch.sequences[last.request_id]
            assert not seq.block_table and seq not in batch.running  # not admitted yet
            batch.cancel(last.request_id)

    outputs = run_batch(batch, JOBS, after_step=cancel_the_last_while_it_waits)
    assert outputs[last.request_id] == [GenerationStep(0, -1, "", "cancelled")]
    for job in JOBS[:-1]:
        assert outputs[job.request_id] == alone(engine, job), job
    assert_drained(batch)
    assert not batch.waiting.requests  # the queue forgot it too


def test_abort_drops_a_request_silently_and_frees_its_blocks_at_once(engine: Engine) -> None:
    batch = BatchEngine(engine)

    def abort_after_one_token(number: int, outputs: list[tuple[str, GenerationStep]]) -> None:
        victim = VICTIM.request_id
        if any(request_id == victim for request_id, _ in outputs) and victim in batch.sequences:
            held = len(batch.sequences[VICTIM.request_id].block_table)
            free_before = batch.blocks.num_free_blocks
            batch.abort(VICTIM.request_id)
            assert batch.blocks.num_free_blocks == free_before + held
            assert VICTIM.request_id not in batch.sequences

    outputs = run_batch(batch, JOBS, per_step=len(JOBS), after_step=abort_after_one_token)
    assert outputs[VICTIM.request_id] == alone(engine, VICTIM)[:1]  # nothing after the abort, no marker
    for job in JOBS:
        if job is not VICTIM:
            assert outputs[job.request_id] == alone(engine, job), job
    assert_drained(batch)
    assert not batch.waiting.requests


def test_cancel_and_abort_of_an_unknown_request_do_nothing(engine: Engine) -> None:
    batch = BatchEngine(engine)
    batch.cancel("nobody")
    batch.abort("nobody")
    assert batch.step() == [] and not batch.has_work
