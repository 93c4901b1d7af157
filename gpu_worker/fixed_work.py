"""A stand-in engine that takes a fixed time per request: what ``fdbench skew`` runs on its nodes, so
that the benchmark measures how evenly the scheduler spreads work, not how fast the model is. It
imports no torch and yields the same kind of steps as ``gpu_worker.engine.Engine``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from gpu_worker.steps import GenerationStep
from scheduler.messages import SamplingParams


class FixedWorkEngine:
    device = "fixed-work"

    def __init__(self, seconds_per_request: float) -> None:
        self.seconds_per_request = seconds_per_request

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                 should_stop: Callable[[], bool] | None = None,
                 resume_token_ids: Sequence[int] = ()) -> Iterator[GenerationStep]:
        steps = sampling.max_tokens - len(resume_token_ids)
        pause = self.seconds_per_request / max(1, sampling.max_tokens)
        for index in range(len(resume_token_ids), sampling.max_tokens):
            if should_stop is not None and should_stop():
                yield GenerationStep(index, -1, "", "cancelled")
                return
            time.sleep(pause)
            last = index == sampling.max_tokens - 1
            yield GenerationStep(index, 32, " ", "length" if last else None)
        if steps <= 0:
            yield GenerationStep(sampling.max_tokens, -1, "", "length")
