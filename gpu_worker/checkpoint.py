"""Checkpoints on disk, read into one form whatever their format.

Design note. A ``Checkpoint`` is what every model loader needs and nothing more: the model's
configuration in Hugging Face's ``config.json`` spelling (a GGUF file's metadata is translated into
it), its tensors under Hugging Face's parameter names, and where its tokenizer comes from. Reading a
Hugging Face directory lives here; reading a GGUF file lives in ``gpu_worker.gguf_checkpoint``;
building a model from either lives in ``gpu_worker.models``.

Only safetensors weights are read: a ``pytorch_model.bin`` is a pickle, and unpickling a file runs
whatever code it names. The safetensors library checks each file as it loads it; when it refuses
one, its header is read again here to say in bytes what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.checkpoint_files import read_json_object, safetensors_problem

__all__ = ["Checkpoint", "CheckpointError", "read_hf_checkpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
REQUIRED = object()  # ``Checkpoint.option``'s default for a key that must be given


@dataclass
class Checkpoint:
    config: dict[str, Any]  # config.json's keys (GGUF metadata translated into them)
    tensors: dict[str, torch.Tensor]  # Hugging Face parameter names -> tensors (float, on the CPU)
    source: str  # the path it was read from
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else a loader found worth keeping

    def tensor(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """The tensor ``name``, which must have ``shape``; ``CheckpointError`` naming it otherwise."""
        found = self.tensors.get(name)
        if found is None:
            raise CheckpointError(f"{self.source}: tensor {name} is missing")
        if tuple(found.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: tensor {name} has shape {list(found.shape)}, the config "
                                  f"asks for {list(shape)}")
        return found

    def option(self, key: str, kind: type, default: Any = REQUIRED) -> Any:
        """Config key ``key`` as a ``kind`` (bool, int, float, str, dict or list); ``default`` when it is
        absent or null. ``CheckpointError`` naming the key for a missing required one or a wrong type."""
        value = self.config.get(key)
        if value is None:
            if default is REQUIRED:
                raise CheckpointError(f"{self.source}: the config lacks {key!r}")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.source}: config {key}={value!r} is not a {kind.__name__}")
        return value


def read_hf_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint in Hugging Face directory ``path``: ``config.json`` and ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``. ``metadata`` keeps ``generation_config.json`` (its
    ``eos_token_id`` may differ from config.json's) and the weight files read.

    Raises ``CheckpointError`` naming the file for anything missing, unreadable or cut short.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint path {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is not a directory (a Hugging Face checkpoint is a "
                              "directory with config.json and *.safetensors)")
    config = read_json_object(folder / "config.json", missing="not a Hugging Face checkpoint directory")
    files, weight_map = _weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_load_safetensors(file))
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{folder / INDEX_FILE} places tensor {name} in {shard}, which does not "
                                  "hold it")
    metadata: dict[str, Any] = {"files": [f.name for f in files]}
    generation = folder / "generation_config.json"
    if generation.is_file():
        metadata["generation_config"] = read_json_object(generation, missing="")
    return Checkpoint(config, tensors, str(folder), metadata)


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files to read: the single file, else the shards the index names (each there,
    returned with the index's map of tensor names to shards)."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], {}
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index, missing="").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                raise CheckpointError(f"{index} names shard {name}, which is not in {folder}")
        return [folder / name for name in names], weight_map
    pickles = [name for name in PICKLES if (folder / name).exists()]
    if pickles:
        raise CheckpointError(f"{folder} holds {pickles[0]}: only safetensors checkpoints are supported "
                              "(pytorch_model.bin is a pickle, and unpickling runs code)")
    raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as exc:
        why = safetensors_problem(file) or exc
        raise CheckpointError(f"{file} is not a readable safetensors file: {why}") from None
