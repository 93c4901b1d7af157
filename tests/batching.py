"""Requests for the batching engine's tests, each run alone through ``Engine.generate`` (the reference)
and together through a ``BatchEngine``, added one per step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.engine import Engine
from gpu_worker.steps import GenerationStep
from scheduler.messages import SamplingParams

MAX_STEPS = 2000  # a run that takes more steps than this is hung, not slow


@dataclass(frozen=True)
class Job:
    request_id: str
    prompt: str
    sampling: SamplingParams
    resume_token_ids: tuple[int, ...] = ()


def mixed_jobs(count: int = 8, max_tokens: int = 6) -> list[Job]:
    """Prompts of varying lengths (some multi-byte), greedy and seeded sampling, varying max_tokens."""
    prompts = ["Hi", "The quick brown fox jumps over", "héllo wörld, 日本語", "a",
               "Continuous batching packs every request's step into one forward pass. ",
               "Ωμέγα 🙂", "0123456789" * 3, "Paged attention"]
    samplings = [SamplingParams(max_tokens=max_tokens),
                 SamplingParams(max_tokens=max_tokens + 2, temperature=0.9, top_p=0.9, seed=11),
                 SamplingParams(max_tokens=max_tokens - 2),
                 SamplingParams(max_tokens=max_tokens + 1, temperature=1.2, top_k=30, seed=12),
                 SamplingParams(max_tokens=max_tokens, temperature=0.7, top_k=50, top_p=0.8, seed=13)]
    return [Job(f"req-{i}", prompts[i % len(prompts)], samplings[i % len(samplings)]) for i in range(count)]


def alone(engine: Engine, job: Job) -> list[GenerationStep]:
    """What ``Engine.generate`` yields for ``job`` run by itself."""
    return list(engine.generate(engine.tokenizer.encode(job.prompt), job.sampling,
                                resume_token_ids=job.resume_token_ids))


def add(batch: BatchEngine, job: Job) -> None:
    batch.add_request(job.request_id, batch.engine.tokenizer.encode(job.prompt), job.sampling,
                      resume_token_ids=job.resume_token_ids)


def run_batch(batch: BatchEngine, jobs: list[Job], per_step: int = 1,
              after_step: Callable[[int, list[tuple[str, GenerationStep]]], None] | None = None,
              ) -> dict[str, list[GenerationStep]]:
    """Adds ``per_step`` jobs before each step until all are in, steps until nothing is left, and
    returns every request's steps in order. ``after_step(step_number, outputs)`` may cancel or abort."""
    pending = list(jobs)
    outputs: dict[str, list[GenerationStep]] = {job.request_id: [] for job in jobs}
    for number in range(MAX_STEPS):
        for job in pending[:per_step]:
            add(batch, job)
        del pending[:per_step]
        if not pending and not batch.has_work:
            return outputs
        step_outputs = batch.step()
        for request_id, step in step_outputs:
            outputs.setdefault(request_id, []).append(step)
        if after_step is not None:
            after_step(number, step_outputs)
    raise AssertionError(f"the batch was still working after {MAX_STEPS} steps: {batch.num_running} running, "
                         f"{batch.num_waiting} waiting, {batch.blocks.num_free_blocks} free blocks")


def assert_drained(batch: BatchEngine) -> None:
    """Every block is back and no request is left behind."""
    assert batch.blocks.num_free_blocks == batch.blocks.num_blocks
    assert all(count == 0 for count in batch.blocks.ref_counts)
    assert batch.sequences == {} and batch.running == [] and not batch.preempted
    assert not batch.has_work


@contextmanager
def computed_tokens(engine: Engine) -> Iterator[list[int]]:
    """Records how many tokens each packed forward pass of ``engine``'s model computes."""
    counts: list[int] = []
    forward = engine.model.forward_packed

    def counting(token_ids, *args, **kwargs):
        counts.append(len(token_ids))
        return forward(token_ids, *args, **kwargs)

    engine.model.forward_packed = counting
    try:
        yield counts
    finally:
        del engine.model.forward_packed  # the class's method again
