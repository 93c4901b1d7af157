"""The OpenAI-compatible API's wire types: one pydantic model per request body and per answer, and
``ENDPOINTS``, the registry the views are built from (and from which the OpenAPI schema is generated).

Input is validated here and only here: each request model says what fdconsole takes (``extra="allow"``:
fields it does not know are accepted and ignored, as OpenAI's clients expect) and what it refuses by
name (``n`` > 1, tools, logprobs, non-text content...), each field with a description that the error
messages and the OpenAPI schema both show. ``native_sampling`` and the prompt accessors turn a valid
request into the native body of ``fdconsole.inference.submit``.

Nothing here imports Django: these models are plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from fdconsole.api.schemas import IDEMPOTENCY_KEY, HttpParameter
from scheduler.messages import MAX_REQUEST_ID_LEN, MAX_STOP_CHARS, MAX_STOP_STRINGS
from scheduler.validation import integer

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # a sensible answer's length; OpenAI's own default is the context left


class RequestBody(BaseModel):
    """A request body: strictly typed (no "5" for 5; 4.0 is 4, as in JSON Schema), unknown fields accepted
    and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class Answer(BaseModel):
    """An answer's body: what fdconsole sends, fields as OpenAI names them."""

    model_config = ConfigDict(extra="forbid")


# -- what both generation endpoints take ------------------------------------------------------------
NonEmptyString = Annotated[str, StringConstraints(min_length=1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Probability = Annotated[float, Field(gt=0, le=1)]
# Integers as JSON Schema's: 4.0 is the integer 4 (what the published schema says, and schemathesis sends).
TokenCount = integer(ge=1)
TokenId = integer(ge=0)
TopK = integer(ge=-1)
Seed = integer(ge=-(2**63), le=2**63 - 1)


class StreamOptions(RequestBody):
    include_usage: bool | None = Field(None, description="Send a last chunk with the usage and no choices "
                                       "(null: false).")


class GenerationRequest(RequestBody):
    """The fields that completions and chat completions share."""

    model: str = Field(description="The topic to run the request on (a model id of GET /v1/models).")
    max_tokens: TokenCount | None = Field(None, description="Tokens to generate at most (default: see "
                                          "each endpoint; never beyond the model's context).")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature: 0 is greedy "
                                      "(deterministic); the default is 1, as OpenAI's.")
    top_p: Probability | None = Field(None, description="Nucleus sampling: the probability mass kept, "
                                      "0 < top_p <= 1 (default 1).")
    top_k: TopK | None = Field(None, description="Sample from the k likeliest tokens only; 0 or -1 "
                               "(the default) is off. An extension of OpenAI's API, as vLLM's.")
    seed: Seed | None = Field(None, description="Makes sampling reproducible.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings that end the generation; the text returned "
        "ends before the first of them.")
    stream: bool | None = Field(None, description="Stream the answer as Server-Sent Events of chunks, "
                                "ending with 'data: [DONE]' (null: false).")
    stream_options: StreamOptions | None = Field(None, description="Options of a streamed answer.")
    n: Literal[1] | None = Field(None, description="How many choices to generate: only 1 is supported.")
    presence_penalty: float | None = Field(None, description="Penalties are not supported: 0 (or null) "
                                           "only.")
    frequency_penalty: float | None = Field(None, description="Penalties are not supported: 0 (or null) "
                                            "only.")
    logit_bias: dict[str, Any] | None = Field(None, description="Logit biases are not supported: {} (or "
                                              "null) only.")
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REQUEST_ID_LEN)] | None = Field(
        None, description="The request's id in the console (an fdconsole extension). Sending it again with "
        "the same body reattaches to the request, running or finished, instead of running it twice.")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def no_penalty(cls, value: float | None) -> float | None:
        if value:  # clients send 0 by default: that is no penalty, honoured
            raise ValueError(f"penalties are not supported: send 0 or leave it out, not {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def no_logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("logit biases are not supported: send {} or leave it out")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def native_sampling(self, max_tokens: int) -> dict[str, Any]:
        """The sampling fields of the native body with OpenAI's defaults filled in; ``max_tokens`` is what
        ``resolved_max_tokens`` says."""
        body: dict[str, Any] = {
            "max_tokens": max_tokens, "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p, "top_k": max(self.top_k or 0, 0),
            "seed": self.seed,
        }
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop:
            body["stop"] = stop
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return body


# -- POST /v1/completions ---------------------------------------------------------------------------
class CompletionRequest(GenerationRequest):
    prompt: NonEmptyString | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="A string, or a list of token ids (a list of one prompt is that prompt; batches are "
        "not supported).")
    logprobs: Literal[0, False] | None = Field(None, description="Log probabilities are not supported.")
    echo: Literal[False] | None = Field(None, description="Echoing the prompt back is not supported.")
    best_of: Literal[1] | None = Field(None, description="Only best_of 1 is supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, value: Any) -> Any:
        """A batch of one is that prompt; a batch of more is refused (OpenAI's list forms)."""
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"a batch of {len(value)} prompts is not supported: send one prompt per "
                                 "request")
            return value[0]
        return value

    def resolved_max_tokens(self, context_left: int) -> int:
        """The tokens to generate at most: as sent, else this endpoint's default within the context the
        prompt leaves."""
        return self.max_tokens or max(1, min(COMPLETION_DEFAULT_MAX_TOKENS, context_left))


