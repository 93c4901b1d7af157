"""A checkpoint's small files, read without torch: its JSON objects and its safetensors headers.

Shared by the console's cheap check (``gpu_worker.model_source``), the weights' reader
(``gpu_worker.checkpoint``) and the tokenizer (``gpu_worker.hf_tokenizer``), so that a broken file is
named in the same words wherever it is met.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpu_worker.checkpoint_errors import CheckpointError


def read_json_object(file: Path, missing: str | None) -> dict[str, Any]:
    """The JSON object in ``file``. A missing file is {} when ``missing`` is None, else a
    ``CheckpointError`` ("<folder> has no <name>: <missing>"); invalid JSON or another JSON value is one
    too."""
    if not file.is_file():
        if missing is None:
            return {}
        raise CheckpointError(f"{file.parent} has no {file.name}: {missing}")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} must hold a JSON object, found {type(value).__name__}")
    return value


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with safetensors ``file``, from its header and its size ("truncated: its tensors
    need N bytes, the file has M", or why the header does not parse); None when it looks whole."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + header_len > size:
                return f"truncated: its header needs {8 + header_len} bytes, the file has {size}"
            header = json.loads(f.read(header_len))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"its header does not parse: {exc}"
    if 8 + header_len + end > size:
        return f"truncated: its tensors need {8 + header_len + end} bytes, the file has {size}"
    return None
