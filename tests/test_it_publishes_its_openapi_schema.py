"""``GET /api/openapi.json`` is a valid OpenAPI 3.1 schema of every URL of ``/api/v1/`` and ``/v1/``,
public like most servers' schemas; ``/api/docs`` renders it as a page that fetches nothing from elsewhere;
and what the schema says is what the API does: its body models refuse what the views refuse, and the
views' answers are what its answer models say."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver

pytestmark = pytest.mark.django_db

METHODS = ("get", "post", "patch", "put", "delete")
DIALECT = "https://json-schema.org/draft/2020-12/schema"


@pytest.fixture(scope="module")
def anonymous() -> Client:
    return Client()


def schema(client: Client) -> dict:
    answer = client.get("/api/openapi.json")
    assert answer.status_code == 200, answer.content
    assert answer["Content-Type"].startswith("application/json")
    return answer.json()


def test_the_schema_is_public_and_valid_openapi_3_1(anonymous):
    """Valid against the OpenAPI 3.1 meta-schema that schemathesis ships (the documents' structure), and
    each component a valid JSON Schema 2020-12 (OpenAPI 3.1's dialect)."""
    import jsonschema_rs
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    published = schema(anonymous)
    assert published["openapi"] == "3.1.0"
    OPENAPI_31_VALIDATOR.validate(published)
    for name, component in published["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid({"$schema": DIALECT, **component}), name
    assert published["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API token (manage.py fdtoken)."}
    assert published["security"] == [{"bearer": []}]


def routes(patterns, prefix: str) -> set[str]:
    """``/api/v1/topics/{topic}``-style paths of Django URL patterns (the catch-all of /v1/ aside)."""
    paths = set()
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            paths |= routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern) and pattern.name != "openai-unknown-url":
            paths.add(prefix + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern.pattern)))
    return paths


def test_every_url_of_both_apis_is_in_the_schema(anonymous):
    from fdconsole.api.urls import urlpatterns as native
    from fdconsole.openai_api.urls import urlpatterns as openai

    expected = routes(native, "/api/v1/") | routes(openai, "/v1/")
    assert set(schema(anonymous)["paths"]) == expected
    assert len(expected) == 11  # 7 native, 4 OpenAI-compatible


def test_each_operation_is_served_and_every_other_method_is_refused(anonymous, api, node):
    """Without a token a documented operation answers 401 (so its path and method exist); with one, a
    method the schema does not list answers 405."""
    for path, operations in schema(anonymous)["paths"].items():
        url = path.format(topic="default", request_id="nobody", name="node-a", model="default")
        for method in METHODS:
            if method in operations:
                answer = getattr(anonymous, method)(url)
                assert answer.status_code == 401, (method, path, answer.content)
                assert {"401"} <= set(operations[method]["responses"])
                continue
            if method in ("get", "delete"):
                answer = getattr(api.client, method)(url)
            else:
                answer = getattr(api.client, method)(url, data="{}", content_type="application/json")
            assert answer.status_code == 405, (method, path, answer.content)


def test_each_operation_documents_its_answers_and_errors(anonymous):
    published = schema(anonymous)
    components = published["components"]["schemas"]
    for path, operations in published["paths"].items():
        error = "ConsoleError" if path.startswith("/api/") else "ErrorResponse"
        for method, operation in operations.items():
            responses = operation["responses"]
            statuses = {int(status) for status in responses}
            assert any(200 <= status < 300 for status in statuses), (method, path)
            for status in statuses - set(range(200, 300)):
                ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
                assert ref == f"#/components/schemas/{error}", (method, path, status)
            if "requestBody" in operation:
                assert {400, 413} <= statuses, (method, path)
            if "{" in path:
                assert 404 in statuses, (method, path)
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', str(published).replace("'", '"')):
        assert ref in components, ref
    assert published["paths"]["/api/v1/requests/{request_id}/stream"]["get"]["responses"]["200"]["content"] \
        .keys() == {"text/event-stream"}
    assert published["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"].keys() == {
        "application/json", "text/event-stream"}


def test_the_topic_bodies_carry_every_scheduler_parameter_with_its_default_and_help(anonymous):
    from scheduler.config import PARAMETERS

    components = schema(anonymous)["components"]["schemas"]
    for body in ("TopicCreate", "TopicPatch"):
        properties = components[body]["properties"]
        assert components[body]["additionalProperties"] is False
        for param in PARAMETERS:
            prop = properties[param.name]
            assert prop["default"] == param.default and param.help in prop["description"], param.name
            if param.kind is int:
                assert prop["type"] == "integer" and prop["maximum"] == param.maximum, param.name
            if param.kind is float:
                assert prop["type"] == "number", param.name
    assert components["TopicCreate"]["required"] == ["name"]
    assert "exclusiveMinimum" in components["TopicCreate"]["properties"]["scheduler_sync_period"]


