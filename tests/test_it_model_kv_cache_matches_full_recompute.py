"""Decoding with the KV cache gives the logits a full recompute of the whole sequence would."""

import pytest
import torch

from gpu_worker.engine import Engine
from gpu_worker.model import GPT, KVCache, build_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def model() -> GPT:
    return build_model()


def full_logits(model: GPT, rows: list[list[int]]) -> torch.Tensor:
    return model(torch.tensor(rows))  # [B, T, V]


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_decode_matches_full_recompute_step_by_step(model: GPT, batch: int) -> None:
    rows = [[(17 * b + 5 * i) % 256 for i in range(9)] for b in range(batch)]
    cache = KVCache(model.config, batch, max_len=20)
    logits = model(torch.tensor(rows), cache)  # prefill
    torch.testing.assert_close(logits, full_logits(model, rows), atol=ATOL, rtol=0)
    for _ in range(8):
        next_ids = logits[:, -1].argmax(dim=-1)  # [B]
        rows = [row + [int(t)] for row, t in zip(rows, next_ids, strict=True)]
        logits = model(next_ids[:, None], cache)  # one decode step, [B, 1, V]
        torch.testing.assert_close(logits[:, -1], full_logits(model, rows)[:, -1], atol=ATOL, rtol=0)
    assert cache.length == len(rows[0])


@torch.inference_mode()
def test_a_multi_token_append_to_a_filled_cache_matches_full_recompute(model: GPT) -> None:
    rows = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
    cache = KVCache(model.config, 1, max_len=12)
    model(torch.tensor([rows[0][:5]]), cache)
    logits = model(torch.tensor([rows[0][5:]]), cache)  # 7 new positions over 5 cached ones
    torch.testing.assert_close(logits, full_logits(model, rows)[:, 5:], atol=ATOL, rtol=0)


def test_engine_batches_prompts_of_different_lengths_like_single_runs() -> None:
    engine = Engine("cpu")
    prompts = [engine.tokenizer.encode("The quick brown fox"), engine.tokenizer.encode("héllo")]
    cache, logits = engine.prefill(prompts, max_len=40)  # left-padded, [2, V]
    seqs = [list(p) for p in prompts]
    for _ in range(6):
        with torch.inference_mode():
            for row, seq in enumerate(seqs):
                expected = full_logits(engine.model, [seq])[0, -1]
                torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)
        next_ids = logits.argmax(dim=-1)  # [2]
        for seq, token in zip(seqs, next_ids.tolist(), strict=True):
            seq.append(token)
        logits = engine.decode_step(cache, next_ids)


@torch.inference_mode()
def test_a_full_cache_refuses_more_tokens(model: GPT) -> None:
    cache = KVCache(model.config, 1, max_len=4)
    model(torch.tensor([[1, 2, 3, 4]]), cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.tensor([[5]]), cache)