# -- POST /v1/chat/completions ----------------------------------------------------------------------
class TextPart(RequestBody):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks: system (or developer, taken as system), user or assistant; tool messages "
        "are not supported.")
    content: str | list[TextPart] | None = Field(
        description="The text, or a list of text parts (joined with newlines); other kinds of parts are not "
        "supported. Null only for an assistant's turn (an empty one).")

    @model_validator(mode="after")
    def content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs its content: only an assistant's may be null")
        return self

    def as_chat(self) -> dict[str, str]:
        """This message as the chat template takes it."""
        parts = self.content or ()
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in parts)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ResponseFormat(RequestBody):
    type: Literal["text"] = Field(description="Only plain text answers are supported.")


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The conversation so far, rendered through the topic's model's chat template.")
    max_completion_tokens: TokenCount | None = Field(None, description="Tokens to generate at most; "
                                                     "wins over max_tokens.")
    tools: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="Tools are not "
                                                                    "supported.")
    tool_choice: Literal["none"] | None = Field(None, description="Tools are not supported.")
    functions: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="Functions are "
                                                                        "not supported.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'} is supported.")
    logprobs: Literal[False] | None = Field(None, description="Log probabilities are not supported.")
    top_logprobs: Literal[0] | None = Field(None, description="Log probabilities are not supported.")

    def chat(self) -> list[dict[str, str]]:
        return [message.as_chat() for message in self.messages]

    def resolved_max_tokens(self, context_left: int) -> int:
        """The tokens to generate at most: as sent, else this endpoint's default within the context the
        prompt leaves."""
        return self.max_completion_tokens or self.max_tokens or max(1, min(CHAT_DEFAULT_MAX_TOKENS,
                                                                           context_left))


# -- answers ----------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "abort"]


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Answer):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(Answer):
    id: str = Field(description="'cmpl-' and the request id.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(Completion):
    """One event of a streamed completion: a token's text, the finish reason, or the usage alone."""


class AssistantMessage(Answer):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Answer):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(Answer):
    id: str = Field(description="'chatcmpl-' and the request id.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Answer):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Answer):
    """One event of a streamed chat completion: the role first, then a token's text per chunk, the
    finish reason, and the usage alone when asked."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(Answer):
    id: str = Field(description="The topic's name: what requests name as their model.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fdconsole"
    root: str = Field(description="The model the topic serves (tiny, smollm2, or a path).")
    parent: None = None
    max_model_len: int | None = Field(description="The longest request, prompt plus generated tokens; "
                                      "null when the model cannot be inspected on this host.")


class ModelList(Answer):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Answer):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error...")
    param: str | None = Field(description="The request field at fault, where one is.")
    code: str | None


class ErrorResponse(Answer):
    error: ErrorDetail


# -- the registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the OpenAI-compatible API. ``stream_model`` is the chunk type of the
    ``text/event-stream`` answer given when the request has ``stream: true``; ``{name}`` in ``path`` is
    a path parameter (a string); every endpoint answers errors as ``ErrorResponse``."""

    name: str  # the OpenAPI operationId
    method: str
    path: str
    request_model: type[RequestBody] | None
    response_model: type[Answer]
    summary: str
    stream_model: type[Answer] | None = None
    scope: str = "read"  # what the caller's API token needs (fdconsole.api.models.SCOPES)
    parameters: tuple[HttpParameter, ...] = ()  # the headers it reads


MODELS = Endpoint("listModels", "GET", "/v1/models", None, ModelList,
                  "The topics that take requests (at least one enabled node), as models.")
MODEL = Endpoint("retrieveModel", "GET", "/v1/models/{model}", None, ModelCard,
                 "One model of the list: 404 model_not_found when it is not there.")
COMPLETIONS = Endpoint("createCompletion", "POST", "/v1/completions", CompletionRequest, Completion,
                       "Complete a prompt on the topic named by model.", CompletionChunk, scope="submit",
                       parameters=(IDEMPOTENCY_KEY,))
CHAT_COMPLETIONS = Endpoint("createChatCompletion", "POST", "/v1/chat/completions", ChatCompletionRequest,
                            ChatCompletion, "Answer a chat on the topic named by model, through its "
                            "model's chat template.", ChatCompletionChunk, scope="submit",
                            parameters=(IDEMPOTENCY_KEY,))
ENDPOINTS = (MODELS, MODEL, COMPLETIONS, CHAT_COMPLETIONS)
ERROR_MODEL = ErrorResponse
