"""Model benchmark: load time, prefill time and decode throughput of a model as the node serves it,
beside ``transformers``' own ``generate`` on the same checkpoint when that is installed.

Design note. For each batch size B, B requests with distinct prompts of ``prompt_tokens`` tokens go
into a fresh ``BatchEngine`` together; prefill time is from adding them to the step that gave every
one its first token, decode throughput is the tokens after those over the time after them. Requests
end at ``max_tokens`` only (end of text is ignored, as ``vllm bench``'s ``--ignore-eos``), so every
run does the same work. ``transformers`` is timed the same way: ``generate`` for one new token is the
prefill; ``generate`` for ``max_tokens`` (``min_new_tokens`` equal, greedy) less that is the decode.
Each figure is the median of ``repeats`` runs after an untimed warm-up. ``transformers`` is a
development dependency: without it its figures are absent. ``tiny`` is GPT-2's architecture, so it is
compared with ``transformers``' GPT-2 carrying its weights. Progress goes to stderr; the caller prints
the returned dict.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.model_source import TINY
from scheduler.messages import SamplingParams


def bench_model(model: str = TINY, device: str = "auto", batches: list[int] | None = None,
                prompt_tokens: int = 128, max_tokens: int = 128, repeats: int = 3,
                dtype: str | None = None, reference: bool = True) -> dict[str, Any]:
    """{"bench": "model", "model", "device", "dtype", "load_s", "prefill_ms", "decode_tokens_per_s"
    (of the first batch size), "results": [per batch size, with transformers' figures and the ratio]}."""
    batches = batches or [1, 16]
    if min(*batches, prompt_tokens, max_tokens, repeats) < 1:
        raise ValueError("--batch, --prompt-tokens, --max-tokens and --repeats must all be at least 1")
    if max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2: decoding starts after the first token")
    started = time.perf_counter()
    engine = Engine(device, model=model, dtype=dtype)
    load_s = time.perf_counter() - started
    if prompt_tokens + max_tokens > engine.max_model_len:
        raise ValueError(f"--prompt-tokens plus --max-tokens must be at most the model's context of "
                         f"{engine.max_model_len}")
    engine.eos_token_ids = frozenset()  # every request runs to max_tokens (see the design note)
    log(f"bench model: {model} on {engine.device} ({engine.dtype}), loaded in {load_s:.2f} s; "
        f"batches {batches}, prompt_tokens={prompt_tokens} max_tokens={max_tokens}")
    hf = _reference(model, engine) if reference else None
    results = []
    for batch in batches:
        prompts = [_prompt(row, prompt_tokens, engine.vocab_size) for row in range(batch)]
        capacity = EngineCapacity(max_num_seqs=max(batch, 1),
                                  max_num_batched_tokens=max(2048, batch * prompt_tokens))
        ours = _median_runs(_run_engine, (engine, capacity, prompts, max_tokens), repeats)
        row = {"batch": batch, "prefill_ms": round(ours[0] * 1e3, 3),
               "decode_tokens_per_s": round(batch * (max_tokens - 1) / ours[1], 1)}
        if hf is not None:
            theirs = _median_runs(_run_transformers, (hf, prompts, max_tokens, engine.device), repeats)
            row["transformers_prefill_ms"] = round(theirs[0] * 1e3, 3)
            rate = round(batch * (max_tokens - 1) / theirs[1], 1)
            row["transformers_decode_tokens_per_s"] = rate
            row["decode_ratio"] = round(row["decode_tokens_per_s"] / rate, 3)
            row["prefill_ratio"] = round(row["transformers_prefill_ms"] / row["prefill_ms"], 3)
        log(f"batch {batch}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "batch"))
        results.append(row)
    dtype_name = str(engine.dtype).removeprefix("torch.")
    return {"bench": "model", "model": model, "device": str(engine.device), "dtype": dtype_name,
            "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "load_s": round(load_s, 3),
            "transformers": hf is not None, "prefill_ms": results[0]["prefill_ms"],
            "decode_tokens_per_s": results[0]["decode_tokens_per_s"], "results": results}


def _prompt(row: int, prompt_tokens: int, vocab_size: int) -> list[int]:
    """Distinct per row, away from the low ids where special tokens usually sit."""
    low = min(1000, vocab_size // 4)
    return [low + (31 * row + 7 * i + 1) % (vocab_size - low) for i in range(prompt_tokens)]


def _median_runs(run, args: tuple, repeats: int) -> tuple[float, float]:
    run(*args)  # warm-up
    prefill, decode = zip(*(run(*args) for _ in range(repeats)), strict=True)
    return statistics.median(prefill), statistics.median(decode)


def _run_engine(engine: Engine, capacity: EngineCapacity, prompts: list[list[int]],
                max_tokens: int) -> tuple[float, float]:
    """Seconds to every first token, and seconds of the decoding after it."""
    batch = BatchEngine(engine, capacity)
    sampling = SamplingParams(max_tokens=max_tokens)
    start = now(engine.device)
    for row, prompt in enumerate(prompts):
        batch.add_request(f"r{row}", prompt, sampling)
    first: set[str] = set()
    prefilled = None
    while batch.has_work:
        for rid, _ in batch.step():
            first.add(rid)
        if prefilled is None and len(first) == len(prompts):
            prefilled = now(engine.device)
    return prefilled - start, now(engine.device) - prefilled


def _reference(model: str, engine: Engine):
    """``transformers``' model for the same checkpoint, or None (not installed, or ``tiny``)."""
    try:
        from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    except ImportError:
        log("transformers: not installed (a development dependency); not compared")
        return None
    if model == TINY:
        reference = GPT2LMHeadModel(GPT2Config(**tiny_as_gpt2_config(engine.model.config)))
        reference.load_state_dict(tiny_as_gpt2_weights(engine.model))
        return reference.to(engine.device, engine.dtype).eval()
    from gpu_worker.model_source import resolve

    source = resolve(model)
    dtype = engine.dtype
    if source.kind == "gguf":  # the very weights the engine serves, dequantised by gguf_checkpoint
        from transformers import AutoConfig

        from gpu_worker.gguf_checkpoint import read_gguf_checkpoint

        checkpoint = read_gguf_checkpoint(source.path)
        config = dict(checkpoint.config)
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                                     dtype=dtype)
        missing, unexpected = reference.load_state_dict(checkpoint.tensors, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is not in the file
            raise ValueError(f"transformers' model does not take {source.path}'s tensors: missing {missing}, "
                             f"unexpected {unexpected}")
    else:
        reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return reference.to(engine.device).eval()


def tiny_as_gpt2_config(config) -> dict[str, Any]:
    """The built-in model is GPT-2's architecture with exact GELU, an untied head and a padded vocabulary:
    ``GPT2Config`` keys that say so."""
    return {"vocab_size": config.padded_vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "activation_function": "gelu",
            "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "architectures": ["GPT2LMHeadModel"],
            "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1}  # end of text


def tiny_as_gpt2_weights(model) -> dict[str, torch.Tensor]:
    """The built-in model's weights under GPT-2's names (its Conv1D layers store [in, out])."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("lm_head."):
            weights[name] = tensor
            continue
        conv = name.endswith(".weight") and any(f".{kind}." in name for kind in ("c_attn", "c_proj", "c_fc"))
        weights[name] = tensor.t().contiguous() if conv else tensor
    return weights


def _run_transformers(reference, prompts: list[list[int]], max_tokens: int,
                      device: torch.device) -> tuple[float, float]:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)  # [B, P]: equal lengths, no padding
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        start = now(device)
        reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        prefill = now(device) - start
        start = now(device)
        reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens)
        whole = now(device) - start
    return prefill, max(whole - prefill, 1e-9)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously; time what has finished
    return time.perf_counter()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    print(json.dumps(bench_model()))