def test_the_submission_body_says_its_fields_and_rules(anonymous):
    body = schema(anonymous)["components"]["schemas"]["SubmissionBody"]
    assert set(body["properties"]) == {"prompt", "prompt_token_ids", "messages", "max_tokens", "temperature",
                                       "top_p", "top_k", "seed", "stop", "request_id", "node", "stream"}
    assert body["additionalProperties"] is False
    assert body["oneOf"] == [{"required": ["prompt"]}, {"required": ["prompt_token_ids"]},
                             {"required": ["messages"]}]
    assert body["properties"]["top_p"]["exclusiveMinimum"] == 0
    assert body["properties"]["max_tokens"] == {**body["properties"]["max_tokens"], "type": "integer",
                                                "minimum": 1, "default": 16}
    assert "default" not in body["properties"]["prompt"]  # it may be left out, never sent as null


def test_the_docs_page_lists_every_operation_and_fetches_nothing_from_elsewhere(anonymous):
    answer = anonymous.get("/api/docs")
    assert answer.status_code == 200 and answer["Content-Type"].startswith("text/html")
    page = answer.content.decode()
    published = schema(anonymous)
    for path, operations in published["paths"].items():
        assert path in page
        for operation in operations.values():
            assert f'id="{operation["operationId"]}"' in page
    for name in published["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    assert "scheduler_release_load_expire_period" in page and "Load held by a silent request" in page
    sources = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page, flags=re.IGNORECASE)
    assert not [tag for tag in sources if re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", tag)], sources
    assert "<script" not in page.lower()


# -- the schema tells the truth ----------------------------------------------------------------------
def test_the_answers_are_what_the_answer_models_say(api, node, store):
    from fdconsole.api.schemas import NodeList, NodeObject, RequestObject, TopicList, TopicObject
    from scheduler import keys

    submitted = api.post("/api/v1/topics/default/requests", {"prompt": "a", "max_tokens": 2,
                                                              "request_id": "schema-1"})
    assert submitted.status_code == 202, submitted.content
    RequestObject.model_validate(submitted.json())
    RequestObject.model_validate(api.get("/api/v1/requests/schema-1").json())
    RequestObject.model_validate(api.delete("/api/v1/requests/schema-1").json())
    TopicObject.model_validate(api.get("/api/v1/topics/default").json())
    TopicList.model_validate(api.get("/api/v1/topics").json())
    NodeObject.model_validate(api.get("/api/v1/nodes/node-a").json())  # no heartbeat yet
    store.redis.hset(keys.heartbeat("default", "node-a"), mapping={
        "ts": "1700000000.5", "state": "busy", "device": "cpu", "batch": "2", "tokens_per_s": "12.5",
        "prefix_hit_rate": "0.25", "load": "3", "running": "1"})
    NodeList.model_validate(api.get("/api/v1/nodes").json())


TOPIC_VALUES = [
    *[(name, value) for name in ("scheduler_ttl", "scheduler_port", "scheduler_db", "scheduler_max_size",
                                 "scheduler_load_shards_num", "scheduler_reader_parallel")
      for value in (-2, -1, 0, 1, 2, 6.0, 7.5, 65535, 65536, 10**7, 10**7 + 1, 2**64, "5", True, None, [1])],
    *[(name, value)
      for name in ("scheduler_min_load_score", "scheduler_sync_period", "scheduler_expire_period")
      for value in (-1, 0, 0.001, 0.5, 1, 1.5, 1e9, 1e9 + 1, 31536000, 31536001, float("nan"), float("inf"),
                    "1", False, None)],
    *[("scheduler_name", value) for value in ("local", "global", "splitwise", "Local", "", 1, None)],
    *[("scheduler_host", value)
      for value in ("h", "redis.internal", "10.0.0.1", "::1", "[::1]", "10.0.0.1:1", "fe80::1%eth0", "a[b",
                    "[h]", "[::1", "", "a b", "h\n", "h" * 255, "h" * 256, 5)],
    *[("scheduler_password", value) for value in ("", "s3cret", "p" * 512, "p" * 513, 1, None)],
    *[("scheduler_topic", value) for value in ("a", "A-b_c.9", "x" * 64, "x" * 65, "a b", "a\n", "", 5)],
    ("scheduler_colour", 1), ("nodes_count", 1),
]


@pytest.mark.parametrize("field, value", TOPIC_VALUES, ids=[f"{f}={v!r}"[:60] for f, v in TOPIC_VALUES])
def test_the_topic_models_refuse_exactly_what_the_configuration_refuses(field, value):
    """The API checks a topic body with its model at the edge, then ``parse_config`` (which the config page
    and the admin use too) checks the configuration as a whole: both read the same parameter table and
    must agree on every single value."""
    from pydantic import ValidationError

    from fdconsole.api.schemas import TopicCreate, TopicPatch
    from scheduler.config import parse_config
    from scheduler.errors import ConfigError

    try:
        parse_config({field: value})
        configured = True
    except ConfigError as exc:
        configured = False
        assert exc.field == field
    for model, body in ((TopicCreate, {"name": "x", field: value}), (TopicPatch, {field: value})):
        try:
            model.model_validate(body)
            modelled = True
        except ValidationError:
            modelled = False
        assert modelled == configured, (model.__name__, field, value)


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": "a", "max_token": 3}, "max_token", "unknown field 'max_token'"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "max_tokens must be an integer"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
    ({"prompt": "a", "top_p": 0}, "top_p", "top_p must be greater than 0 and at most 1"),
    ({"prompt": "a", "temperature": -1}, "temperature", "temperature must be at least 0 and at most 100"),
    ({"prompt": "a", "stop": ["x"] * 5}, "stop", "stop: stop must be at most 4 items"),
    ({"prompt": "a", "stop": ["x", ""]}, "stop", "stop: stop[1] must not be empty"),
    ({"prompt": "a", "stop": 5}, "stop", "stop must be a string"),
    ({"prompt": "a", "node": "a b"}, "node", "node must be 1-64 letters, digits, '-', '_' or '.'"),
    ({"prompt": "a", "request_id": "a\tb"}, "request_id",
     "request_id must contain only printable characters"),
    ({"prompt": "a", "request_id": "x/stream"}, "request_id", "request_id must not end with '/stream'"),
    ({"prompt_token_ids": [1, "2"]}, "prompt_token_ids", "prompt_token_ids: prompt_token_ids[1] must be an "
                                                         "integer"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "messages: messages[0].role must be one "
                                                                    "of 'system', 'user' or 'assistant'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "messages",
     "give exactly one of prompt, prompt_token_ids and messages"),
])
def test_a_refused_submission_names_its_field_in_the_apis_words(api, node, body, field, words):
    answer = api.post("/api/v1/topics/default/requests", body)
    assert answer.status_code == 400, answer.content
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("invalid", field)
    assert error["message"].startswith(words), error


