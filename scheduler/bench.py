"""The scheduler benchmark: the scheduler interface alone, in one process, with a no-op engine.

Design note: a producer puts N requests one call each; a node loop takes batches of up to 3 and puts
one finished result per request; the origin drains results until all N are final. The figure is
requests per second from the first put to the last result taken, so it covers the whole round trip.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis import Redis
from rq import Queue
from rq import results as rq_results
from rq.job import Job

from scheduler import keys
from scheduler.config import SchedulerConfig, parse_config
from scheduler.interface import Scheduler, create_scheduler
from scheduler.messages import Request, Result

BATCH = 3
IDLE_S = 0.0005  # an idle loop's pause, so that it does not hold the GIL against the others
TIME_LIMIT_S = 120.0


def percentile_ms(samples_s: list[float], p: int) -> float | None:
    """The p-th percentile (1..99) of ``samples_s`` in ms, statistics.quantiles' inclusive method;
    None with no sample. What every benchmark reports its latencies with."""
    if not samples_s:
        return None
    if len(samples_s) == 1:
        return round(samples_s[0] * 1000, 3)
    return round(statistics.quantiles(samples_s, n=100, method="inclusive")[p - 1] * 1000, 3)


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
            time.sleep(IDLE_S)  # a real engine would block on its own wait
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
            time.sleep(IDLE_S)
            continue
        finished += sum(1 for outputs in results.values() for r in outputs if r.finished)
    return finished


@contextmanager
def redis_bench_topic(url: str, scheduler_name: str = "global") -> Iterator[tuple[Redis, SchedulerConfig]]:
    """A throwaway topic on the Redis at ``url``; every key it made is deleted afterwards."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(url)
    config = parse_config({"scheduler_name": scheduler_name, "scheduler_topic": topic})
    try:
        yield redis, config
    finally:
        delete_topic_keys(redis, topic)
        redis.close()


def delete_topic_keys(redis: Redis, topic: str) -> None:
    """Every key of ``topic`` (its hash tag needs escaping in a SCAN pattern) and its rq jobs."""
    pattern = "*" + keys.topic_prefix(topic).replace("{", "\\{").replace("}", "\\}") + "*"
    doomed = [key.decode() for key in redis.scan_iter(match=pattern, count=1000)]
    req_prefix = keys.request(topic, "")
    uids = [key[len(req_prefix):] for key in doomed if key.startswith(req_prefix)]
    doomed += [Job.key_for(uid) for uid in uids] + [rq_results.get_key(uid) for uid in uids]
    for start in range(0, len(doomed), 1000):
        redis.delete(*doomed[start:start + 1000])
    redis.srem(keys.TOPICS, topic)
    queues = [key for key in doomed if key.startswith(keys.RQ_QUEUE_PREFIX)]
    if queues:
        redis.srem(Queue.redis_queues_keys, *queues)
