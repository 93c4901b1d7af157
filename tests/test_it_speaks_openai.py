"""The OpenAI-compatible API, driven by the official ``openai`` SDK against the real console on a real
port, with real node processes: topics are models; completions and chats answer whole or streamed
(chunks, then ``data: [DONE]``, usage only when asked), as the native API would run them; errors come
in OpenAI's shape with the statuses the SDK turns into its exceptions."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.postgresql

PROMPT = "Once upon a time"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def e2e(test):
    """A test against the real console and node processes (which share the database)."""
    return pytest.mark.e2e(pytest.mark.django_db(transaction=True)(test))


@pytest.fixture
def client(console, api_token) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{console.url}/v1", api_key=api_token, max_retries=0, timeout=60) as sdk:
        yield sdk


@pytest.fixture
def http(console, api_token) -> httpx.Client:
    with httpx.Client(base_url=console.url, headers={"Authorization": f"Bearer {api_token}"},
                      timeout=60) as raw:
        yield raw


def sse_blocks(text: str) -> list[str]:
    """The events of a raw stream, checking the framing: one ``data: `` line each, blank-line separated."""
    assert text.endswith("\n\n"), text[-200:]
    blocks = text[:-2].split("\n\n")
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, block
    return [block.removeprefix("data: ") for block in blocks]


def wait_final(http: httpx.Client, request_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (row := http.get(f"/api/v1/requests/{request_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, row
        time.sleep(0.05)
    return row


# -- with a node of the byte-level model -------------------------------------------------------------
@e2e
def test_completions_whole_and_streamed_tell_the_same_text(client, http, node_processes):
    node_processes.start("oa-1", "default")
    [card] = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("default", "model", "fdconsole")
    assert card.model_extra["root"] == "tiny" and card.model_extra["max_model_len"] > 0
    assert client.models.retrieve("default").id == "default"

    whole = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"request_id": "oa-whole"})
    assert whole.id == "cmpl-oa-whole" and whole.object == "text_completion" and whole.model == "default"
    [choice] = whole.choices
    assert choice.finish_reason in ("length", "stop")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(PROMPT.encode()), 12)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    native = http.get("/api/v1/requests/oa-whole").json()  # the same request the console shows
    assert native["status"] == "finished" and native["output_text"] == choice.text

    chunks = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert len(texts) == 12 and "".join(texts) == choice.text  # a chunk per token, greedy: the same
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.usage is None for c in chunks)

    chunks = list(client.completions.create(model="default", prompt=[list(PROMPT.encode())], max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text  # token ids: the same prompt

    default = client.completions.create(model="default", prompt=PROMPT)  # OpenAI's defaults: 16, sampled
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


@e2e
def test_stop_seed_and_request_ids(client, http, node_processes):
    node_processes.start("oa-1", "default")
    greedy = {"model": "default", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    text = client.completions.create(**greedy).choices[0].text
    assert len(text) >= 12, text
    stop = text[8:11]
    cut = client.completions.create(**greedy, stop=[stop, "@@@"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    sampled = [client.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0.8,
                                         seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1], sampled

    # A request id sent again with the same body reattaches to that request, running or finished.
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 200, "extra_body": {"request_id": "oa-again"}}
    # (sampled at OpenAI's default temperature: the same request still gives the same answer)
    with client.completions.create(**body, stream=True) as stream:
        next(iter(stream))
    # The client went away: the request runs on (a client may come back by its id) ...
    row = wait_final(http, "oa-again")
    assert row["status"] == "finished"
    again = client.completions.create(**body)
    assert again.id == "cmpl-oa-again" and again.choices[0].text == row["output_text"]
    assert again.usage.completion_tokens == len(row["output_token_ids"])
    # ... and another body under the same id is a conflict.
    with pytest.raises(openai.ConflictError) as conflict:
        client.completions.create(**{**body, "max_tokens": 5})
    assert conflict.value.body["param"] == "request_id"


@e2e
def test_a_cancelled_request_ends_its_stream_with_abort(client, http, node_processes):
    node_processes.start("oa-slow", "default", FD_TOKEN_DELAY_MS="50")
    stream = client.completions.create(model="default", prompt=PROMPT, max_tokens=300, temperature=0,
                                       stream=True, extra_body={"request_id": "oa-cancel"})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            assert http.delete("/api/v1/requests/oa-cancel").status_code in (200, 202)
    assert chunks[-1].choices[0].finish_reason == "abort"
    assert len(chunks) < 300
    assert wait_final(http, "oa-cancel")["status"] == "cancelled"


@e2e
def test_the_raw_stream_is_data_events_ending_with_done(client, http, node_processes):
    node_processes.start("oa-1", "default")
    body = {"model": "default", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = sse_blocks(answer.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 6 and all(c["object"] == "text_completion" for c in chunks)  # 5 tokens, the end
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)  # no usage unless asked
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]

    answer = http.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    chunks = [json.loads(event) for event in sse_blocks(answer.text)[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI's: null on every other chunk

    chat = {"model": "default", "messages": QUESTION, "stream": True}
    refused = http.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["param"] == "messages"  # tiny has no chat template: before any event


@e2e
def test_fdbench_serve_measures_through_the_openai_api(console, api_token, node_processes):
    from tests.test_it_benchmarks_a_running_console import LEVEL_KEYS, fdbench_serve

    node_processes.start("oa-1", "default")
    figures = fdbench_serve(console, "--api", "openai", "--token", api_token, "--requests", "3",
                            "--concurrency", "1,3", "--max-tokens", "4")
    assert figures["api"] == "openai"
    for level in figures["results"]:
        assert set(level) == LEVEL_KEYS
        assert level["completed"] == 3 and level["errors"] == 0 and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"] and level["itl_p50_ms"] >= 0


# -- errors, with no node running ---------------------------------------------------------------------
@e2e
def test_errors_come_in_openais_shape(client, console, http):
    from fdconsole.topics.services import change_topic, create_topic, ensure_node, ensure_topic

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-topic", prompt="x")
    assert unknown.value.code == "model_not_found" and unknown.value.body["param"] == "model"
    create_topic("idle", {})  # a topic without an enabled node is no model, and takes nothing
    assert client.models.list().data == []
    with pytest.raises(openai.InternalServerError) as no_node:
        client.completions.create(model="idle", prompt="x")
    assert no_node.value.status_code == 503 and "retry-after" in no_node.value.response.headers

    for extra, param in [({"n": 2}, "n"), ({"temperature": -1}, "temperature"), ({"logprobs": 2}, "logprobs"),
                         ({"prompt": ["a", "b"]}, "prompt"), ({"stop": ["a"] * 5}, "stop")]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(**{"model": "default", "prompt": "x", **extra})
        assert bad.value.body["param"] == param and bad.value.body["type"] == "invalid_request_error"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    for extra, param in [({"messages": image}, "messages[0].content[0].type"), ({"tools": [{}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format.type")]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**{"model": "default", "messages": QUESTION, **extra})
        assert bad.value.body["param"] == param, bad.value.body

    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{console.url}/v1", api_key="fd_wrong", max_retries=0).models.list()
    assert refused.value.code == "invalid_api_key"

    topic = change_topic(ensure_topic("default"), {"scheduler_ttl": 1})
    ensure_node("oa-absent", topic)  # enabled, never started: its requests expire, or fill its queue
    for stream in (False, True):  # no token came: a plain error, streamed or not
        with pytest.raises(openai.InternalServerError) as expired:
            client.completions.create(model="default", prompt="x", stream=stream)
        assert expired.value.code == "expired" and expired.value.status_code == 503, expired.value.body

    change_topic(topic, {"scheduler_ttl": 60, "scheduler_max_size": 1})
    assert http.post("/api/v1/topics/default/requests", json={"prompt": "x"}).status_code == 202
    with pytest.raises(openai.RateLimitError) as full:
        client.completions.create(model="default", prompt="y")
    assert full.value.code == "queue_full" and int(full.value.response.headers["retry-after"]) >= 1


# -- a model with a chat template ---------------------------------------------------------------------
@e2e
def test_smollm2_answers_a_chat_whole_and_streamed(client, node_processes):
    from fdconsole.topics.services import create_topic

    create_topic("smol", {"model": "smollm2"})
    node_processes.start("smol-1", "smol")
    whole = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == "The capital of France is Paris."

    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    chunks = list(client.chat.completions.create(model="smol", messages=parts, max_completion_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


# -- in process: validation and routing --------------------------------------------------------------
@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", {"prompt": "x", "n": 2}, "n"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"prompt": [1, True]}, "prompt[1]"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": "x", "logprobs": 1}, "logprobs"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("completions", {"model": 7, "prompt": "x"}, "model"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0].type"),
    ("chat", {"messages": QUESTION, "tool_choice": "auto"}, "tool_choice"),
    ("chat", {"messages": QUESTION, "logprobs": True}, "logprobs"),
    ("chat", {"messages": QUESTION, "top_logprobs": 3}, "top_logprobs"),
    ("chat", {"messages": QUESTION, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages[0]"),
    ("chat", {"messages": QUESTION, "presence_penalty": 0.5}, "presence_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": -1}, "frequency_penalty"),
    ("chat", {"messages": QUESTION, "logit_bias": {"50256": -100}}, "logit_bias"),
])
def test_bad_parameters_are_named_in_400_errors(endpoint, body, param):
    from fdconsole.openai_api.http import fd_error_body, validated
    from fdconsole.openai_api.schemas import CHAT_COMPLETIONS, COMPLETIONS
    from scheduler.errors import InvalidRequest

    model = (COMPLETIONS if endpoint == "completions" else CHAT_COMPLETIONS).request_model
    with pytest.raises(InvalidRequest) as refused:
        validated(model, {"model": "default", **body})
    error = fd_error_body(refused.value)["error"]
    assert (refused.value.status, error["param"], error["type"]) == (400, param, "invalid_request_error")
    assert error["message"].startswith(f"{param}: "), error


def test_unknown_fields_are_taken_and_ignored_and_text_parts_joined():
    from fdconsole.openai_api.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({
        "model": "default", "user": "someone", "presence_penalty": 0, "n": 1, "tools": [],
        "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False, "max_tokens": 9,
        "max_completion_tokens": 5, "frequency_penalty": 0.0, "logit_bias": {}, "stream": None,
        "stream_options": {"include_usage": None},  # what some clients send for "the default"
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "assistant", "content": None},
                     {"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]}],
    })
    assert body.chat() == [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": ""},
                           {"role": "user", "content": "a\nb"}]
    assert body.include_usage is False and not body.stream
    assert body.resolved_max_tokens(context_left=100) == 5  # max_completion_tokens wins
    assert body.native_sampling(5)["temperature"] == 1.0  # OpenAI's default (the native one is greedy)


def test_every_registered_endpoint_is_routed_and_has_a_schema():
    from django.urls import resolve

    from fdconsole.openai_api import views
    from fdconsole.openai_api.schemas import ENDPOINTS, ERROR_MODEL

    for endpoint in ENDPOINTS:
        assert resolve(endpoint.path.replace("{model}", "default")).func is views.VIEWS[endpoint]
        for model in (endpoint.request_model, endpoint.response_model, endpoint.stream_model, ERROR_MODEL):
            if model is not None:
                assert model.model_json_schema()["type"] == "object"


def test_errors_in_process_are_openais_shape(api, node):
    from django.test import Client

    listed = api.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["default"]
    unknown = api.post("/v1/chat/completions", {"model": "nope", "messages": QUESTION})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": unknown.json()["error"]["message"],
                                        "type": "invalid_request_error", "param": "model",
                                        "code": "model_not_found"}}
    assert api.post("/v1/completions", raw="{not json").json()["error"]["type"] == "invalid_request_error"
    assert api.get("/v1/completions").status_code == 405
    assert api.get("/v1/no/such/thing").json()["error"]["code"] == "unknown_url"
    anonymous = Client().get("/v1/models")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    # CSRF checks on, as a browser-less client meets them: no HTML 403 anywhere under /v1/
    checked = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=api.client.defaults["HTTP_AUTHORIZATION"])
    for path in ("/v1/embeddings", "/v1/chat/completions/", "/v1/responses"):
        probe = checked.post(path, data="{}", content_type="application/json")
        assert probe.status_code == 404 and probe.json()["error"]["code"] == "unknown_url", path
    refused = Client(enforce_csrf_checks=True).post("/v1/embeddings", data="{}",
                                                    content_type="application/json")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    for path in ("/api/openapi.json", "/api/docs"):
        assert checked.post(path).status_code == 405, path


def test_a_failure_mid_stream_is_one_error_event_then_done():
    import asyncio
    from datetime import UTC, datetime

    from fdconsole.api.stream import DoneEvent, ErrorEvent, TokenEvent
    from fdconsole.errors import TopicRedisUnavailable
    from fdconsole.inference.models import Request
    from fdconsole.openai_api.answers import ChatShape, chunks
    from fdconsole.topics.models import Topic

    row = Request(request_id="r1", topic=Topic(name="default"), created_at=datetime.now(UTC), prompt_tokens=3,
                  output_token_ids=[72], status="failed", error_code="node_error", error_message="boom")

    async def read(*batches) -> list[str]:
        async def source():
            for batch in batches[1:]:
                yield batch
        return [piece async for piece in chunks(ChatShape(row), batches[0], source(), include_usage=True)]

    for end, code in [(ErrorEvent(TopicRedisUnavailable("gone")), "redis_unavailable"),
                      (DoneEvent(row), "node_error")]:
        token = TokenEvent(0, 72, "H")
        for batches in ([[token], [end]], [[token, end]]):  # read apart, or together
            pieces = asyncio.run(read(*batches))
            assert len(pieces) == len(batches)  # one write a batch
            role, token_chunk, error, done = sse_blocks("".join(pieces))
            assert json.loads(role)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert json.loads(token_chunk)["choices"][0]["delta"] == {"content": "H"}
            assert json.loads(token_chunk)["usage"] is None  # asked for usage: all chunks but the last: null
            assert json.loads(error)["error"]["code"] == code and done == "[DONE]"


@pytest.mark.django_db(transaction=True)
def test_redis_failing_while_a_stream_waits_ends_it_with_one_error(api, node, monkeypatch):
    from asgiref.sync import async_to_sync
    from redis.exceptions import ConnectionError as RedisConnectionError

    from fdconsole.api import stream
    from fdconsole.inference.limits import StreamSlot
    from fdconsole.inference.models import Request
    from fdconsole.openai_api.answers import ChatShape, chunks

    body = {"prompt": "Hi", "max_tokens": 4, "request_id": "w"}
    assert api.post("/api/v1/topics/default/requests", body).status_code == 202
    row = Request.objects.select_related("topic").get(request_id="w")

    def redis_gone(row):
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(stream, "sync_request", redis_gone)  # the stream is read; the row's state is not

    async def read(events):
        return [event async for event in events]

    [error] = async_to_sync(read)(stream.request_events(row))
    assert isinstance(error, stream.ErrorEvent) and error.error.code == "redis_unavailable"
    native = "".join(async_to_sync(read)(stream.sse_events(row, StreamSlot(None))))
    assert native.startswith("event: error\n") and native.count("event:") == 1

    async def openai_stream():
        batches = stream.request_event_batches(row)
        first = await anext(batches)
        return await read(chunks(ChatShape(row), first, batches, include_usage=False))

    role, error_chunk, done = sse_blocks("".join(async_to_sync(openai_stream)()))
    assert json.loads(error_chunk)["error"]["code"] == "redis_unavailable" and done == "[DONE]"
