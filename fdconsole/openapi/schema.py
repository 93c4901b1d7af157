"""The OpenAPI 3.1 schema of both APIs, generated from the code that validates their requests: each
endpoint of a registry (``fdconsole.api.schemas.ENDPOINTS``, ``fdconsole.openai_api.schemas.ENDPOINTS``)
is an operation, and its models' JSON Schemas (pydantic's ``model_json_schema``, in validation mode for
bodies and serialization mode for answers) go into ``components/schemas``, where every ``$ref`` points.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from fdconsole.api import schemas as native
from fdconsole.openai_api import schemas as openai

REF = "#/components/schemas/{model}"
NATIVE_TAG, OPENAI_TAG = "native", "openai"
ERROR_DESCRIPTIONS = {
    400: "Invalid input: the body is not JSON, or a field is wrong (the error names it).",
    401: "No bearer token, or a bad one.",
    403: "The user lacks the permission, or the API token the scope, that this call needs (named).",
    404: "No such object (or model).",
    409: "A conflict: the request id or topic name is taken (a request id sent again by its user with the "
         "same submission is no conflict: that request is the answer), an Idempotency-Key was used with "
         "another submission, or the topic is busy.",
    413: "The body is larger than FD_MAX_BODY_BYTES.",
    429: "A queue is full, or a limit of the API token is reached (named): retry after Retry-After.",
    500: "The request failed on its node.",
    503: "Redis, a node or the model is unavailable.",
    504: "The request did not end within the connection's time.",
}
PATH_PARAMETERS = {**native.PATH_PARAMETERS, "model": "A model id: a topic's name."}
EVENT_IDS = {"token": {"type": "string", "pattern": "^[0-9]+$", "description": "The token's index."},
             "done": {"const": "done"}}
REPLAYED = {native.REPLAYED_HEADER: {"description": "`true` when this is the answer to a retry: the request "
                                     "an earlier submission of the same request_id or Idempotency-Key made.",
                                     "schema": {"const": "true"}}}
PATH_EXAMPLES = {"topic": "default", "request_id": "req-1", "name": "node-a", "model": "default"}
DESCRIPTION = """\
fdconsole's two HTTP APIs: the native one under `/api/v1/` (errors `{"error": {"code", "message",
"field"}}`) and the OpenAI-compatible one under `/v1/` (errors `{"error": {"message", "type", "param",
"code"}}`). Every call takes `Authorization: Bearer <token>` (`manage.py fdtoken --user U` makes one).
This schema is generated from the pydantic models that validate the requests."""


@functools.cache
def openapi_schema() -> dict[str, Any]:
    """The schema, built once per process (it changes only with the code)."""
    operations = [*(native_operation(e) for e in native.ENDPOINTS),
                  *(openai_operation(e) for e in openai.ENDPOINTS)]
    refs, defs = component_schemas([model for _, _, _, models in operations for model in models])
    paths: dict[str, dict[str, Any]] = {}
    for path, method, operation, _ in operations:
        paths.setdefault(path, {})[method.lower()] = _resolve(operation, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "fdconsole API", "version": "1", "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": [{"name": NATIVE_TAG, "description": "The native API: topics, requests and nodes."},
                 {"name": OPENAI_TAG, "description": "The OpenAI-compatible API: a topic is a model."}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API token (manage.py fdtoken)."}},
        },
    }


Use = tuple[type[BaseModel], str]  # a model, and "validation" (a body) or "serialization" (an answer)


def component_schemas(uses: list[Use]) -> tuple[dict[Use, dict[str, Any]], dict[str, Any]]:
    """The ``$ref`` of each model use, and every schema they need, keyed by model name. Two models of
    one name would overwrite each other: that is refused."""
    unique = list(dict.fromkeys(uses))
    names = [model.__name__ for model in dict.fromkeys(model for model, _ in unique)]
    duplicated = {name for name in names if names.count(name) > 1}
    if duplicated:
        raise ValueError(f"two models are named {', '.join(sorted(duplicated))}: rename one")
    refs, top = models_json_schema(unique, ref_template=REF)
    return refs, _markdown(top.get("$defs", {}))


def _markdown(schema: Any) -> Any:
    """Docstrings' reStructuredText literals (in double backticks) as CommonMark's (single ones), which
    OpenAPI's descriptions are."""
    if isinstance(schema, dict):
        return {key: value.replace("``", "`") if key == "description" and isinstance(value, str)
                else _markdown(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_markdown(value) for value in schema]
    return schema


def _resolve(operation: dict[str, Any], refs: dict[Use, dict[str, Any]]) -> dict[str, Any]:
    """``operation`` with each model use (a tuple placeholder) replaced by its ``$ref``."""
    if isinstance(operation, tuple):
        return refs[operation]
    if isinstance(operation, dict):
        return {key: _resolve(value, refs) for key, value in operation.items()}
    if isinstance(operation, list):
        return [_resolve(value, refs) for value in operation]
    return operation


Operation = tuple[str, str, dict[str, Any], list[Use]]


