"""JSON wire types shared by the API, the schedulers and the nodes.

Every message is a dataclass with ``to_dict``/``from_dict``; nothing here is ever pickled. A result is
either a token (``token_id`` set), a final marker (``finished``), or an error (``error`` set and no
output): all three parse the same way, so one bad result can never take a batch down with it.

A submission's body is ``SubmissionBody``, a pydantic model: the API validates it at its edge, the
OpenAPI schema is generated from it, and ``parse_submission`` checks it against the topic's model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from scheduler.errors import InvalidRequest
from scheduler.validation import NO_CONTROLS, FieldValueError, Name, integer, optional, validated

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


class ChatTurn(BaseModel):
    """One message of a chat (extra keys are ignored)."""

    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
TokenCount = integer(ge=1)
TokenId = integer(ge=0)
TopK = integer(ge=0, le=1_000_000)
Seed = integer(ge=-(2**63), le=2**63 - 1)
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


def _request_id(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must contain only printable characters")
    if value.endswith("/stream"):
        raise ValueError("must not end with '/stream' (that URL is the request's stream)")
    return value


# The pattern keeps control characters out (what a schema can say of "printable"); _request_id decides.
# "/stream" is the URL of the request's stream.
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_LEN, pattern=NO_CONTROLS,
                                 json_schema_extra={"not": {"pattern": "/stream$"}}),
                      AfterValidator(_request_id)]


class SubmissionBody(BaseModel):
    """The body of ``POST /api/v1/topics/{topic}/requests``: each field's type and range, and exactly one
    prompt. What depends on the topic's model (the prompt's length in its tokens, the ids of its
    vocabulary, its context, its chat template) is checked next (``parse_submission``)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": [name]} for name in PROMPT_FIELDS]})

    prompt: str = optional("The prompt text, encoded with the topic's model's tokenizer. Give exactly one "
                           "of prompt, prompt_token_ids and messages.", min_length=1,
                           max_length=MAX_PROMPT_CHARS)
    prompt_token_ids: list[TokenId] = optional(
        "The prompt as token ids of the topic's model's vocabulary.", min_length=1)
    messages: list[ChatTurn] = optional(
        "A chat, rendered into the prompt by the topic's model's chat template (a model without one "
        "refuses it).", min_length=1)
    max_tokens: TokenCount = Field(16, description="Tokens to generate at most; the prompt plus these "
                                   "must fit in the model's context.")
    temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False,
                               description="Sampling temperature; 0 is greedy (deterministic).")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                         description="Nucleus sampling: the probability mass kept.")
    top_k: TopK = Field(0, description="Sample from the k likeliest tokens; 0 is off.")
    seed: Seed | None = Field(None, description="Makes sampling reproducible.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings that end the generation; the text ends before "
        "the first of them.")
    request_id: RequestId | None = Field(
        None, description=f"The request's id: 1-{MAX_REQUEST_ID_LEN} printable characters, unique across "
        "the console (409 when taken), not ending with '/stream'. Generated when left out.")
    node: Name | None = Field(None, description="The node to queue it on (by default the topic's next "
                              "enabled node in turn).")
    stream: bool = Field(False, description="Accepted and ignored: the answer is the request object either "
                         "way; its tokens stream at GET /api/v1/requests/{id}/stream.")

    @model_validator(mode="after")
    def one_prompt(self) -> SubmissionBody:
        given = [name for name in PROMPT_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise FieldValueError("messages" if "messages" in given else "prompt",
                                  "give exactly one of prompt, prompt_token_ids and messages")
        return self


def parse_submission(body: Any, *, max_model_len: int, encode,
                     vocab_size: int) -> tuple[Request, str | None, str | None]:
    """Validate a submission body of ``POST /api/v1/topics/{topic}/requests`` against the topic's model.

    ``body`` is a ``SubmissionBody`` (a chat already rendered into ``prompt_token_ids``), or a decoded
    JSON body, validated as one first. Returns (request, client request id or None, requested home node
    or None). ``encode`` turns the prompt text into the topic's model's token ids; ``prompt_token_ids``
    must lie in ``0..vocab_size-1``. Raises ``InvalidRequest`` naming the field at fault.
    """
    if not isinstance(body, SubmissionBody):
        body = validated(SubmissionBody, body, InvalidRequest)
    assert body.messages is None, "a chat is rendered into prompt_token_ids before it is parsed"
    if body.prompt_token_ids is not None:  # its length first: a list too long is not even scanned
        _refuse_no_room("prompt_token_ids", len(body.prompt_token_ids), max_model_len)
    prompt_ids = _prompt_ids(body, encode, vocab_size)
    if body.max_tokens > max_model_len:
        raise InvalidRequest(f"max_tokens must be between 1 and {max_model_len}", field="max_tokens")
    if body.prompt is not None:
        _refuse_no_room("prompt", len(prompt_ids), max_model_len)
    if len(prompt_ids) + body.max_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({body.max_tokens}) exceeds "
            f"the model's context of {max_model_len} tokens",
            field="max_tokens",
        )
    sampling = SamplingParams(max_tokens=body.max_tokens, temperature=float(body.temperature),
                              top_p=float(body.top_p), top_k=body.top_k, seed=body.seed, stop=body.stop or ())
    request = Request(request_id=body.request_id or "", prompt_token_ids=prompt_ids, sampling=sampling)
    return request, body.request_id, body.node


def _refuse_no_room(field: str, num_tokens: int, max_model_len: int) -> None:
    if num_tokens >= max_model_len:
        raise InvalidRequest(f"{field} ({num_tokens} tokens) leaves no room to generate in the model's "
                             f"context of {max_model_len} tokens", field=field)


def _prompt_ids(body: SubmissionBody, encode, vocab_size: int) -> list[int]:
    if body.prompt is not None:
        ids = list(encode(body.prompt))
        if not ids:  # a model's tokenizer may drop what it cannot represent (the byte model never does)
            raise InvalidRequest("prompt encodes to no tokens of the topic's model", field="prompt")
        return ids
    ids = body.prompt_token_ids
    if not ids:  # a chat the template rendered into nothing
        raise InvalidRequest("prompt_token_ids must not be empty", field="prompt_token_ids")
    if max(ids) >= vocab_size:
        raise InvalidRequest(
            f"prompt_token_ids must hold token ids of the topic's model's vocabulary: integers from 0 to "
            f"{vocab_size - 1}", field="prompt_token_ids"
        )
    return list(ids)
