"""A stand-in engine that takes a fixed time per request: what ``fdbench skew`` runs on its nodes, so
that the benchmark measures how evenly the scheduler spreads work, not how fast the model is. It
imports no torch, runs one request at a time, and has the step interface of
``gpu_worker.batch_engine.BatchEngine`` (one token per step, ``max_tokens`` steps per request)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from gpu_worker.steps import GenerationStep
from scheduler.messages import SamplingParams


@dataclass
class _Work:
    sampling: SamplingParams
    index: int  # the next token's index
    cancelled: bool = False


@dataclass(frozen=True)
class _Capacity:
    max_num_seqs: int = 1
    block_size: int = 1
    reserved_output_blocks: int = 0
    max_num_batched_tokens: int = 1


class FixedWorkEngine:
    device = "fixed-work"
    capacity = _Capacity()

    def __init__(self, seconds_per_request: float) -> None:
        self.seconds_per_request = seconds_per_request
        self.sequences: OrderedDict[str, _Work] = OrderedDict()  # the first one runs
        self.ended: list[tuple[str, GenerationStep]] = []
        self.exported: dict[str, object] = {}

    def add_request(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams,
                    resume_token_ids: Sequence[int] = (), **_splitwise) -> None:
        if len(resume_token_ids) >= sampling.max_tokens:
            self.ended.append((request_id, GenerationStep(sampling.max_tokens, -1, "", "length")))
            return
        self.sequences[request_id] = _Work(sampling, len(resume_token_ids))

    def cancel(self, request_id: str) -> None:
        if request_id in self.sequences:
            self.sequences[request_id].cancelled = True

    def abort(self, request_id: str) -> None:
        self.sequences.pop(request_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self.sequences or self.ended)

    def admission_budget(self) -> tuple[int, int, int]:
        return -1, 0, 0 if self.sequences else 1  # -1: no block budget

    def step(self) -> list[tuple[str, GenerationStep]]:
        outputs, self.ended = self.ended, []
        if not self.sequences:
            return outputs
        request_id, work = next(iter(self.sequences.items()))
        if work.cancelled:
            del self.sequences[request_id]
            return [*outputs, (request_id, GenerationStep(work.index, -1, "", "cancelled"))]
        time.sleep(self.seconds_per_request / max(1, work.sampling.max_tokens))
        last = work.index == work.sampling.max_tokens - 1
        outputs.append((request_id, GenerationStep(work.index, 32, " ", "length" if last else None)))
        work.index += 1
        if last:
            del self.sequences[request_id]
        return outputs

    def figures(self) -> dict[str, int | float | str]:
        return {"batch": min(1, len(self.sequences)), "waiting": max(0, len(self.sequences) - 1)}
