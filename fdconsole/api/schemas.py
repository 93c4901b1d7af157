"""The native API's wire types (``/api/v1/``): one pydantic model per request body and per answer, and
``ENDPOINTS``, the registry the views are declared with (and from which the OpenAPI schema is
generated, beside the OpenAI-compatible API's ``fdconsole.openai_api.schemas``).

Bodies are validated at the edge (``fdconsole.api.http.api_view``) by these models: types, ranges and
unknown fields, errors in the API's words (``scheduler.validation``). What depends on more than the body
is checked behind it: a submission against the topic's model (``scheduler.messages.parse_submission``),
a topic's configuration as a whole (``scheduler.config.parse_config``: ``scheduler_topic`` is the
topic's name, the password's mask means "unchanged") and its model on this host.

The topic bodies are generated from the user's parameter table (``scheduler.config.PARAMETERS``): each
parameter's type, bounds, default and help text are written there once.

Nothing here imports Django: these models are plain data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from gpu_worker.model_source import MAX_NAME_LEN
from scheduler.config import PARAMETERS, SCHEDULER_NAMES, UNBOUNDED, Parameter, is_host
from scheduler.messages import SubmissionBody
from scheduler.status import RequestStatus
from scheduler.validation import NO_CONTROLS, Name, integer, matching, optional


class Body(BaseModel):
    """A request body: strictly typed (no "5" for 5), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Answer(BaseModel):
    """An answer's body: exactly the fields fdconsole sends."""

    model_config = ConfigDict(extra="forbid")


# -- topic bodies, from the parameter table ----------------------------------------------------------
HOST_PATTERN = r"^(?:[A-Za-z0-9_.-]{1,255}|\[?[0-9A-Fa-f:.]+\]?)$"  # the form; is_host decides


def _host(value: str) -> str:
    if not is_host(value):
        raise ValueError("must be a host name or an IP address")
    return value


TEXT_PARAMETERS: dict[str, Any] = {
    "scheduler_name": Literal[SCHEDULER_NAMES],
    "scheduler_topic": Name,
    "scheduler_host": Annotated[str, matching(HOST_PATTERN, "must be a host name or an IP address"),
                                AfterValidator(_host)],
    "scheduler_password": Annotated[str, Field(max_length=512, pattern=NO_CONTROLS)],
}


def _bounded_queue(value: int) -> int:
    if value == 0:
        raise ValueError(f"must be {UNBOUNDED} (unbounded) or at least 1")
    return value


def parameter_type(param: Parameter) -> Any:
    """The type of a parameter in a request body: its kind within its bounds."""
    if param.kind is str:
        return TEXT_PARAMETERS[param.name]
    bounds = {"gt" if param.exclusive_minimum else "ge": param.minimum, "le": param.maximum}
    if param.kind is float:
        return Annotated[float, Field(allow_inf_nan=False, **bounds)]
    if param.name == "scheduler_max_size":
        not_zero = integer(json_schema_extra={"not": {"const": 0}}, **bounds)
        return Annotated[not_zero, AfterValidator(_bounded_queue)]
    return integer(**bounds)


def parameter_description(param: Parameter) -> str:
    unit = f" Unit: {param.unit}." if param.unit else ""
    plural = "s" if len(param.scopes) > 1 else ""
    own = " It is the topic's name: any other value is refused." if param.name == "scheduler_topic" else ""
    return f"{param.help}{unit} Applies to the {', '.join(param.scopes)} scheduler{plural}.{own}"


MODEL_DESCRIPTION = ("The model every node of the topic serves: 'tiny', 'smollm2', or an absolute path on "
                     "the nodes' host (a Hugging Face checkpoint directory or a .gguf file), checked there; "
                     "by default FD_MODEL. Changing it while nodes are live or requests unfinished is 409.")
PARAMETER_FIELDS: dict[str, Any] = {
    param.name: (parameter_type(param), optional(parameter_description(param), default=param.default))
    for param in PARAMETERS
}

TopicCreate = create_model(
    "TopicCreate", __base__=Body,
    __doc__="The body of POST /api/v1/topics: a name and any of the scheduler parameters (the others keep "
            "their defaults; scheduler_topic is the topic's name).",
    name=(Name, Field(description="The topic's name, unique: 1-64 letters, digits, '-', '_' or '.'.")),
    model=(str, optional(MODEL_DESCRIPTION, max_length=MAX_NAME_LEN)),
    **PARAMETER_FIELDS,
)
TopicPatch = create_model(
    "TopicPatch", __base__=Body,
    __doc__="The body of PATCH /api/v1/topics/{topic}: the parameters to change, validated as a whole and "
            "published to running nodes. A topic read with GET may be sent back edited: its read-only "
            "fields are ignored (name must be the topic's own).",
    name=(Name, optional("The topic's own name (a topic cannot be renamed).")),
    model=(str, optional(MODEL_DESCRIPTION, max_length=MAX_NAME_LEN)),
    nodes=(list[str], optional("Read-only: ignored.")),
    created_at=(str, optional("Read-only: ignored.")),
    updated_at=(str, optional("Read-only: ignored.")),
    **PARAMETER_FIELDS,
)
READ_ONLY_TOPIC_FIELDS = ("name", "nodes", "created_at", "updated_at")