def native_operation(endpoint: native.Endpoint) -> Operation:
    answer: Use = (endpoint.response_model, "serialization")
    error: Use = (native.ERROR_MODEL, "serialization")
    uses = [answer, error]
    if endpoint.stream:
        events = {name: (model, "serialization") for name, model in native.STREAM_EVENTS.items()}
        uses += events.values()
        one_of = [{"type": "object", "required": ["event", "data"],
                   "properties": {"event": {"const": name}, "data": json_text(use),
                                  **({"id": EVENT_IDS[name]} if name in EVENT_IDS else {})}}
                  for name, use in events.items()]
        content = {"text/event-stream": {"schema": {"oneOf": one_of}}}
        description = ("Server-Sent Events: `token` events (data: TokenEvent; id: the token's index), then "
                       "one `done` event (data: RequestObject; id: `done`) or one `error` event (data: "
                       "ConsoleErrorDetail). Keep-alives are comments (`: keep-alive`, and `: waiting for "
                       "Redis` while the topic's Redis does not answer).")
    else:
        content = {"application/json": {"schema": answer}}
        description = endpoint.response_model.__doc__ or endpoint.response_model.__name__
    responses = {str(status): {"description": description.strip(), "content": content}
                 for status in endpoint.statuses}
    responses |= {str(status): _error_response(status, error) for status in sorted(endpoint.errors)}
    return _endpoint_operation(endpoint, NATIVE_TAG, responses, uses)


def openai_operation(endpoint: openai.Endpoint) -> Operation:
    answer: Use = (endpoint.response_model, "serialization")
    error: Use = (openai.ERROR_MODEL, "serialization")
    uses = [answer, error]
    content: dict[str, Any] = {"application/json": {"schema": answer}}
    if endpoint.stream_model is not None:
        chunk: Use = (endpoint.stream_model, "serialization")
        uses.append(chunk)
        data = {"anyOf": [{"const": "[DONE]"}, json_text({"anyOf": [chunk, error]})]}
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                   "properties": {"data": data}}}
    description = "The answer; with `stream: true`, Server-Sent Events of chunks ending with `data: [DONE]`."
    responses = {"200": {"description": description if endpoint.stream_model else "The answer.",
                         "content": content}}
    responses |= {str(status): _error_response(status, error) for status in openai_errors(endpoint)}
    return _endpoint_operation(endpoint, OPENAI_TAG, responses, uses)


def openai_errors(endpoint: openai.Endpoint) -> tuple[int, ...]:
    """What an OpenAI-compatible endpoint may answer with an error: a generation is refused like a native
    submission, or fails, expires or outlives its connection."""
    if endpoint.request_model is None:
        return (401, 403, 404) if "{" in endpoint.path else (401, 403)
    return (400, 401, 403, 404, 409, 413, 429, 500, 503, 504)


def _endpoint_operation(endpoint: native.Endpoint | openai.Endpoint, tag: str, responses: dict[str, Any],
                        uses: list[Use]) -> Operation:
    """The operation of ``endpoint`` (of either API) with its ``responses``, and its body's model added
    to ``uses``."""
    operation = _operation(endpoint.name, endpoint.summary, endpoint.path, tag, responses, endpoint.scope)
    if endpoint.parameters:
        operation["parameters"] = [*operation.get("parameters", ()),
                                   *(_http_parameter(param) for param in endpoint.parameters)]
    if native.IDEMPOTENCY_KEY in endpoint.parameters:
        for status, response in responses.items():
            if status.startswith("2"):
                response["headers"] = REPLAYED
    if endpoint.request_model is not None:
        body: Use = (endpoint.request_model, "validation")
        uses.append(body)
        operation["requestBody"] = _request_body(body)
    return endpoint.path, endpoint.method, operation, uses


def _operation(name: str, summary: str, path: str, tag: str, responses: dict[str, Any],
               scope: str) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": name, "summary": summary, "tags": [tag],
                                 "description": f"Needs an API token with the `{scope}` scope.",
                                 "responses": responses}
    parameters = [{"name": param, "in": "path", "required": True, "schema": {"type": "string"},
                   "description": PATH_PARAMETERS[param], "example": PATH_EXAMPLES[param]}
                  for param in re.findall(r"\{(\w+)\}", path)]
    if parameters:
        operation["parameters"] = parameters
    return operation


def _http_parameter(param: native.HttpParameter) -> dict[str, Any]:
    return {"name": param.name, "in": param.location, "required": False, "schema": param.json_schema(),
            "description": param.description}


def json_text(schema: Any) -> dict[str, Any]:
    """An event's data: JSON text of ``schema``. (Open API 3.1 describes each event of a
    ``text/event-stream`` as an object of its fields, ``event`` and ``data``, all strings.)"""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _request_body(body: Use) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": body}}}


def _error_response(status: int, error: Use) -> dict[str, Any]:
    return {"description": ERROR_DESCRIPTIONS[status], "content": {"application/json": {"schema": error}}}