# -- what the fuzzers found ----------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["a[b", "[h]", "[::1", "10.0.0.1:1", "fe80::1%eth0"])
def test_a_host_that_makes_no_redis_url_is_refused_not_a_server_error(api, topic, store, host):
    """schemathesis created a topic with ``scheduler_host`` "Sim6N-a[0T8Suv": its Redis URL did not parse
    and the console answered 500."""
    answer = api.post("/api/v1/topics", {"name": "fresh", "scheduler_host": host})
    assert answer.status_code == 400, answer.content
    assert answer.json()["error"]["field"] == "scheduler_host"


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_makes_a_redis_url_with_or_without_brackets(host):
    from scheduler.config import parse_config
    from scheduler.connection import topic_redis_url

    assert topic_redis_url(parse_config({"scheduler_host": host}), "redis://127.0.0.1:6379/0") == \
        "redis://[::1]:6379/0"


def test_a_method_not_allowed_says_which_are(api, node):
    """RFC 9110 asks a 405 for an ``Allow`` header; schemathesis sent TRACE to every operation."""
    for path, allowed in [("/api/v1/topics", "GET, POST"), ("/api/v1/requests/x", "GET, DELETE"),
                          ("/api/v1/requests/x/stream", "GET"), ("/v1/completions", "POST"),
                          ("/v1/models", "GET")]:
        answer = api.client.generic("TRACE", path)
        assert answer.status_code == 405 and answer["Allow"] == allowed, (path, answer.content)


def test_the_openai_api_takes_the_integers_its_schema_says():
    """JSON Schema's integer is any number without a fraction: schemathesis sent ``top_k: 78.0`` and
    ``max_completion_tokens: 4.0``, which the schema allows; token ids below 0 it does not."""
    from fdconsole.openai_api.http import validated
    from fdconsole.openai_api.schemas import ChatCompletionRequest, CompletionRequest
    from scheduler.errors import InvalidRequest

    body = validated(CompletionRequest, {"model": "default", "prompt": [97.0, 98], "max_tokens": 4.0,
                                         "top_k": 78.0, "seed": -3.0})
    assert (body.prompt, body.max_tokens, body.top_k, body.seed) == ([97, 98], 4, 78, -3)
    chat = validated(ChatCompletionRequest, {"model": "default", "max_completion_tokens": 4.0,
                                             "messages": [{"role": "user", "content": "x"}]})
    assert chat.max_completion_tokens == 4
    with pytest.raises(InvalidRequest) as refused:
        validated(CompletionRequest, {"model": "default", "prompt": [-5]})
    assert refused.value.field == "prompt[0]"
    with pytest.raises(InvalidRequest):
        validated(CompletionRequest, {"model": "default", "prompt": "x", "max_tokens": 4.5})