def given(body: BaseModel, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields the client sent, as validated (``4.0`` became ``4``), less ``leave_out``."""
    return {name: getattr(body, name) for name in body.model_fields_set if name not in leave_out}


# -- answers -------------------------------------------------------------------------------------------
class RequestError(Answer):
    code: str
    message: str


class Handoff(Answer):
    bytes: int = Field(description="Bytes of the KV cache handed from the prefill node to the decode node.")
    ms: float | None = Field(description="How long writing it took.")


class RequestObject(Answer):
    """A request: where it is, who ran it, and what it generated so far."""

    request_id: str
    topic: str
    model: str = Field(description="The topic's model when it was submitted: its token ids are that "
                       "model's.")
    status: Literal[tuple(status.value for status in RequestStatus)]
    home_node: str | None = Field(description="The node it was queued on.")
    executed_by: str | None
    stolen: bool = Field(description="True when a node other than home_node ran it.")
    prefill_node: str | None
    decode_node: str | None
    prompt_tokens: int
    output_token_ids: list[int]
    output_text: str
    finish_reason: Literal["length", "stop"] | None
    error: RequestError | None
    created_at: datetime
    started_at: datetime | None
    first_token_at: datetime | None
    finished_at: datetime | None
    handoff: Handoff | None = Field(description="The splitwise KV handoff, when there was one.")


def _answer_type(param: Parameter) -> Any:
    return {str: str, int: int, float: float}[param.kind]


TopicObject = create_model(
    "TopicObject", __base__=Answer,
    __doc__="A topic: its model, its scheduler configuration (the password masked) and its nodes.",
    name=(str, ...),
    model=(str, Field(description=MODEL_DESCRIPTION)),
    **{param.name: (_answer_type(param), Field(description=param.help)) for param in PARAMETERS},
    nodes=(list[str], Field(description="Its nodes' names.")),
    created_at=(datetime, ...),
    updated_at=(datetime, ...),
)


class TopicList(Answer):
    """Every topic, by name."""

    topics: list[TopicObject]


class NodeCapacity(Answer):
    """The node record's engine settings (a running node keeps those it started with until it restarts)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_kv_blocks: int
    kv_cache_memory_mb: int
    block_size: int
    reserved_output_blocks: int
    enable_prefix_caching: bool


class NodeObject(Answer):
    """A node: its record joined with its live state (heartbeat, queue). The engine's figures are null
    when its heartbeat lacks them."""

    name: str
    topic: str
    role: Literal["mixed", "prefill", "decode"]
    device: str
    admin_state: Literal["enabled", "draining", "disabled"]
    state: Literal["idle", "busy", "stale", "draining", "dead"]
    splitwise_load: int | None
    transfer: str | None
    load_score: int = Field(description="Requests waiting in its queue.")
    queue_length: int
    running: str | None
    host: str | None
    last_heartbeat: datetime | None
    heartbeat_age_s: float | None
    requests_run: int
    requests_stolen: int
    restarts: int = Field(description="Times fdcluster started the node's process again after it died.")
    last_exit_status: str | None = Field(
        description="How its process last ended, as fdcluster saw it: 'exit code 1', 'killed by SIGKILL'; "
                    "null when it never died under fdcluster.")
    last_exit_at: datetime | None
    max_num_seqs: int
    max_num_batched_tokens: int
    capacity: NodeCapacity
    batch_size: int | None
    waiting: int | None
    kv_blocks_used: int | None
    kv_blocks_total: int | None
    prefix_cache_hit_rate: float | None
    preemptions: int | None
    tokens_per_s: float | None


class NodeList(Answer):
    """Every node, with its live state."""

    nodes: list[NodeObject]


class TokenEvent(Answer):
    """The data of one ``token`` event of a request's stream."""

    index: int = Field(description="The token's position in the output, from 0.")
    token_id: int
    text: str = Field(description="The text this token adds (possibly empty: a character's first bytes).")


class ConsoleErrorDetail(Answer):
    code: str = Field(description="invalid, unauthorized, not_found, duplicate_request_id, queue_full, "
                      "no_node_available, redis_unavailable...")
    message: str
    field: str = optional("The request field at fault, where one is.")


class ConsoleError(Answer):
    """The native API's error body."""

    error: ConsoleErrorDetail


# -- header and query parameters -------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpParameter:
    """A header or query parameter an endpoint reads beside its path and body: optional, a string of
    ``pattern`` (matched whole, by the view that reads it, and published in the OpenAPI schema)."""

    name: str
    location: Literal["header", "query"]
    description: str
    pattern: str

    def matches(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is not None

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": f"^(?:{self.pattern})$"}


REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_KEY = HttpParameter(
    "Idempotency-Key", "header",
    "Makes a retried submission one request (as Stripe's): the same key from the same user with the same "
    "submission (topic, prompt tokens, sampling, node) answers with the request the first made, adding, "
    f"queueing and counting nothing (the answer then has `{REPLAYED_HEADER}: true`); with another "
    "submission it is 409 idempotency_key_reused. 1-255 printable ASCII characters, kept per user for as "
    "long as the request is. A request_id sent again works the same way.",
    r"[ -~]{1,255}")
LAST_EVENT_ID_DESCRIPTION = (
    "Resume the stream: the id of the last event the client has (a token's index, or `done`); only the "
    "tokens after it are sent (after `done`, only `done`). What a browser's EventSource sends when it "
    "reconnects.")
EVENT_ID_PATTERN = r"done|[0-9]{1,18}"
LAST_EVENT_ID = HttpParameter("Last-Event-ID", "header", LAST_EVENT_ID_DESCRIPTION, EVENT_ID_PATTERN)
LAST_EVENT_ID_QUERY = HttpParameter("last_event_id", "query", LAST_EVENT_ID_DESCRIPTION + " For clients "
                                    "that cannot set headers; the header wins when both are sent.",
                                    EVENT_ID_PATTERN)


# -- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the native API: its method and path (``{name}`` a path parameter, a string), its
    body's model, and its answer's model with the statuses it comes with. ``stream``: the answer is a
    ``text/event-stream`` instead (``token`` events of ``TokenEvent``, then ``done`` with the
    ``response_model``). ``errors``: the statuses it answers with a ``ConsoleError``. ``parameters``: the
    headers and query parameters it reads."""

    name: str  # the OpenAPI operationId
    method: str
    path: str
    request_model: type[BaseModel] | None
    response_model: type[BaseModel]
    statuses: tuple[int, ...]
    summary: str
    errors: tuple[int, ...]
    stream: bool = False
    scope: str = "read"  # what the caller's API token needs (fdconsole.api.models.SCOPES)
    parameters: tuple[HttpParameter, ...] = ()


BODY_ERRORS = (400, 401, 413)
LIST_TOPICS = Endpoint("listTopics", "GET", "/api/v1/topics", None, TopicList, (200,),
                       "Every topic with its model and scheduler configuration.", (401, 403,))
CREATE_TOPIC = Endpoint("createTopic", "POST", "/api/v1/topics", TopicCreate, TopicObject, (201,),
                        "Create a topic and publish its configuration to its Redis.",
                        (*BODY_ERRORS, 403, 409, 503), scope="admin")
GET_TOPIC = Endpoint("getTopic", "GET", "/api/v1/topics/{topic}", None, TopicObject, (200,),
                     "One topic.", (401, 403, 404))
UPDATE_TOPIC = Endpoint("updateTopic", "PATCH", "/api/v1/topics/{topic}", TopicPatch, TopicObject, (200,),
                        "Change a topic's model or scheduler parameters; running nodes take the change up "
                        "without a restart.", (*BODY_ERRORS, 403, 404, 409, 503), scope="admin")
SUBMIT = Endpoint("submitRequest", "POST", "/api/v1/topics/{topic}/requests", SubmissionBody, RequestObject,
                  (202,), "Queue a request on a node of the topic (a retry of one already made: that one).",
                  (*BODY_ERRORS, 403, 404, 409, 429, 503), scope="submit", parameters=(IDEMPOTENCY_KEY,))
GET_REQUEST = Endpoint("getRequest", "GET", "/api/v1/requests/{request_id}", None, RequestObject, (200,),
                       "A request as it is now.", (401, 403, 404, 503))
CANCEL_REQUEST = Endpoint("cancelRequest", "DELETE", "/api/v1/requests/{request_id}", None, RequestObject,
                          (200, 202), "Cancel a request: 202 while it is being cancelled, 200 once final "
                          "(its final status is then cancelled, unless it had already ended).",
                          (401, 403, 404, 503), scope="submit")
STREAM_REQUEST = Endpoint("streamRequest", "GET", "/api/v1/requests/{request_id}/stream", None, RequestObject,
                          (200,), "Server-Sent Events: one token event per generated token (its id: the "
                          "token's index), then one done event with the final request object (its id: "
                          "done), or one error event. Works before, during and after the generation; "
                          "resumes after Last-Event-ID.", (400, 401, 403, 404, 429), stream=True,
                          parameters=(LAST_EVENT_ID, LAST_EVENT_ID_QUERY))
LIST_NODES = Endpoint("listNodes", "GET", "/api/v1/nodes", None, NodeList, (200,),
                      "Every node with its live state.", (401, 403, 503))
GET_NODE = Endpoint("getNode", "GET", "/api/v1/nodes/{name}", None, NodeObject, (200,),
                    "One node with its live state.", (401, 403, 404, 503))
ENDPOINTS = (LIST_TOPICS, CREATE_TOPIC, GET_TOPIC, UPDATE_TOPIC, SUBMIT, GET_REQUEST, CANCEL_REQUEST,
             STREAM_REQUEST, LIST_NODES, GET_NODE)
ERROR_MODEL = ConsoleError
PATH_PARAMETERS = {
    "topic": "The topic's name.",
    "request_id": "The request's id, percent-encoded ('/' as %2F, '#' as %23).",
    "name": "The node's name.",
}
STREAM_EVENTS = {"token": TokenEvent, "done": RequestObject, "error": ConsoleErrorDetail}
