"""A node's capacity: how many sequences it batches, its per-step token budget, and its KV cache.

The node record (the console's admin) holds these; ``EngineCapacity.check`` is the one validation,
used by the admin form and by the engine, and its errors name the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from gpu_worker.kv_cache import CacheShape

CPU_KV_CACHE_MB = 256  # the KV cache's memory budget on a CPU when the node names none
CUDA_KV_CACHE_FRACTION = 0.5  # of the device's free memory after the model is loaded, when none is named
MAX_BLOCK_SIZE = 1024


class CapacityError(ValueError):
    """A capacity setting that cannot work; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class EngineCapacity:
    max_num_seqs: int = 32  # sequences running together in one batch
    max_num_batched_tokens: int = 2048  # tokens one step computes at most (decodes plus prefill chunks)
    num_kv_blocks: int = 0  # KV cache blocks; 0: as many as kv_cache_memory_mb holds
    kv_cache_memory_mb: int = 0  # KV cache budget in MiB; 0: 256 on a CPU, half the free memory on CUDA
    block_size: int = 16  # token slots per KV block
    reserved_output_blocks: int = 1  # blocks a request must leave free for its output to be admitted
    enable_prefix_caching: bool = True  # share the blocks of equal prompt prefixes between requests

    def check(self) -> EngineCapacity:
        """Itself, or a CapacityError naming the first field that cannot work."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise CapacityError(f.name, f"must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise CapacityError(f.name, f"must be an integer, got {value!r}")
        _at_least(self, "max_num_seqs", 1)
        _at_least(self, "max_num_batched_tokens", 1)
        _at_least(self, "num_kv_blocks", 0)
        _at_least(self, "kv_cache_memory_mb", 0)
        _at_least(self, "block_size", 1)
        _at_least(self, "reserved_output_blocks", 0)
        if self.block_size > MAX_BLOCK_SIZE:
            raise CapacityError("block_size", f"must be at most {MAX_BLOCK_SIZE}, got {self.block_size}")
        if self.num_kv_blocks and self.num_kv_blocks <= self.reserved_output_blocks:
            raise CapacityError("num_kv_blocks", f"{self.num_kv_blocks} blocks leave no room beside "
                                f"reserved_output_blocks={self.reserved_output_blocks}: "
                                "nothing could be admitted")
        return self

    def kv_blocks(self, shape: CacheShape, device: torch.device) -> int:
        """How many blocks the KV cache gets on ``device`` for a model of ``shape``."""
        if self.num_kv_blocks:
            return self.num_kv_blocks
        budget = self.kv_cache_memory_mb * 2**20
        if not budget:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * CUDA_KV_CACHE_FRACTION)
            else:
                budget = CPU_KV_CACHE_MB * 2**20
        blocks = budget // shape.bytes_per_block(self.block_size)
        if blocks <= self.reserved_output_blocks:
            raise CapacityError("kv_cache_memory_mb", f"{budget / 2**20:.1f} MiB hold only {blocks} block(s) "
                                f"of "
                                f"{self.block_size} tokens for this model: raise it or lower block_size")
        return blocks


def _at_least(capacity: EngineCapacity, name: str, low: int) -> None:
    value = getattr(capacity, name)
    if value < low:
        raise CapacityError(name, f"must be at least {low}, got {value}")
