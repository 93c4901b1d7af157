"""On a CUDA GPU the engine gives the CPU's greedy tokens and its KV cache stays exact."""

import pytest
import torch

from gpu_worker.engine import Engine
from gpu_worker.model import KVCache
from scheduler.messages import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_greedy_tokens_equal_cpu_greedy_tokens() -> None:
    cpu, cuda = Engine("cpu"), Engine("cuda")
    assert cuda.device.type == "cuda"
    prompt, sampling = cpu.tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=24)
    assert list(cuda.generate(prompt, sampling)) == list(cpu.generate(prompt, sampling))


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_kv_cache_matches_full_recompute(batch: int) -> None:
    model = Engine("cuda").model
    rows = torch.tensor([[(17 * b + 5 * i) % 256 for i in range(9)] for b in range(batch)], device="cuda")
    cache = KVCache(model.config, batch, max_len=20, device="cuda")
    logits = model(rows, cache)  # prefill, [B, T, V]
    torch.testing.assert_close(logits, model(rows), atol=1e-4, rtol=0)
    for _ in range(8):
        next_ids = logits[:, -1].argmax(dim=-1)  # [B]
        rows = torch.cat([rows, next_ids[:, None]], dim=1)  # [B, T+1]
        logits = model(next_ids[:, None], cache)  # [B, 1, V]
        torch.testing.assert_close(logits[:, -1], model(rows)[:, -1], atol=1e-4, rtol=0)
