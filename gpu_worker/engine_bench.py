"""Engine benchmark: the batching engine alone, in process, against the bare model's static batch.

Design note. At each concurrency C, C clients each send ``requests_per_client`` requests one after
the other (a client sends its next request the step after its last one ended), and the clients
start one step apart, so requests arrive staggered and join a batch that is already running. Each
request has a distinct prompt of ``prompt_tokens`` tokens and is greedy, with ``max_tokens`` (it
ends there or at end of text, as when served). Figures: generated tokens per second of wall time;
time to first token from a request's arrival; inter-token latency between a request's successive
tokens (p50, p99 over all).

Each concurrency runs ``repeats`` times, each engine run followed by a static batch (below). The
engine's figures (latencies included) are those of its fastest run, and the bound and the static batch
are each the fastest of theirs: on a shared machine a slow moment then weighs on both sides alike,
where one engine run set against the best of several static batches counted every slow moment
against the engine. ``engine_runs_tokens_per_s`` lists every run's tokens/s.

The static-batch bound is measured in the same run: the bare model (``Engine.prefill`` and
``Engine.decode_step`` on a dense cache, no scheduling, no paging) decoding a fixed batch of C rows
for ``max_tokens`` steps; its decode tokens per second is what batching C requests could reach at
best. ``fraction_of_bound`` is the engine's tokens/s over it. That bound leaves the prompts out, though
the engine's own tokens/s pays for every prefill; ``static_batch_tokens_per_s`` is the same static
batch doing the engine's work for C requests, its prefill of the C prompts included (one pass), and
``fraction_of_static_batch`` the engine's tokens/s over that.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.bench import now
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.sampling import sample_next
from scheduler.bench import percentile_ms
from scheduler.messages import SamplingParams


def bench_engine(device: str = "auto", concurrency: list[int] | None = None, prompt_tokens: int = 32,
                 max_tokens: int = 64, requests_per_client: int = 4, repeats: int = 3,
                 capacity: EngineCapacity | None = None) -> dict[str, Any]:
    """{"bench": "engine", "device", "model", ..., "results": [per concurrency figures]}."""
    levels = concurrency or [1, 8, 16, 32]
    for name, value in (("--concurrency", min(levels)), ("--prompt-tokens", prompt_tokens),
                        ("--max-tokens", max_tokens), ("--requests-per-client", requests_per_client),
                        ("--repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    engine = Engine(device)
    if prompt_tokens + max_tokens > engine.max_model_len:
        raise ValueError(f"--prompt-tokens plus --max-tokens must be at most the model's context of "
                         f"{engine.max_model_len}")
    capacity = capacity or EngineCapacity(max_num_seqs=max(levels))
    log(f"bench engine: device={engine.device} prompt_tokens={prompt_tokens} max_tokens={max_tokens} "
        f"requests per client={requests_per_client}; warm-up")
    _static_batch(engine, 2, prompt_tokens, 4)
    _run_clients(BatchEngine(engine, capacity), 2, 1, prompt_tokens, 4)
    results = []
    for clients in levels:
        runs, bound, whole = [], 0.0, 0.0
        for _ in range(repeats):  # interleaved: see the note
            runs.append(_run_clients(BatchEngine(engine, capacity), clients, requests_per_client,
                                     prompt_tokens, max_tokens))
            decode, prefilled = _static_batch(engine, clients, prompt_tokens, max_tokens)
            bound, whole = max(bound, decode), max(whole, prefilled)
        figures = max(runs, key=lambda run: run["tokens_per_s"])
        figures["engine_runs_tokens_per_s"] = [run["tokens_per_s"] for run in runs]
        figures["static_bound_tokens_per_s"] = round(bound, 1)
        figures["fraction_of_bound"] = round(figures["tokens_per_s"] / bound, 3)
        figures["static_batch_tokens_per_s"] = round(whole, 1)
        figures["fraction_of_static_batch"] = round(figures["tokens_per_s"] / whole, 3)
        log(f"concurrency {clients}: {figures['tokens_per_s']:.0f} tokens/s, "
            f"{figures['fraction_of_bound']:.0%} of the static bound {bound:.0f} "
            f"({figures['fraction_of_static_batch']:.0%} of the static batch with its prefill, {whole:.0f}); "
            f"ttft p50 {figures['ttft_p50_ms']} ms, "
            f"itl p50 {figures['itl_p50_ms']} ms; {figures['preemptions']} preemptions")
        results.append(figures)
    return {"bench": "engine", "device": str(engine.device), "model": "tiny", "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens, "requests_per_client": requests_per_client, "repeats": repeats,
            "block_size": capacity.block_size, "results": results}


def _prompt(n: int, prompt_tokens: int) -> list[int]:
    return [(31 * n + 7 * i + 1) % 256 for i in range(prompt_tokens)]  # distinct per request


def _run_clients(batch: BatchEngine, clients: int, per_client: int, prompt_tokens: int,
                 max_tokens: int) -> dict[str, Any]:
    sampling = SamplingParams(max_tokens=max_tokens)
    sent = [0] * clients
    busy = [False] * clients  # a client waits for its request to end before it sends the next
    arrived: dict[str, float] = {}
    last_token: dict[str, float] = {}
    ttft, itl = [], []
    tokens = 0
    started = now(batch.engine.device)
    step = 0
    while step < clients or batch.has_work or any(n < per_client for n in sent):
        for client in range(min(step + 1, clients)):  # client c joins at step c
            if not busy[client] and sent[client] < per_client:
                rid = f"c{client}.{sent[client]}"
                batch.add_request(rid, _prompt(client * per_client + sent[client], prompt_tokens), sampling)
                arrived[rid] = time.perf_counter()
                sent[client] += 1
                busy[client] = True
        outputs = batch.step()
        t = now(batch.engine.device)
        for rid, out in outputs:
            if out.finish_reason is not None:
                busy[int(rid[1:rid.index(".")])] = False
            if out.token_id < 0:
                continue
            tokens += 1
            if rid in last_token:
                itl.append(t - last_token[rid])
            else:
                ttft.append(t - arrived[rid])
            last_token[rid] = t
        step += 1
    seconds = now(batch.engine.device) - started
    return {"concurrency": clients, "requests": clients * per_client, "generated_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": percentile_ms(ttft, 50), "ttft_p99_ms": percentile_ms(ttft, 99),
            "itl_p50_ms": percentile_ms(itl, 50), "itl_p99_ms": percentile_ms(itl, 99),
            "preemptions": batch.stats.preemptions, "steps": batch.stats.steps}


def _static_batch(engine: Engine, batch: int, prompt_tokens: int, max_tokens: int) -> tuple[float, float]:
    """Tokens/s of the bare model on one fixed batch of ``batch`` rows: of its decode steps alone, and
    of the whole batch (its prefill included, which gives each row its first token: the whole batch's
    ``max_tokens`` tokens take the prefill and ``max_tokens - 1`` decode steps, as in the engine)."""
    prompts = [_prompt(row, prompt_tokens) for row in range(batch)]
    greedy, no_generators = [SamplingParams(max_tokens=max_tokens)] * batch, [None] * batch
    start = now(engine.device)
    kv_cache, logits = engine.prefill(prompts, max_len=prompt_tokens + max_tokens)  # [B, V]
    prefilled = now(engine.device)
    with torch.inference_mode():
        for step in range(max_tokens):
            token_ids = sample_next(logits, greedy, no_generators)  # [B]
            if step == max_tokens - 1:
                sampled_all = now(engine.device)  # every row has its max_tokens tokens
            logits = engine.decode_step(kv_cache, token_ids)  # [B, V]
    end = now(engine.device)
    return batch * max_tokens / (end - prefilled), batch * max_tokens / (sampled_all - start)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    import json

    print(json.dumps(bench_engine()))
