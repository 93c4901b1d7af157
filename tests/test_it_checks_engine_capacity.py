"""A node's engine capacity is checked once, with errors that name the field at fault, and the KV
cache's block count follows from its memory budget."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import CapacityError, EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.kv_cache import CacheShape
from gpu_worker.model import build_model

CPU = torch.device("cpu")
TINY = CacheShape(num_layers=4, num_kv_heads=4, head_dim=32)  # float32: the default model's


@pytest.mark.parametrize(("changes", "field"), [
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 1025}, "block_size"),
    ({"reserved_output_blocks": -1}, "reserved_output_blocks"),
    ({"num_kv_blocks": -1}, "num_kv_blocks"),
    ({"kv_cache_memory_mb": -1}, "kv_cache_memory_mb"),
    ({"num_kv_blocks": 1}, "num_kv_blocks"),  # no more than the one reserved output block
    ({"num_kv_blocks": 3, "reserved_output_blocks": 3}, "num_kv_blocks"),
    ({"max_num_seqs": 2.5}, "max_num_seqs"),
    ({"max_num_batched_tokens": "512"}, "max_num_batched_tokens"),
    ({"block_size": True}, "block_size"),
    ({"num_kv_blocks": None}, "num_kv_blocks"),
    ({"enable_prefix_caching": 1}, "enable_prefix_caching"),
    ({"enable_prefix_caching": "false"}, "enable_prefix_caching"),
], ids=lambda value: repr(value) if isinstance(value, dict) else None)
def test_a_capacity_that_cannot_work_is_refused_by_name(changes: dict, field: str) -> None:
    with pytest.raises(CapacityError) as refused:
        EngineCapacity(**changes).check()
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")


def test_a_capacity_that_works_passes_as_itself() -> None:
    for capacity in (EngineCapacity(), EngineCapacity(max_num_seqs=1, max_num_batched_tokens=1, block_size=1,
                                                      num_kv_blocks=2, reserved_output_blocks=1),
                     EngineCapacity(block_size=1024, reserved_output_blocks=0, enable_prefix_caching=False)):
        assert capacity.check() is capacity


def test_the_batch_engine_refuses_a_capacity_that_cannot_work() -> None:
    with pytest.raises(CapacityError, match="max_num_seqs"):
        BatchEngine(Engine("cpu"), EngineCapacity(max_num_seqs=0))


def test_the_block_count_follows_from_the_memory_budget() -> None:
    assert build_model().cache_shape() == TINY
    assert TINY.bytes_per_block(16) == 64 * 2**10  # k and v, 4 layers, 16 slots, 4 heads x 32 float32
    assert EngineCapacity(kv_cache_memory_mb=1).kv_blocks(TINY, CPU) == 16
    assert EngineCapacity(kv_cache_memory_mb=1, block_size=4).kv_blocks(TINY, CPU) == 64
    assert EngineCapacity(kv_cache_memory_mb=3).kv_blocks(TINY, CPU) == 48
    assert EngineCapacity().kv_blocks(TINY, CPU) == 256 * 16  # 256 MiB on a CPU when none is named
    assert EngineCapacity(num_kv_blocks=7, kv_cache_memory_mb=1).kv_blocks(TINY, CPU) == 7  # named: taken


@pytest.mark.parametrize("capacity", [
    EngineCapacity(kv_cache_memory_mb=1, block_size=1024),  # 4 MiB a block: none fits
    EngineCapacity(kv_cache_memory_mb=1, reserved_output_blocks=16),  # 16 blocks, all of them reserved
])
def test_a_memory_budget_holding_too_few_blocks_is_refused(capacity: EngineCapacity) -> None:
    with pytest.raises(CapacityError, match=r"kv_cache_memory_mb: 1\.0 MiB hold only \d+ block") as refused:
        capacity.check().kv_blocks(TINY, CPU)
    assert refused.value.field == "kv_cache_memory_mb"
