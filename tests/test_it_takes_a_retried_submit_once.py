"""A submission sent again (a retried call whose first reply was lost) is the request the first one made,
not a second: by its ``request_id`` or its ``Idempotency-Key``, from the same user, with the same
content. The answer is that request (``Idempotent-Replayed: true``), nothing is added or queued, and no
limit of the token is taken twice. The same name with other content, or another user's request id, is a
409 that tells nothing of the request it names. Both APIs; the OpenAI SDK's own retry too."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from fdconsole.api.models import ApiToken
from tests.api_errors import assert_error

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]
SUBMIT = "/api/v1/topics/default/requests"
BODY = {"prompt": "Hello again", "max_tokens": 6}


def client_of(plain: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {plain}")


def post(client: Client, path: str, body: dict, key: str | None = None):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(path, data=json.dumps(body), content_type="application/json", **headers)


def submit(client: Client, key: str | None = None, **extra):
    return post(client, SUBMIT, {**BODY, **extra}, key)


def rows() -> list[str]:
    from fdconsole.inference.models import Request

    return list(Request.objects.order_by("created_at").values_list("request_id", flat=True))


def replayed(answer) -> bool:
    return answer.get("Idempotent-Replayed") == "true"


def another_user() -> Client:
    from django.contrib.auth import get_user_model

    bob = get_user_model().objects.create_user("bob", password="pw-bob-12345")
    return client_of(ApiToken.issue(bob, "bob's")[1])


async def collect(chunks) -> str:
    return b"".join([c.encode() if isinstance(c, str) else c async for c in chunks]).decode()


# -- the native API -----------------------------------------------------------------------------------
def test_a_request_id_sent_again_is_the_same_request_and_takes_no_limit_twice(api_user, node, run_node):
    _, plain = ApiToken.issue(api_user, "tight", rpm=2, max_in_flight=2)
    client = client_of(plain)
    first = submit(client, request_id="again-1")
    assert first.status_code == 202 and not replayed(first), first.content
    for _ in range(3):  # were these counted, the rpm of 2 and the 2 in flight would be spent
        retry = submit(client, request_id="again-1")
        assert retry.status_code == 202 and replayed(retry), retry.content
        assert retry.json() == first.json()
    assert submit(client, request_id="again-2").status_code == 202  # the second of 2 per minute
    assert rows() == ["again-1", "again-2"]
    assert replayed(submit(client, request_id="again-1"))  # both limits spent: a retry still answers
    refused = submit(client, request_id="again-3")
    assert refused.status_code == 429, refused.content  # ... and a new request is counted

    run_node()
    after = submit(client, request_id="again-1")  # whatever its status now: as it is now
    assert after.status_code == 202 and replayed(after)
    assert after.json()["status"] == "finished" and len(after.json()["output_token_ids"]) == 6
    assert rows() == ["again-1", "again-2"]


def test_the_same_request_id_with_another_body_or_of_another_user_is_409(api, node):
    assert submit(api.client, request_id="taken", prompt="a secret prompt").status_code == 202
    for changed in ({"max_tokens": 5}, {"temperature": 0.5}, {"stop": ["x"]}, {"node": "node-a"},
                    {"prompt": "another prompt"}):
        body = {"request_id": "taken", "prompt": "a secret prompt", **changed}
        error = assert_error(submit(api.client, **body), 409, "request_id")
        assert error["code"] == "duplicate_request_id"
    answer = submit(another_user(), request_id="taken", prompt="a secret prompt")
    error = assert_error(answer, 409, "request_id")
    assert error["message"] == "request_id 'taken' is already taken"  # nothing of alice's request
    assert "secret" not in answer.content.decode() and not replayed(answer)
    assert rows() == ["taken"]


def test_the_same_content_asked_another_way_is_the_same_request(api, node):
    first = submit(api.client, request_id="ways", prompt="Hi", temperature=0)
    same = post(api.client, SUBMIT, {"prompt_token_ids": list(b"Hi"), "max_tokens": 6, "request_id": "ways",
                                     "temperature": 0.0, "top_p": 1, "stream": True})
    assert same.status_code == 202 and replayed(same) and same.json()["request_id"] == "ways"
    assert first.json()["created_at"] == same.json()["created_at"]


def test_a_request_recorded_before_submissions_had_digests_is_still_its_own_retry(api, node):
    from fdconsole.inference.models import Request

    first = submit(api.client, request_id="older")
    Request.objects.filter(request_id="older").update(submission_digest="")  # as the migration left it
    retry = submit(api.client, request_id="older")
    assert retry.status_code == 202 and replayed(retry) and retry.json() == first.json()
    assert_error(submit(api.client, request_id="older", max_tokens=2), 409, "request_id")


def test_an_idempotency_key_makes_one_request_per_user(api, api_user, node):
    first = submit(api.client, key="order-7")
    assert first.status_code == 202 and not replayed(first)
    request_id = first.json()["request_id"]
    retry = submit(api.client, key="order-7")
    assert retry.status_code == 202 and replayed(retry) and retry.json()["request_id"] == request_id
    _, other_token = ApiToken.issue(api_user, "laptop")  # the key is the user's, whichever token sends it
    assert submit(client_of(other_token), key="order-7").json()["request_id"] == request_id
    with_its_id = submit(api.client, key="order-7", request_id=request_id)
    assert replayed(with_its_id)

    for reused in (submit(api.client, key="order-7", max_tokens=3),
                   submit(api.client, key="order-7", request_id="another-id")):
        error = assert_error(reused, 409, "Idempotency-Key")
        assert error["code"] == "idempotency_key_reused"
    bobs = submit(another_user(), key="order-7")  # another user's key of the same name is theirs
    assert bobs.status_code == 202 and not replayed(bobs) and bobs.json()["request_id"] != request_id
    assert len(rows()) == 2


@pytest.mark.parametrize("key", ["", "k" * 256, "naïve"])
def test_a_malformed_idempotency_key_is_refused_by_name(api, node, key):
    assert_error(submit(api.client, key=key), 400, "Idempotency-Key")
    assert rows() == []


@pytest.mark.parametrize("name", ["request_id", "key"])
def test_identical_submissions_racing_end_as_one_request(api_user, node, name):
    _, plain = ApiToken.issue(api_user, "racer", max_in_flight=1)  # the loser must not be a 429 either
    clients = [client_of(plain) for _ in range(6)]
    start, answers = threading.Barrier(len(clients)), []

    def race(client: Client) -> None:
        start.wait()
        answers.append(submit(client, key="race-1") if name == "key" else submit(client, request_id="race-1"))

    threads = [threading.Thread(target=race, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [answer.status_code for answer in answers] == [202] * len(clients), [a.content for a in answers]
    assert len({answer.json()["request_id"] for answer in answers}) == 1
    assert sum(not replayed(answer) for answer in answers) == 1
    assert len(rows()) == 1


def test_the_schema_documents_the_key_and_the_replay_header(db):
    schema = Client().get("/api/openapi.json").json()
    for path, status in (("/api/v1/topics/{topic}/requests", "202"), ("/v1/completions", "200"),
                         ("/v1/chat/completions", "200")):
        operation = schema["paths"][path]["post"]
        [key] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
        assert key["in"] == "header" and not key["required"] and key["schema"]["pattern"]
        assert "Idempotent-Replayed" in operation["responses"][status]["headers"]


# -- the OpenAI-compatible API -----------------------------------------------------------------------
COMPLETION = {"model": "default", "prompt": "Once", "max_tokens": 8, "temperature": 0}


def in_thread(call) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(call()))
    thread.start()
    return thread, answers


def wait_for_rows(count: int) -> None:
    deadline = time.monotonic() + 30
    while len(rows()) < count:
        assert time.monotonic() < deadline, rows()
        time.sleep(0.05)


async def stream(plain: str, path: str, body: dict, key: str) -> tuple[object, list[dict]]:
    """A streamed OpenAI answer, read in the loop that answered it (as ASGI does): the response and its
    chunks."""
    from django.test import AsyncClient

    answer = await AsyncClient().post(path, data=json.dumps(body), content_type="application/json",
                                      headers={"Authorization": f"Bearer {plain}", "Idempotency-Key": key})
    assert answer.status_code == 200, answer.content
    blocks = (await collect(answer.streaming_content)).split("\n\n")
    return answer, [json.loads(b.removeprefix("data: ")) for b in blocks if b.startswith("data: {")]


def test_an_openai_retry_with_its_key_reads_the_same_request_whole_or_streamed(api, api_token, node,
                                                                                run_node):
    calls = [in_thread(lambda: post(api.client, "/v1/completions", COMPLETION, key="oa-1")) for _ in range(2)]
    wait_for_rows(1)
    time.sleep(0.3)  # the second call is waiting too, on the same request
    run_node()
    answers = []
    for thread, answer in calls:
        thread.join(timeout=60)
        answers += answer
    assert [answer.status_code for answer in answers] == [200, 200], [a.content for a in answers]
    assert sorted(replayed(answer) for answer in answers) == [False, True]
    whole = answers[0].json()
    assert answers[1].json() == whole and whole["id"] == f"cmpl-{rows()[0]}"
    assert whole["usage"]["completion_tokens"] == 8

    body = {**COMPLETION, "stream": True}
    again, chunks = async_to_sync(stream)(api_token, "/v1/completions", body, "oa-1")
    assert replayed(again)
    assert {chunk["id"] for chunk in chunks} == {whole["id"]}  # the same request, from its start
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["choices"][0]["text"]
    assert len(rows()) == 1

    reused = post(api.client, "/v1/completions", {**COMPLETION, "prompt": "Twice"}, key="oa-1")
    assert reused.status_code == 409 and reused["x-should-retry"] == "false"  # the SDK would retry a 409
    assert reused.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                         "param": "Idempotency-Key",
                                                         "code": "idempotency_key_reused"}
    bad = post(api.client, "/v1/chat/completions", {"model": "default", "messages": [
        {"role": "user", "content": "hi"}]}, key="x" * 256)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
    assert len(rows()) == 1


def test_an_openai_stream_retried_with_its_key_streams_the_same_request_from_its_start(api_token, node,
                                                                                       run_node):
    body = {**COMPLETION, "prompt": "Hi", "max_tokens": 5, "stream": True}

    def stream_text() -> tuple[bool, str]:
        answer, chunks = async_to_sync(stream)(api_token, "/v1/completions", body, "streamed-1")
        return replayed(answer), "".join(c["choices"][0]["text"] for c in chunks)

    first, second = in_thread(stream_text), in_thread(stream_text)
    wait_for_rows(1)
    time.sleep(0.3)
    run_node()
    for thread, _ in (first, second):
        thread.join(timeout=60)
    (replayed_first, text), (replayed_second, text_again) = first[1] + second[1]
    assert sorted([replayed_first, replayed_second]) == [False, True] and text == text_again and text
    assert len(rows()) == 1


# -- the openai SDK, retrying after a lost reply ------------------------------------------------------
class LosesTheFirstReply(httpx.HTTPTransport):
    """Delivers every call; the reply to the first POST is lost on its way back (the connection drops
    after the server acted), which the SDK answers by retrying. Records each POST's Idempotency-Key."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST":
            self.keys.append(request.headers.get("Idempotency-Key"))
            if len(self.keys) == 1:
                response.close()
                raise httpx.ReadError("the connection dropped before the reply arrived", request=request)
        return response


