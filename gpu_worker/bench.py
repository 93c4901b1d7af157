"""Model benchmark: prefill latency and decode throughput of the engine on one device.

Design note: each repeat times one prefill of ``batch`` prompts of ``prompt_tokens`` tokens, then
``max_tokens`` decode steps with greedy sampling, so decode produces batch * max_tokens tokens. One
untimed warm-up repeat comes first; on CUDA every timing ends with a synchronize. Figures are medians.
Progress goes to stderr; the caller prints the returned dict.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

from gpu_worker.engine import Engine
from gpu_worker.sampling import sample_next
from scheduler.messages import SamplingParams


def bench_model(device: str = "auto", batch: int = 1, prompt_tokens: int = 128, max_tokens: int = 128,
                repeats: int = 3) -> dict[str, Any]:
    """{"bench": "model", "device", "batch", "prompt_tokens", "max_tokens", "prefill_ms",
    "decode_tokens_per_s"}: median prefill time, and tokens per second across the batch in decode."""
    if min(batch, prompt_tokens, max_tokens, repeats) < 1:
        raise ValueError("batch, prompt_tokens, max_tokens and repeats must all be >= 1")
    engine = Engine(device)
    if prompt_tokens + max_tokens > engine.max_model_len:
        raise ValueError(f"prompt_tokens + max_tokens must be at most {engine.max_model_len}")
    # Different bytes per row, so that no row is a copy of another.
    prompts = [[(31 * row + 7 * i) % 256 for i in range(prompt_tokens)] for row in range(batch)]
    log(f"bench model: device={engine.device} batch={batch} prompt_tokens={prompt_tokens} "
         f"max_tokens={max_tokens}; warm-up")
    _run_once(engine, prompts, max_tokens)
    prefill_s, decode_s = [], []
    for repeat in range(repeats):
        prefill, decode = _run_once(engine, prompts, max_tokens)
        prefill_s.append(prefill)
        decode_s.append(decode)
        log(f"repeat {repeat + 1}/{repeats}: prefill {prefill * 1e3:.2f} ms, decode {decode * 1e3:.1f} ms")
    return {
        "bench": "model",
        "device": str(engine.device),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "prefill_ms": round(statistics.median(prefill_s) * 1e3, 3),
        "decode_tokens_per_s": round(batch * max_tokens / statistics.median(decode_s), 1),
    }


def _run_once(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill and of ``max_tokens`` decode steps after it."""
    greedy = [SamplingParams(max_tokens=max_tokens)] * len(prompts)
    no_generators = [None] * len(prompts)
    start = now(engine.device)
    kv_cache, logits = engine.prefill(prompts, max_len=len(prompts[0]) + max_tokens)  # [B, V]
    prefilled = now(engine.device)
    for _ in range(max_tokens):
        token_ids = sample_next(logits, greedy, no_generators)  # [B]
        logits = engine.decode_step(kv_cache, token_ids)  # [B, V]
    done = now(engine.device)
    return prefilled - start, done - prefilled


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously; time what has finished
    return time.perf_counter()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    print(json.dumps(bench_model()))
