"""JSON wire types shared by the API, the schedulers and the nodes.

Every message is a dataclass with ``to_dict``/``from_dict``; nothing here is ever pickled. A result is
either a token (``token_id`` set), a final marker (``finished``), or an error (``error`` set and no
output): all three parse the same way, so one bad result can never take a batch down with it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from scheduler.config import validate_name
from scheduler.errors import InvalidRequest

MAX_REQUEST_ID_LEN = 128
MAX_PROMPT_CHARS = 1_000_000
MAX_STOP_STRINGS = 4  # stop strings a request may carry (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters of one stop string at most


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, 0 < p <= 1
    top_k: int = 0  # 0 = off
    seed: int | None = None  # reproducible sampling when set
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings (gpu_worker.stop)

    def __post_init__(self) -> None:
        # a JSON list arrives (a tuple keeps it hashable); one string is one stop string, as in OpenAI's API
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)


@dataclass
class Request:
    """A request as the schedulers and nodes see it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    topic: str = "default"
    arrival_time: float = field(default_factory=time.time)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def to_dict(self) -> dict[str, Any]:
        # By hand rather than dataclasses.asdict, which deep-copies the prompt: this runs per put.
        s = self.sampling
        sampling = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "top_k": s.top_k, "seed": s.seed}
        if s.stop:  # only when set: a request without stop strings reads as before they existed
            sampling["stop"] = list(s.stop)
        return {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "sampling": sampling, "topic": self.topic, "arrival_time": self.arrival_time}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        data = dict(data)
        data["sampling"] = SamplingParams(**data.get("sampling") or {})
        return cls(**data)


@dataclass
class Result:
    """One step of a request's output, as it travels back to the request's origin."""

    request_id: str
    index: int = -1  # position of the token in the output; -1 for a final or error result
    token_id: int | None = None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop", or a terminal status for non-generation ends
    error: dict[str, str] | None = None  # {"code": ..., "message": ...}

    @property
    def is_error(self) -> bool:
        return self.error is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Result:
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """Any result shape (token, final, error) parses; unknown fields are ignored."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def failure(cls, request_id: str, code: str, message: str) -> Result:
        return cls(request_id, finished=True, error={"code": code, "message": message})


def parse_submission(body: Any, *, max_model_len: int, encode,
                     vocab_size: int) -> tuple[Request, str | None, str | None]:
    """Validate a submission body of ``POST /api/v1/topics/{topic}/requests``.

    Returns (request, client request id or None, requested home node or None). ``encode`` turns the
    prompt text into the topic's model's token ids; ``prompt_token_ids`` must lie in ``0..vocab_size-1``.
    Raises ``InvalidRequest`` naming the field at fault.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    allowed = {"prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "request_id", "node", "stream"}
    for key in body:
        if key not in allowed:
            raise InvalidRequest(f"unknown field '{key}'", field=str(key))
    prompt_ids = _parse_prompt(body, encode, vocab_size)
    sampling = SamplingParams(
        max_tokens=_int(body, "max_tokens", 16, low=1, high=max_model_len),
        temperature=_float(body, "temperature", 0.0, low=0.0, high=100.0),
        top_p=_float(body, "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        top_k=_int(body, "top_k", 0, low=0, high=1_000_000),
        seed=_int(body, "seed", None, low=-(2**63), high=2**63 - 1),
        stop=_stop(body.get("stop")),
    )
    if len(prompt_ids) >= max_model_len:
        prompt_field = "prompt" if "prompt" in body else "prompt_token_ids"
        raise InvalidRequest(
            f"{prompt_field} ({len(prompt_ids)} tokens) leaves no room to generate in the model's "
            f"context of {max_model_len} tokens",
            field=prompt_field,
        )
    if len(prompt_ids) + sampling.max_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
            f"the model's context of {max_model_len} tokens",
            field="max_tokens",
        )
    request_id = body.get("request_id")
    if request_id is not None:
        validate_request_id(request_id)
    node = body.get("node")
    if node is not None:
        validate_name(node, "node", InvalidRequest)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream must be true or false", field="stream")
    request = Request(request_id=request_id or "", prompt_token_ids=prompt_ids, sampling=sampling)
    return request, request_id, node


def validate_request_id(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REQUEST_ID_LEN:
        raise InvalidRequest(
            f"request_id must be a string of 1-{MAX_REQUEST_ID_LEN} printable characters",
            field="request_id",
        )
    if not value.isprintable():
        raise InvalidRequest("request_id must contain only printable characters", field="request_id")
    if value.endswith("/stream"):
        raise InvalidRequest("request_id must not end with '/stream' (that URL is the request's stream)",
                          field="request_id")
    return value


def _parse_prompt(body: dict[str, Any], encode, vocab_size: int) -> list[int]:
    has_text, has_ids = "prompt" in body, "prompt_token_ids" in body
    if has_text == has_ids:
        raise InvalidRequest("give exactly one of prompt, prompt_token_ids and messages", field="prompt")
    if has_text:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string", field="prompt")
        if not prompt:
            raise InvalidRequest("prompt must not be empty", field="prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest("prompt is too long", field="prompt")
        ids = list(encode(prompt))
        if not ids:  # a model's tokenizer may drop what it cannot represent (the byte model never does)
            raise InvalidRequest("prompt encodes to no tokens of the topic's model", field="prompt")
        return ids
    ids = body["prompt_token_ids"]
    if not isinstance(ids, list) or not ids:
        raise InvalidRequest("prompt_token_ids must be a non-empty list of integers",
                             field="prompt_token_ids")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"prompt_token_ids must hold token ids of the topic's model's vocabulary: integers from 0 to "
                f"{vocab_size - 1}", field="prompt_token_ids"
            )
    return ids


def _int(body: dict[str, Any], name: str, default: int | None, *, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer", field=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", field=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    """OpenAI's ``stop``: null, one string, or a list of up to ``MAX_STOP_STRINGS`` strings."""
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list):
        raise InvalidRequest("stop must be a string or a list of strings", field="stop")
    if len(strings) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop holds {len(strings)} strings: at most {MAX_STOP_STRINGS} are allowed",
                             field="stop")
    for s in strings:
        if not isinstance(s, str):
            raise InvalidRequest("stop must be a string or a list of strings", field="stop")
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidRequest(f"each stop string must be 1 to {MAX_STOP_CHARS} characters long",
                                 field="stop")
    return tuple(strings)


def _float(body: dict[str, Any], name: str, default: float, *, low: float, high: float,
           open_low: bool = False) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number", field=name)
    if value > high or value < low or (open_low and value == low):
        bound = f"greater than {low:g}" if open_low else f"at least {low:g}"
        raise InvalidRequest(f"{name} must be {bound} and at most {high:g}", field=name)
    return float(value)