@pytest.mark.e2e
def test_the_openai_sdk_retrying_a_lost_reply_makes_one_request(console, api_token, node_processes):
    """The SDK (2.x) keeps a call's headers across its retries, so a key sent with the call makes its
    retry the same request. (It sends no Idempotency-Key of its own: its client leaves that off.)"""
    import openai

    from fdconsole.inference.models import Request

    node_processes.start("retry-1", "default")
    for streamed in (False, True):
        transport, key = LosesTheFirstReply(), f"sdk-{streamed}"
        with openai.OpenAI(base_url=f"{console.url}/v1", api_key=api_token, max_retries=1, timeout=60,
                           http_client=httpx.Client(transport=transport)) as sdk:
            answer = sdk.completions.with_raw_response.create(
                **COMPLETION, stream=streamed, extra_headers={"Idempotency-Key": key})
            assert transport.keys == [key, key]  # the lost call, then the SDK's retry with its header
            assert answer.headers["Idempotent-Replayed"] == "true"
            parsed = answer.parse()
            texts = [c.choices[0].text for c in parsed if c.choices] if streamed else [parsed.choices[0].text]
        [row] = Request.objects.filter(idempotency_key=key)
        with httpx.Client(base_url=console.url, headers={"Authorization": f"Bearer {api_token}"}) as http:
            final = http.get(f"/api/v1/requests/{row.request_id}").json()
        assert final["output_text"] == "".join(texts) and len(final["output_token_ids"]) == 8
    assert len(rows()) == 2  # one request per call, its retry included
