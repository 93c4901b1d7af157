"""Local's rules (the KV-block and token budgets of get_requests, scheduler_max_size, scheduler_ttl) are
one table of cases, run against both implementations: the in-process scheduler a node's engine admits
from, and the Redis scripts every node of the cluster claims through (a local topic: no stealing)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from scheduler.config import parse_config
from scheduler.interface import GlobalScheduler, Scheduler
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request


@dataclass(frozen=True)
class Put:
    requests: tuple[tuple[str, int], ...]  # (request id, prompt tokens)
    refused: dict[str, str] | None = None  # request id -> what its refusal says


@dataclass(frozen=True)
class Get:
    # available_blocks, block_size, reserved_output_blocks, max_num_batched_tokens, batch
    budget: tuple[int, int, int, int, int]
    handed_out: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Expired:
    request_ids: tuple[str, ...]  # the final results taken now are exactly these, each "expired"


CASES = {
    "fifo within the block budget; a lone first request ignores the token budget": (
        Put((("a", 40), ("b", 40), ("c", 40))),  # 3 blocks of 16 + 1 reserved = 4 blocks each
        Get((9, 16, 1, 4096, 8), ("a", "b")),
        Get((100, 16, 1, 10, 8), ("c",)),
    ),
    "nothing when the blocks do not exceed the reserve, or the batch is empty": (
        Put((("a", 4),)),
        Get((1, 16, 1, 4096, 8), ()),
        Get((100, 16, 1, 4096, 0), ()),
        Get((2, 16, 1, 4096, 1), ("a",)),
    ),
    "the token budget ends a batch, and nothing skips ahead of the request that did not fit": (
        Put((("a", 5), ("b", 5), ("c", 1))),
        Get((100, 16, 1, 8, 8), ("a",)),  # b needs 5 tokens, 3 are left: c waits behind it
        Get((100, 16, 1, 10, 8), ("b", "c")),
    ),
    "a head that does not fit the blocks blocks the queue": (
        Put((("a", 64), ("b", 1))),  # a needs 4 + 1 blocks
        Get((4, 16, 1, 4096, 8), ()),
        Get((5, 16, 1, 4096, 8), ("a",)),
        Get((5, 16, 1, 4096, 8), ("b",)),
    ),
    "a full queue refuses only what does not fit": (
        {"scheduler_max_size": 2},
        Put((("a", 1), ("b", 1), ("c", 1)), {"c": "queue full"}),
        Get((100, 16, 1, 4096, 1), ("a",)),  # a place frees: waiting requests are what counts
        Put((("d", 1),)),
        Get((100, 16, 1, 4096, 8), ("b", "d")),
    ),
    "a duplicate id is refused while the first is in flight": (
        Put((("a", 1), ("a", 1)), {"a": "duplicate"}),
        Get((100, 16, 1, 4096, 8), ("a",)),
    ),
    "a request that waits its ttl is evicted, full queue or not": (
        {"scheduler_ttl": 1},
        Put((("a", 1), ("b", 1))),
        Wait(1.2),
        Put((("c", 1),)),
        Get((100, 16, 1, 4096, 8), ("c",)),
        Expired(("a", "b")),
    ),
    "an expired request frees its place in a full queue": (
        {"scheduler_ttl": 1, "scheduler_max_size": 1},
        Put((("a", 1),)),
        Wait(1.2),
        Put((("b", 1),)),
        Expired(("a",)),
        Get((100, 16, 1, 4096, 8), ("b",)),
    ),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def in_process(config, redis_conn) -> tuple[Scheduler, callable]:
    clock = Clock()

    def wait(seconds: float) -> None:
        clock.now += seconds

    return InProcessScheduler(config, clock=clock), wait


def over_redis(config, redis_conn) -> tuple[Scheduler, callable]:
    return GlobalScheduler(config, redis_conn, node="n1", liveness=False), time.sleep


@pytest.mark.parametrize("implementation", [in_process, over_redis])
@pytest.mark.parametrize("case", CASES)
def test_the_same_rules(case, implementation, redis_conn):
    steps = CASES[case]
    changes = steps[0] if isinstance(steps[0], dict) else {}
    config = parse_config({"scheduler_name": "local", "scheduler_topic": "rules", **changes})
    scheduler, wait = implementation(config, redis_conn)
    for step in steps[1:] if changes else steps:
        if isinstance(step, Put):
            answers = scheduler.put_requests([Request(rid, [7] * tokens) for rid, tokens in step.requests])
            refused = {rid: error for rid, error in answers if error is not None}
            assert refused.keys() == (step.refused or {}).keys(), (step, answers)
            for rid, says in (step.refused or {}).items():
                assert says in refused[rid]
        elif isinstance(step, Get):
            handed_out = tuple(r.request_id for r in scheduler.get_requests(*step.budget))
            assert handed_out == step.handed_out, step
        elif isinstance(step, Wait):
            wait(step.seconds)
        else:
            finals = {rid: results[-1] for rid, results in scheduler.get_results().items()}
            assert sorted(finals) == sorted(step.request_ids)
            assert all(r.finished and r.error["code"] == "expired" for r in finals.values())
