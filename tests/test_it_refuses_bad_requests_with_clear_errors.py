"""A bad submission is refused with a clear JSON error naming the field at fault, and leaves nothing
behind: no request row, no Redis key, nothing queued on the node."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tests.api_errors import assert_error

pytestmark = pytest.mark.django_db

URL = "/api/v1/topics/default/requests"
CONTEXT = 2048  # FD_MAX_MODEL_LEN's default: the model's context


def request_count() -> int:
    from fdconsole.inference.models import Request

    return Request.objects.count()


def assert_nothing_left(store, rows_before: int = 0, node: str = "node-a") -> None:
    assert request_count() == rows_before
    assert store.redis.keys("fd:{default}:req:*") == []
    assert store.redis.keys("fd:{default}:out:*") == []
    assert store.redis.zcard("fd:{default}:waiting") == 0
    assert store.queue_length("default", node) == 0


# -- bodies that are not a JSON object ----------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("   \n", id="blank"),
        pytest.param("prompt=hello", id="form-encoded"),
        pytest.param("{'prompt': 'a'}", id="python-dict"),
        pytest.param('{"prompt": "a",}', id="trailing-comma"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param("[]", id="empty-array"),
        pytest.param('["prompt", "a"]', id="array"),
        pytest.param('"hello"', id="string"),
        pytest.param("42", id="number"),
        pytest.param("null", id="null"),
        pytest.param("true", id="bool"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="nested-too-deeply"),
        pytest.param('{"prompt": "a", "stream": ' + "[" * 100_000 + "]" * 100_000 + "}",
                     id="field-nested-too-deeply"),
        pytest.param('{"prompt": "a\\ud800"}', id="lone-surrogate-in-prompt"),
        pytest.param('{"prompt": "a", "node": "\\udfff"}', id="lone-surrogate-in-node"),
        pytest.param('{"prompt": "a", "request_id": "x\\ud83d"}', id="lone-surrogate-in-request-id"),
        pytest.param('{"prompt": "a", "\\ud800": 1}', id="lone-surrogate-in-a-key"),
        pytest.param('{"prompt": "a", "max_tokens": 1' + "0" * 5000 + "}", id="5000-digit-number"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused(api, node, store, raw):
    error = assert_error(api.post(URL, raw=raw), 400)
    assert "field" not in error
    assert "JSON" in error["message"] or "json" in error["message"]
    assert_nothing_left(store)


def test_a_body_over_the_upload_limit_is_refused_as_too_large(api, node, store, settings):
    body = json.dumps({"prompt": "a" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10)})
    error = assert_error(api.post(URL, raw=body), 413)
    assert "large" in error["message"]
    assert_nothing_left(store)


# -- one field at fault ------------------------------------------------------------------------------
BAD_FIELDS = [
    # (body, field at fault)
    pytest.param({"prompt": "a", "max_token": 3}, "max_token", id="unknown-field"),
    pytest.param({"prompt": "a", "model": "gpt"}, "model", id="unknown-field-model"),
    pytest.param({"max_tokens": 3}, "prompt", id="missing-prompt"),
    pytest.param({}, "prompt", id="empty-object"),
    pytest.param({"prompt": "a", "prompt_token_ids": [97]}, "prompt", id="both-prompts"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": None}, "prompt", id="prompt-null"),
    pytest.param({"prompt": 5}, "prompt", id="prompt-number"),
    pytest.param({"prompt": ["a", "b"]}, "prompt", id="prompt-list"),
    pytest.param({"prompt": {"text": "a"}}, "prompt", id="prompt-object"),
    pytest.param({"prompt": "a" * 1_000_001}, "prompt", id="prompt-over-a-million-chars"),
    pytest.param({"prompt_token_ids": []}, "prompt_token_ids", id="ids-empty"),
    pytest.param({"prompt_token_ids": ["a", "b"]}, "prompt_token_ids", id="ids-strings"),
    pytest.param({"prompt_token_ids": [1, "2"]}, "prompt_token_ids", id="ids-numeric-string"),
    pytest.param({"prompt_token_ids": [True, False]}, "prompt_token_ids", id="ids-bools"),
    pytest.param({"prompt_token_ids": [1, -1]}, "prompt_token_ids", id="ids-negative"),
    pytest.param({"prompt_token_ids": [256]}, "prompt_token_ids", id="ids-over-255"),
    pytest.param({"prompt_token_ids": [1.5]}, "prompt_token_ids", id="ids-float"),
    pytest.param({"prompt_token_ids": [None]}, "prompt_token_ids", id="ids-null"),
    pytest.param({"prompt_token_ids": [[1]]}, "prompt_token_ids", id="ids-nested"),
    pytest.param({"prompt_token_ids": "abc"}, "prompt_token_ids", id="ids-string"),
    pytest.param({"prompt_token_ids": 97}, "prompt_token_ids", id="ids-number"),
    pytest.param({"prompt_token_ids": {"0": 97}}, "prompt_token_ids", id="ids-object"),
    pytest.param({"prompt_token_ids": None}, "prompt_token_ids", id="ids-null-list"),
    pytest.param({"prompt": "a", "max_tokens": 0}, "max_tokens", id="max-tokens-0"),
    pytest.param({"prompt": "a", "max_tokens": -1}, "max_tokens", id="max-tokens-negative"),
    pytest.param({"prompt": "a", "max_tokens": 10**12}, "max_tokens", id="max-tokens-huge"),
    pytest.param({"prompt": "a", "max_tokens": 2**64}, "max_tokens", id="max-tokens-2**64"),
    pytest.param({"prompt": "a", "max_tokens": "5"}, "max_tokens", id="max-tokens-string"),
    pytest.param({"prompt": "a", "max_tokens": 1.5}, "max_tokens", id="max-tokens-fraction"),
    pytest.param({"prompt": "a", "max_tokens": True}, "max_tokens", id="max-tokens-true"),
    pytest.param({"prompt": "a", "max_tokens": None}, "max_tokens", id="max-tokens-null"),
    pytest.param({"prompt": "a", "max_tokens": [5]}, "max_tokens", id="max-tokens-list"),
    pytest.param({"prompt": "a" * (CONTEXT - 24), "max_tokens": 25}, "max_tokens", id="context-overflow"),
    pytest.param({"prompt_token_ids": [97] * (CONTEXT - 24), "max_tokens": 25}, "max_tokens",
                 id="ids-context-overflow"),
    pytest.param({"prompt": "a" * CONTEXT, "max_tokens": 1}, "prompt", id="prompt-fills-the-context"),
    pytest.param({"prompt": "é" * (CONTEXT // 2 + 1)}, "prompt", id="prompt-utf8-bytes-fill-the-context"),
    pytest.param({"prompt_token_ids": [97] * (CONTEXT + 1)}, "prompt_token_ids", id="ids-fill-the-context"),
    pytest.param({"prompt": "a", "temperature": -1}, "temperature", id="temperature-negative"),
    pytest.param({"prompt": "a", "temperature": "x"}, "temperature", id="temperature-string"),
    pytest.param({"prompt": "a", "temperature": "0.5"}, "temperature", id="temperature-numeric-string"),
    pytest.param({"prompt": "a", "temperature": True}, "temperature", id="temperature-true"),
    pytest.param({"prompt": "a", "temperature": None}, "temperature", id="temperature-null"),
    pytest.param({"prompt": "a", "top_p": 0}, "top_p", id="top-p-0"),
    pytest.param({"prompt": "a", "top_p": 1.5}, "top_p", id="top-p-over-1"),
    pytest.param({"prompt": "a", "top_p": -0.1}, "top_p", id="top-p-negative"),
    pytest.param({"prompt": "a", "top_p": "1"}, "top_p", id="top-p-string"),
    pytest.param({"prompt": "a", "top_k": -1}, "top_k", id="top-k-negative"),
    pytest.param({"prompt": "a", "top_k": 2.5}, "top_k", id="top-k-fraction"),
    pytest.param({"prompt": "a", "top_k": "5"}, "top_k", id="top-k-string"),
    pytest.param({"prompt": "a", "seed": "x"}, "seed", id="seed-string"),
    pytest.param({"prompt": "a", "seed": 2**70}, "seed", id="seed-2**70"),
    pytest.param({"prompt": "a", "seed": -(2**70)}, "seed", id="seed-minus-2**70"),
    pytest.param({"prompt": "a", "seed": 1.5}, "seed", id="seed-fraction"),
    pytest.param({"prompt": "a", "seed": True}, "seed", id="seed-true"),
    pytest.param({"prompt": "a", "request_id": ""}, "request_id", id="request-id-empty"),
    pytest.param({"prompt": "a", "request_id": "r" * 129}, "request_id", id="request-id-129-chars"),
    pytest.param({"prompt": "a", "request_id": "a\nb"}, "request_id", id="request-id-newline"),
    pytest.param({"prompt": "a", "request_id": "a\tb"}, "request_id", id="request-id-tab"),
    pytest.param({"prompt": "a", "request_id": "a\x00b"}, "request_id", id="request-id-nul"),
    pytest.param({"prompt": "a", "request_id": "a\x1bb"}, "request_id", id="request-id-escape"),
    pytest.param({"prompt": "a", "request_id": "a\u200bb"}, "request_id", id="request-id-zero-width"),
    pytest.param({"prompt": "a", "request_id": 12}, "request_id", id="request-id-number"),
    pytest.param({"prompt": "a", "request_id": ["x"]}, "request_id", id="request-id-list"),
    pytest.param({"prompt": "a", "request_id": True}, "request_id", id="request-id-true"),
    pytest.param({"prompt": "a", "node": ""}, "node", id="node-empty"),
    pytest.param({"prompt": "a", "node": 3}, "node", id="node-number"),
    pytest.param({"prompt": "a", "stream": "yes"}, "stream", id="stream-string"),
]


@pytest.mark.parametrize("body, field", BAD_FIELDS)
def test_a_bad_field_is_refused_naming_it(api, node, store, body, field):
    error = assert_error(api.post(URL, body), 400, field)
    assert error["code"] == "invalid"
    assert_nothing_left(store)


@pytest.mark.parametrize(
    "raw, field",
    [
        pytest.param('{"prompt": "a", "temperature": NaN}', "temperature", id="temperature-nan"),
        pytest.param('{"prompt": "a", "temperature": Infinity}', "temperature", id="temperature-inf"),
        pytest.param('{"prompt": "a", "temperature": -Infinity}', "temperature", id="temperature-minus-inf"),
        pytest.param('{"prompt": "a", "top_p": NaN}', "top_p", id="top-p-nan"),
        pytest.param('{"prompt": "a", "max_tokens": NaN}', "max_tokens", id="max-tokens-nan"),
        pytest.param('{"prompt": "a", "max_tokens": Infinity}', "max_tokens", id="max-tokens-inf"),
        pytest.param('{"prompt": "a", "top_k": NaN}', "top_k", id="top-k-nan"),
        pytest.param('{"prompt": "a", "seed": Infinity}', "seed", id="seed-inf"),
        pytest.param('{"prompt": "a", "max_tokens": 1e400}', "max_tokens", id="max-tokens-overflowing-float"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(api, node, store, raw, field):
    error = assert_error(api.post(URL, raw=raw), 400, field)
    assert error["code"] == "invalid"
    assert_nothing_left(store)


# -- nodes and topics --------------------------------------------------------------------------------
def test_an_unknown_node_is_not_found(api, node, store):
    error = assert_error(api.post(URL, {"prompt": "a", "node": "node-zz"}), 404, "node")
    assert "node-zz" in error["message"]
    assert_nothing_left(store)


def test_a_node_of_another_topic_is_not_found(api, node, store):
    from fdconsole.topics.services import ensure_node, ensure_topic

    ensure_node("elsewhere", ensure_topic("other"))
    assert_error(api.post(URL, {"prompt": "a", "node": "elsewhere"}), 404, "node")
    assert_nothing_left(store)
    assert store.queue_length("other", "elsewhere") == 0


@pytest.mark.parametrize("state", ["draining", "disabled"])
def test_a_node_that_takes_no_new_requests_is_refused_by_name(api, node, store, state):
    from fdconsole.nodes.models import Node

    Node.objects.filter(name="node-a").update(admin_state=state)
    error = assert_error(api.post(URL, {"prompt": "a", "node": "node-a"}), 400, "node")
    assert state in error["message"]
    assert_nothing_left(store)


@pytest.mark.parametrize("topic_name", ["nope", "Default", "default2"])
def test_an_unknown_topic_is_not_found(api, node, store, topic_name):
    error = assert_error(api.post(f"/api/v1/topics/{topic_name}/requests", {"prompt": "a"}), 404, "topic")
    assert topic_name in error["message"]
    assert_nothing_left(store)
    assert store.redis.keys(f"fd:{{{topic_name}}}:*") == []


def test_a_topic_with_no_enabled_node_answers_503(api, topic, store):
    from fdconsole.nodes.models import Node
    from fdconsole.topics.services import ensure_node

    ensure_node("node-a", topic)
    Node.objects.update(admin_state="draining")
    error = assert_error(api.post(URL, {"prompt": "a"}), 503)
    assert error["code"] == "no_node_available"
    assert_nothing_left(store)


def test_a_full_queue_answers_429_and_keeps_what_it_holds(api, node, store):
    assert api.patch("/api/v1/topics/default", {"scheduler_max_size": 1}).status_code == 200
    first = api.post(URL, {"prompt": "a", "request_id": "first"})
    assert first.status_code == 202, first.content
    error = assert_error(api.post(URL, {"prompt": "b", "request_id": "second"}), 429)
    assert error["code"] == "queue_full" and "queue full" in error["message"]
    assert request_count() == 1
    assert len(store.redis.keys("fd:{default}:req:*")) == 1
    assert store.queue_length("default", "node-a") == 1
    assert api.get("/api/v1/requests/second").status_code == 404
    assert api.get("/api/v1/requests/first").json()["status"] == "queued"


# -- request ids -------------------------------------------------------------------------------------
def test_a_duplicate_request_id_is_refused_and_the_first_is_untouched(api, node, store):
    first = api.post(URL, {"prompt": "hello", "max_tokens": 3, "request_id": "mine"})
    assert first.status_code == 202, first.content
    redis_keys = sorted(store.redis.keys("fd:{default}:req:*"))
    state = store.redis.hgetall(redis_keys[0])

    error = assert_error(api.post(URL, {"prompt": "other", "max_tokens": 9, "request_id": "mine"}), 409,
                         "request_id")
    assert error["code"] == "duplicate_request_id" and "mine" in error["message"]

    assert request_count() == 1
    assert sorted(store.redis.keys("fd:{default}:req:*")) == redis_keys
    assert store.redis.hgetall(redis_keys[0]) == state
    assert store.queue_length("default", "node-a") == 1
    again = api.get("/api/v1/requests/mine").json()
    assert again == first.json()
    assert again["prompt_tokens"] == 5


def test_a_duplicate_request_id_named_on_another_node_is_refused(api, node, store):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-b", node.topic)
    assert api.post(URL, {"prompt": "a", "request_id": "mine", "node": "node-a"}).status_code == 202
    assert_error(api.post(URL, {"prompt": "a", "request_id": "mine", "node": "node-b"}), 409, "request_id")
    assert request_count() == 1
    assert store.queue_length("default", "node-a") == 1
    assert store.queue_length("default", "node-b") == 0


@pytest.mark.parametrize(
    "request_id",
    [
        "with#hash",
        "what?now=1&x",
        "a/b/c",
        "/leading-slash",
        "with spaces in it",
        " padded ",
        "ünïcödé-日本語-🙂",
        "100%",
        "%41%2F",
        "{default}:req:x",
        "r" * 128,
        "x",
        "'\"<>\\`~!@$^*()[]|;,",
    ],
)
def test_any_printable_request_id_is_accepted_and_fetched_back(api, node, store, request_id):
    answer = api.post(URL, {"prompt": "a", "max_tokens": 1, "request_id": request_id})
    assert answer.status_code == 202, answer.content
    assert answer.json()["request_id"] == request_id
    fetched = api.get(f"/api/v1/requests/{quote(request_id, safe='')}")
    assert fetched.status_code == 200, fetched.content
    assert fetched.json()["request_id"] == request_id
    assert fetched.json()["status"] == "queued"
    assert request_count() == 1
    assert store.queue_length("default", "node-a") == 1


def test_an_unknown_request_id_is_not_found(api, node):
    for answer in (api.get("/api/v1/requests/nobody%23here"), api.delete("/api/v1/requests/nobody%23here"),
                   api.get("/api/v1/requests/nobody%23here/stream")):
        error = assert_error(answer, 404)
        assert error["field"] == "request_id" and "nobody#here" in error["message"]


# -- the baseline: a good submission is accepted -----------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a"},
        {"prompt_token_ids": [0, 255, 97]},
        {"prompt": "a", "max_tokens": 1023},
        {"prompt": "a" * 1023, "max_tokens": 1},
        {"prompt": "a", "max_tokens": 4.0, "temperature": 0, "top_p": 1, "top_k": 0, "seed": -(2**63)},
        {"prompt": "a", "temperature": 2.5, "top_p": 0.01, "top_k": 50, "seed": 2**63 - 1, "stream": False},
        {"prompt": "a", "node": "node-a", "request_id": "r" * 128},
    ],
)
def test_a_good_submission_is_accepted(api, node, store, body):
    answer = api.post(URL, body)
    assert answer.status_code == 202, answer.content
    assert request_count() == 1
    assert store.queue_length("default", "node-a") == 1


def test_a_surrogate_pair_escape_is_ordinary_text(api, node, store):
    answer = api.post(URL, raw='{"prompt": "\\ud83d\\ude42", "request_id": "smile-\\ud83d\\ude42"}')
    assert answer.status_code == 202, answer.content
    assert answer.json()["request_id"] == "smile-\U0001f642"
    assert answer.json()["prompt_tokens"] == 4  # the emoji's four UTF-8 bytes
