"""Handoff benchmark: latency of handing one request's KV cache from a prefill node to a decode node.

Design note: one prefill, untimed here, gives the KV cache; each repeat then times the whole handoff
path once: the cache's prompt slots copied to the CPU and serialised (``kv_from_cache``,
``encode_handoff``), SET in Redis with a TTL, GET back, deserialised onto the device and copied into a
new KVCache of ``prompt_tokens + max_tokens`` slots (``decode_handoff``, ``cache_from_kv``). Both
sides run in this process against one Redis, so the figure is serialisation plus two Redis round trips
of the blob, without a second machine's network. The prefill itself is timed apart (median of a few
runs). One untimed warm-up repeat comes first; on CUDA every timing ends with a synchronize. Keys live
under a throwaway topic and are deleted. Progress goes to stderr; the caller prints the returned dict.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import uuid
from dataclasses import replace
from typing import Any

from redis import Redis

from gpu_worker.bench import log, now
from gpu_worker.engine import Engine
from gpu_worker.kv_transfer import KVHandoff, RedisKVStore, cache_from_kv, kv_from_cache, prefill_for_handoff
from gpu_worker.model import KVCache
from scheduler.messages import SamplingParams

PREFILL_REPEATS = 5
MAX_TOKENS = 16  # room the decode side allocates past the prompt, as a real decode node does
KEY_TTL_S = 60  # long enough for a slow repeat; the key is deleted after each one anyway


def bench_handoff(redis_url: str, prompt_tokens: int, repeats: int = 50, device: str = "cpu",
                  max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """{"bench": "handoff", "device", "prompt_tokens", "bytes", "p50_ms", "p99_ms", "prefill_ms"}:
    nearest-rank percentiles of the handoff path, the encoded handoff's size and the median prefill.

    ``prompt_tokens + max_tokens`` must fit the model's context (2048): the decode side allocates room
    for ``max_tokens`` more positions, as a real decode node does.
    """
    if min(prompt_tokens, repeats, max_tokens) < 1:
        raise ValueError("prompt_tokens, repeats and max_tokens must all be >= 1")
    engine = Engine(device)
    if prompt_tokens + max_tokens > engine.max_model_len:
        raise ValueError(f"prompt_tokens + max_tokens must be at most {engine.max_model_len}")
    prompt = [(7 * i + 3) % 256 for i in range(prompt_tokens)]
    sampling = SamplingParams(max_tokens=max_tokens)
    redis = Redis.from_url(redis_url)
    store = RedisKVStore(redis)
    topic, uid = f"bench-handoff-{uuid.uuid4().hex[:12]}", "request-0"
    log(f"bench handoff: device={engine.device} prompt_tokens={prompt_tokens} repeats={repeats} "
         f"topic={topic}; warm-up")
    template = prefill_for_handoff(engine, prompt, sampling)  # warm-up, and the scalar fields of each repeat
    prefill_ms, kv_cache = _time_prefill(engine, prompt, max_tokens)
    handoff_s, num_bytes = [], 0
    try:
        _hand_over(engine, store, topic, uid, template, kv_cache, max_tokens)
        for repeat in range(repeats):
            seconds, num_bytes = _hand_over(engine, store, topic, uid, template, kv_cache, max_tokens)
            handoff_s.append(seconds)
            if (repeat + 1) % 10 == 0 or repeat + 1 == repeats:
                log(f"repeat {repeat + 1}/{repeats}: {seconds * 1e3:.3f} ms, {num_bytes} bytes")
    finally:
        store.delete(topic, uid)
        redis.close()
    return {
        "bench": "handoff",
        "device": str(engine.device),
        "prompt_tokens": prompt_tokens,
        "bytes": num_bytes,
        "p50_ms": round(_percentile(handoff_s, 0.50) * 1e3, 3),
        "p99_ms": round(_percentile(handoff_s, 0.99) * 1e3, 3),
        "prefill_ms": round(prefill_ms, 3),
    }


def _time_prefill(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, KVCache]:
    """Median milliseconds of the prompt's prefill, and the KV cache of the last one."""
    times = []
    for _ in range(PREFILL_REPEATS):
        start = now(engine.device)
        kv_cache, _ = engine.prefill([prompt], len(prompt) + max_tokens)
        times.append(now(engine.device) - start)
    return statistics.median(times) * 1e3, kv_cache


def _hand_over(engine: Engine, store: RedisKVStore, topic: str, uid: str, template: KVHandoff,
               kv_cache: KVCache, max_tokens: int) -> tuple[float, int]:
    """Seconds of one handoff (prefill side to a decode-ready cache) and the bytes it wrote."""
    start = now(engine.device)
    handoff = replace(template, kv=kv_from_cache(kv_cache, template.prompt_len))  # prefill node
    num_bytes = store.put(topic, uid, handoff, ttl_s=KEY_TTL_S)
    received = store.get(topic, uid, engine.device, engine.config)  # decode node
    assert received is not None, "the handoff expired within its own repeat"
    cache_from_kv(received.kv, engine.config, engine.device, received.prompt_len + max_tokens)
    seconds = now(engine.device) - start
    store.delete(topic, uid)
    return seconds, num_bytes


def _percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


if __name__ == "__main__":
    # python -m gpu_worker.handoff_bench [redis_url [prompt_tokens ...]]
    url = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
    for size in [int(arg) for arg in sys.argv[2:]] or [128, 1000]:
        print(json.dumps(bench_handoff(url, size)))
