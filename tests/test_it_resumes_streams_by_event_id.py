"""GET /api/v1/requests/{id}/stream gives each event an id (a token's index; ``done``), and a client that
comes back with ``Last-Event-ID`` (or ``?last_event_id``) gets only what it lacks. The stream follows
token indexes, never Redis entry ids: when the output stream vanishes and is written again (a Redis
restart, then the request queued again from its row with its tokens streamed first) or Redis stops
answering for a while, the client stays connected and still gets each index exactly once, in order."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import quote

import pytest
from asgiref.sync import async_to_sync
from redis import Redis

from scheduler import keys
from scheduler.status import EmitReply, RequestStatus
from tests.api_errors import assert_error
from tests.test_it_streams_tokens_over_sse import collect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]
TOPIC = "default"


def parse(raw: str) -> list[dict]:
    """The events of a raw stream, each as its fields (``event``, ``data`` parsed, ``id``); comments as
    ``{"comment": ...}``."""
    events = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append({"comment": block.removeprefix(": ")})
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append({**fields, "data": json.loads(fields["data"])})
    return events


def stream_url(request_id: str, query: str = "") -> str:
    return f"/api/v1/requests/{quote(request_id, safe='')}/stream{query}"


def read(api, request_id: str, query: str = "", **headers) -> list[dict]:
    response = api.client.get(stream_url(request_id, query), **headers)
    assert response.status_code == 200, response.content
    return parse(async_to_sync(collect)(response.streaming_content).decode())


def tokens_of(events: list[dict]) -> list[dict]:
    return [event["data"] for event in events if event.get("event") == "token"]


def submit(api, **extra) -> str:
    answer = api.post(f"/api/v1/topics/{TOPIC}/requests", {"prompt": "resume me", "max_tokens": 12, **extra})
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


# -- ids and Last-Event-ID ---------------------------------------------------------------------------
def test_each_token_event_has_its_index_as_id_and_done_has_done(api, node, run_node):
    request_id = submit(api)
    run_node()
    events = read(api, request_id)
    assert [event["id"] for event in events[:-1]] == [str(i) for i in range(12)]
    assert [event["data"]["index"] for event in events[:-1]] == list(range(12))
    assert (events[-1]["event"], events[-1]["id"]) == ("done", "done")


def test_last_event_id_resumes_after_that_token_from_redis_or_the_database(api, node, run_node, store):
    from fdconsole.inference.models import Request

    request_id = submit(api, prompt="héllo ✓ again")
    run_node()
    everything = read(api, request_id)
    done = everything[-1]["data"]
    for source in ("redis", "database"):
        if source == "database":  # Redis let the stream go: the row replays it
            uid = Request.objects.get(request_id=request_id).uid
            store.redis.delete(keys.output(TOPIC, uid), keys.request(TOPIC, uid))
        for resumed in (read(api, request_id, HTTP_LAST_EVENT_ID="4"),
                        read(api, request_id, "?last_event_id=4"),
                        read(api, request_id, "?last_event_id=1", HTTP_LAST_EVENT_ID="4")):  # header wins
            assert [t["index"] for t in tokens_of(resumed)] == list(range(5, 12)), source
            assert tokens_of(everything)[:5] + tokens_of(resumed) == tokens_of(everything)
            assert resumed[-1] == {"event": "done", "id": "done", "data": done}
        assert read(api, request_id, HTTP_LAST_EVENT_ID="done") == [everything[-1]]
        assert read(api, request_id, HTTP_LAST_EVENT_ID="11") == [everything[-1]]


def test_a_client_resuming_mid_generation_gets_the_rest(api, node, run_node):
    request_id = submit(api, max_tokens=60)
    results = []
    reader = threading.Thread(target=lambda: results.append(read(api, request_id, HTTP_LAST_EVENT_ID="29")))
    reader.start()
    run_node()
    reader.join(timeout=60)
    assert [t["index"] for t in tokens_of(results[0])] == list(range(30, 60))
    assert results[0][-1]["event"] == "done"


@pytest.mark.parametrize("value", ["", "x", "-1", "4.0", "1" * 19, "Done"])
def test_a_malformed_last_event_id_is_refused_naming_it(api, node, value):
    request_id = submit(api)
    assert_error(api.client.get(stream_url(request_id), HTTP_LAST_EVENT_ID=value), 400, "Last-Event-ID")
    assert_error(api.get(stream_url(request_id, f"?last_event_id={quote(value)}")), 400, "last_event_id")


def test_the_schema_documents_the_ids_and_how_to_resume(db):
    from django.test import Client

    paths = Client().get("/api/openapi.json").json()["paths"]
    operation = paths["/api/v1/requests/{request_id}/stream"]["get"]
    where = {(p["name"], p["in"]) for p in operation["parameters"]}
    assert {("Last-Event-ID", "header"), ("last_event_id", "query")} <= where
    events = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]["oneOf"]
    ids = {e["properties"]["event"]["const"]: e["properties"].get("id") for e in events}
    assert ids["done"] == {"const": "done"} and ids["token"]["pattern"] == "^[0-9]+$" and ids["error"] is None


# -- a stream that vanishes, or a Redis that stops answering -----------------------------------------
class LiveStream:
    """A request's stream read in a thread as it comes: ``raw`` so far, ``wait_for_index``, ``events``."""

    def __init__(self, api, request_id: str) -> None:
        response = api.client.get(stream_url(request_id))
        assert response.status_code == 200, response.content
        self.raw = ""
        self.thread = threading.Thread(target=async_to_sync(self._pump), args=(response.streaming_content,))
        self.thread.start()

    async def _pump(self, chunks) -> None:
        async for chunk in chunks:
            self.raw += chunk.decode() if isinstance(chunk, bytes) else chunk

    def wait_for_index(self, index: int | str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while f"id: {index}\n" not in self.raw:
            assert time.monotonic() < deadline, self.raw
            time.sleep(0.02)

    def events(self, timeout: float = 60) -> list[dict]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), self.raw
        return parse(self.raw)


