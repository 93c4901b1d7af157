"""The scheduler benchmark: the scheduler interface alone, in one process, with a no-op engine.

Design note: a producer puts N requests one call each; a node loop takes batches of up to 3 and puts
one finished result per request; the origin drains results until all N are final. The figure is
requests per second from the first put to the last result taken, so it covers the whole round trip.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from scheduler.base import Scheduler, create_scheduler
from scheduler.config import parse_config
from scheduler.messages import Request, Result

BATCH = 3
TIME_LIMIT_S = 120.0


def bench_scheduler(scheduler_name: str = "local", requests: int = 10_000,
                    scheduler: Scheduler | None = None) -> dict[str, Any]:
    scheduler = scheduler or create_scheduler(parse_config({"scheduler_name": scheduler_name}))
    deadline = time.monotonic() + TIME_LIMIT_S
    started = time.perf_counter()
    producer = threading.Thread(target=_produce, args=(scheduler, requests, deadline))
    node = threading.Thread(target=_node_loop, args=(scheduler, requests, deadline))
    producer.start()
    node.start()
    completed = _drain(scheduler, requests, deadline)
    seconds = time.perf_counter() - started
    producer.join()
    node.join()
    return {"bench": "scheduler", "scheduler": scheduler_name, "requests": requests, "completed": completed,
            "end_to_end_per_s": round(completed / seconds, 1), "seconds": round(seconds, 4)}


def _produce(scheduler: Scheduler, n: int, deadline: float) -> None:
    for i in range(n):
        if time.monotonic() > deadline:
            return
        scheduler.put_requests([Request(f"bench-{i}", [1, 2, 3, 4])])


def _node_loop(scheduler: Scheduler, n: int, deadline: float) -> None:
    done = 0
    while done < n and time.monotonic() < deadline:
        batch = scheduler.get_requests(available_blocks=1_000, block_size=64, reserved_output_blocks=1,
                                       max_num_batched_tokens=8_192, batch=BATCH)
        if not batch:
            time.sleep(0)  # yield to the producer; a real engine would block on its wait call
            continue
        scheduler.put_results([
            Result(r.request_id, index=0, token_id=0, finished=True, finish_reason="length") for r in batch
        ])
        done += len(batch)


def _drain(scheduler: Scheduler, n: int, deadline: float) -> int:
    finished = 0
    while finished < n and time.monotonic() < deadline:
        results = scheduler.get_results()
        if not results:
            time.sleep(0)
            continue
        finished += sum(1 for outputs in results.values() for r in outputs if r.finished)
    return finished
