"""Loading a topic's model onto a node's device: weights, tokenizer, and the key KV handoffs check.

Design note. ``gpu_worker.model_source`` says where a model's files are and checks them cheaply;
here they are read (``gpu_worker.checkpoint`` for Hugging Face directories, ``gpu_worker.gguf_checkpoint``
for GGUF files), built into one of ``gpu_worker.models``' architectures in the requested dtype, and
paired with the model's tokenizer. Two nodes may exchange KV caches (splitwise) or resume each
other's requests only when they serve the same weights in the same dtype: ``handoff_key`` is a
``GPTConfig``-shaped key of the cache's sizes whose ``seed`` is a digest of the checkpoint's files
and the dtype, which is what ``gpu_worker.kv_transfer`` compares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.model import GPTConfig
from gpu_worker.model_source import ModelInfo, inspect, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIGEST_EDGE = 1 << 20  # bytes hashed at each end of every weight file: cheap, and any re-export differs


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` or "" = float32 on the CPU, bfloat16 on CUDA; else one of ``DTYPES``."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported: use {', '.join(DTYPES)}")
        return name
    if not name:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"FD_DTYPE {name!r} is not supported: use {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    info: ModelInfo
    model: torch.nn.Module  # forward_packed, cache_shape, max_model_len, vocab_size
    tokenizer: Any  # gpu_worker.hf_tokenizer.HFTokenizer
    handoff_key: GPTConfig
    eos_token_ids: frozenset[int]  # the tokenizer's, config.json's and generation_config.json's


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Model ``name`` (a checkpoint: not ``tiny``) on ``device`` in ``dtype``. Raises ``CheckpointError``
    naming what is wrong with the files."""
    from gpu_worker.models import build_model

    info = inspect(name)
    path = info.source.path
    if info.source.kind == "gguf":
        from gpu_worker.gguf_checkpoint import read_gguf_checkpoint

        checkpoint = read_gguf_checkpoint(path, dtype)
    else:
        from gpu_worker.checkpoint import read_hf_checkpoint

        checkpoint = read_hf_checkpoint(path)
    model = build_model(checkpoint, device, dtype)
    tokenizer = load_tokenizer(name)
    eos = set(tokenizer.eos_token_ids) | _ids(checkpoint.config.get("eos_token_id"))
    eos |= _ids(checkpoint.metadata.get("generation_config", {}).get("eos_token_id"))
    del checkpoint  # the CPU copies of the weights
    shape = model.cache_shape(dtype)
    key = GPTConfig(block_size=model.max_model_len, vocab_size=model.vocab_size, vocab_multiple=1,
                    n_layer=shape.num_layers, n_head=shape.num_kv_heads,
                    n_embd=shape.num_kv_heads * shape.head_dim, seed=_digest(info, dtype))
    return LoadedModel(info, model, tokenizer, key, frozenset(eos))


def _ids(value: Any) -> set[int]:
    """An ``eos_token_id`` of config.json or generation_config.json: an id, a list of ids, or none."""
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def _digest(info: ModelInfo, dtype: torch.dtype) -> int:
    """63 bits of a hash over the model's configuration, its files' names, sizes and ends, and dtype."""
    h = hashlib.sha256(json.dumps(info.config, sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    path = Path(info.source.path)
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix not in (".safetensors", ".gguf", ".json"):
            continue
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        try:
            with file.open("rb") as f:
                h.update(f.read(DIGEST_EDGE))
                f.seek(max(0, size - DIGEST_EDGE))
                h.update(f.read(DIGEST_EDGE))
        except OSError as exc:
            raise CheckpointError(f"{file} cannot be read: {exc}") from None
    return int.from_bytes(h.digest()[:8], "big") >> 1