class PlayedNode:
    """A node played by hand through the store's scripts: it claims the request and streams ``text``'s
    bytes (what the byte-level model's tokens are) one at a time."""

    def __init__(self, store, uid: str) -> None:
        [claim] = store.claim(TOPIC, "node-a")
        assert claim.uid == uid
        self.store, self.uid, self.lease = store, uid, claim.lease

    def emit(self, text: str, start: int) -> None:
        self.store.redis.hset(keys.request(TOPIC, self.uid), "num_output_tokens", start)  # where it resumes
        for index, char in enumerate(text, start):
            assert self.store.emit(TOPIC, self.uid, self.lease, index, ord(char), char) == EmitReply.GO_ON

    def finish(self, text: str) -> None:
        self.store.renew(TOPIC, "node-a", {self.uid: self.lease})
        self.store.finish(TOPIC, self.uid, self.lease, status=RequestStatus.FINISHED, finish_reason="length",
                          output_token_ids=list(text.encode()))


def started(api, store, text: str, delivered: int) -> tuple[str, PlayedNode, LiveStream]:
    """A request streaming by hand, its first ``delivered`` + 1 tokens read by a live client."""
    from fdconsole.inference.models import Request

    request_id = submit(api, prompt="by hand", max_tokens=len(text))
    uid = Request.objects.get(request_id=request_id).uid
    played = PlayedNode(store, uid)
    played.emit(text[:delivered + 1], 0)
    live = LiveStream(api, request_id)
    live.wait_for_index(delivered)
    return uid, played, live


def assert_each_index_once(events: list[dict], text: str) -> None:
    tokens = tokens_of(events)
    assert [t["index"] for t in tokens] == list(range(len(text)))
    assert "".join(t["text"] for t in tokens) == text
    assert [t["token_id"] for t in tokens] == list(text.encode())
    assert [e.get("event") for e in events if "event" in e][-1] == "done"
    done = events[-1]["data"]
    assert done["status"] == "finished" and done["output_text"] == text


@pytest.mark.parametrize("pause", [True, False], ids=["idle-between", "at-once"])
def test_a_stream_written_again_under_lower_ids_delivers_each_index_once(api, node, store, pause):
    text = "abcdefghij"
    uid, played, live = started(api, store, text, delivered=4)
    out = keys.output(TOPIC, uid)
    # Redis restarted and lost the stream; the request is queued again from its row, which had 7 tokens
    # (more than this client read): they are streamed again first, under ids below any read before.
    store.redis.delete(out)
    for index, char in enumerate(text[:7]):
        store.redis.xadd(out, {"type": "token", "index": index, "token_id": ord(char), "text": char},
                         id=f"1-{index + 1}")
    if pause:
        live.wait_for_index(6)  # found although no new entry came after the last one it read
    played.emit(text[7:], 7)  # the node goes on, under ids above those read before the restart: index 7
    # may come before 5 and 6 (which only a read from the start finds), never delivered before them
    live.wait_for_index(len(text) - 1)  # streamed as they come, not only from the row at the end
    played.finish(text)
    assert_each_index_once(live.events(), text)


def test_a_stream_that_vanishes_then_starts_over_from_index_0_skips_what_was_sent(api, node, store):
    text = "klmnopqrst"
    uid, played, live = started(api, store, text, delivered=5)
    store.redis.delete(keys.output(TOPIC, uid))
    time.sleep(1.2)  # the stream is gone for a while: the client waits
    played.emit(text, 0)  # written again from index 0 (what the row had, less than the client has), on
    played.finish(text)
    assert_each_index_once(live.events(), text)


def test_a_redis_that_stops_answering_for_a_while_keeps_the_client_connected(api, node, store, redis_url):
    text = "uvwxyz0123"
    uid, played, live = started(api, store, text, delivered=2)
    with Redis.from_url(redis_url) as operator:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:  # every connection dropped, again and again
            operator.client_kill_filter(_type="normal", skipme=True)
            time.sleep(0.05)
        operator.client_pause(4500, all=True)  # then no answer at all, longer than a read may wait
    time.sleep(4.6)
    played.emit(text[3:], 3)
    played.finish(text)
    events = live.events()
    assert {"comment": "waiting for Redis"} in events
    assert_each_index_once([event for event in events if "comment" not in event], text)


def test_a_request_the_database_ends_while_redis_does_not_answer_ends_its_stream(api, node, store, redis_url):
    from django.utils import timezone

    from fdconsole.inference.models import Request

    text = "ABCDEFGHIJ"
    uid, played, live = started(api, store, text, delivered=2)
    with Redis.from_url(redis_url) as operator:
        operator.client_pause(7000, all=True)
    Request.objects.filter(uid=uid).update(  # as the node's hook or the reconciler records it
        status="finished", output_token_ids=list(text.encode()), finish_reason="length",
        finished_at=timezone.now())
    live.wait_for_index("done", timeout=6)  # while Redis still does not answer
    assert_each_index_once([event for event in live.events() if "comment" not in event], text)
