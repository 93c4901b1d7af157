"""Model architectures behind the engine's packed, paged interface, built from a ``Checkpoint``.

Design note. Every model here offers what the engine calls (``gpu_worker.model.GPT`` is the first):
``forward_packed(token_ids, positions, attention, logits_rows)`` giving float32 logits [M, vocab_size],
``cache_shape(dtype)``, ``max_model_len`` and ``vocab_size``. ``build_model`` picks the architecture
from config.json's ``architectures`` (else its ``model_type``); each loader checks the config and the
tensors it needs and raises ``CheckpointError`` naming what it cannot serve.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from gpu_worker.checkpoint import Checkpoint, CheckpointError
from gpu_worker.models.gpt2 import load_gpt2
from gpu_worker.models.llama import load_llama

Loader = Callable[[Checkpoint, torch.device | str, torch.dtype], nn.Module]


def _llama_family(architecture: str) -> Loader:
    return lambda checkpoint, device, dtype: load_llama(checkpoint, architecture, device, dtype)


LOADERS: dict[str, Loader] = {
    "LlamaForCausalLM": _llama_family("LlamaForCausalLM"),
    "MistralForCausalLM": _llama_family("MistralForCausalLM"),
    "Qwen2ForCausalLM": _llama_family("Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": _llama_family("Qwen3ForCausalLM"),
    "GPT2LMHeadModel": load_gpt2,
}
SUPPORTED_ARCHITECTURES = tuple(LOADERS)
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}  # when config.json names no class
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def architecture_of(checkpoint: Checkpoint) -> str:
    """config.json's first ``architectures`` entry, else the class its ``model_type`` names."""
    names = checkpoint.config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    model_type = checkpoint.config.get("model_type")
    return MODEL_TYPES.get(model_type, f"model_type {model_type!r}") if model_type else "(none given)"


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype config.json declares (``dtype``, or ``torch_dtype`` before transformers 5); float32
    when it declares none."""
    name = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"{checkpoint.source}: dtype {name!r} is not supported; supported: "
                              f"{', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(checkpoint: Checkpoint, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``checkpoint`` in eval mode on ``device``, its weights in ``dtype`` (by default the
    checkpoint's own). Raises ``CheckpointError`` naming an unsupported architecture (and listing the
    supported ones), an unsupported option, or a missing or misshapen tensor."""
    architecture = architecture_of(checkpoint)
    loader = LOADERS.get(architecture)
    if loader is None:
        raise CheckpointError(f"{checkpoint.source}: architecture {architecture} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if checkpoint.config.get("quantization_config") is not None:
        raise CheckpointError(f"{checkpoint.source}: quantized checkpoints (quantization_config) are not "
                              "supported")
    with torch.no_grad():
        return loader(checkpoint, device, dtype or checkpoint_dtype(checkpoint))
