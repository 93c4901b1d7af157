"""GET /api/v1/requests/{id}/stream: every token once, in order, then one done event with the final
request object, whether the client connects before, during or after generation."""

import json
import threading

import pytest
from asgiref.sync import async_to_sync

pytestmark = pytest.mark.django_db(transaction=True)


def read_events(api, request_id: str) -> list[tuple[str, dict]]:
    from urllib.parse import quote

    response = api.get(f"/api/v1/requests/{quote(request_id, safe='')}/stream")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/event-stream"
    raw = async_to_sync(collect)(response.streaming_content).decode()
    events = []
    for block in raw.split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if not lines:
            continue
        name = lines[0].removeprefix("event: ")
        events.append((name, json.loads(lines[1].removeprefix("data: "))))
    return events


async def collect(chunks) -> bytes:
    return b"".join([chunk.encode() if isinstance(chunk, str) else chunk async for chunk in chunks])


def check_stream(events, final_status="finished"):
    tokens = [data for name, data in events if name == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert [name for name, _ in events][-1] == "done"
    assert sum(name == "done" for name, _ in events) == 1
    done = events[-1][1]
    assert done["status"] == final_status
    assert [t["token_id"] for t in tokens] == done["output_token_ids"]
    assert "".join(t["text"] for t in tokens) == done["output_text"]
    return tokens, done


def submit(api, **extra) -> str:
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "stream me", "max_tokens": 24, **extra})
    assert answer.status_code == 202, answer.content
    return answer.json()["request_id"]


def test_connecting_after_generation_replays_every_token(api, node, run_node):
    request_id = submit(api)
    run_node()
    tokens, done = check_stream(read_events(api, request_id))
    assert len(tokens) == 24 or done["finish_reason"] == "stop"


def test_tokens_read_together_are_sent_together(api, node, run_node):
    """What one read of Redis finds goes out as one chunk (one write down every layer to the socket),
    not one chunk per token; each chunk holds whole events."""
    request_id = submit(api, max_tokens=24)
    run_node()
    response = api.get(f"/api/v1/requests/{request_id}/stream")
    chunks = async_to_sync(collect_chunks)(response.streaming_content)
    assert all(chunk.endswith("\n\n") for chunk in chunks)
    events = [block for chunk in chunks for block in chunk.split("\n\n") if block]
    tokens = [block for block in events if block.startswith("event: token")]
    assert len(tokens) >= 8  # enough for the count of chunks to tell
    assert len(chunks) <= 2, [chunk[:60] for chunk in chunks]  # the tokens and done, read at once
    assert events[-1].startswith("event: done")


async def collect_chunks(chunks) -> list[str]:
    return [chunk.decode() if isinstance(chunk, bytes) else chunk async for chunk in chunks]


def test_connecting_before_generation_sees_it_live(api, node, run_node):
    request_id = submit(api, max_tokens=200, request_id="live #1 / ?x=%20")
    results = []
    reader = threading.Thread(target=lambda: results.append(read_events(api, request_id)))
    reader.start()
    run_node()
    reader.join(timeout=30)
    assert results, "the stream did not end"
    check_stream(results[0])


def test_two_clients_at_once_each_get_everything(api, node, run_node):
    request_id = submit(api, max_tokens=100)
    results = []
    readers = [
        threading.Thread(target=lambda: results.append(read_events(api, request_id))) for _ in range(2)
    ]
    for reader in readers:
        reader.start()
    run_node()
    for reader in readers:
        reader.join(timeout=30)
    assert len(results) == 2
    assert check_stream(results[0])[1] == check_stream(results[1])[1]


def test_after_redis_let_the_stream_go_the_database_replays_it(api, node, run_node, store):
    from fdconsole.inference.models import Request
    from scheduler import keys

    request_id = submit(api, prompt="héllo ✓", max_tokens=16)
    run_node()
    before = check_stream(read_events(api, request_id))
    uid = Request.objects.get(request_id=request_id).uid
    store.redis.delete(keys.output("default", uid), keys.request("default", uid))
    after = check_stream(read_events(api, request_id))
    assert after[0] == before[0]


def test_an_expired_request_ends_its_stream_with_expired(api, node):
    api.patch("/api/v1/topics/default", {"scheduler_ttl": 1})
    request_id = submit(api)
    events = read_events(api, request_id)  # no node runs: the stream's own poll expires it
    assert [name for name, _ in events] == ["done"]
    assert events[0][1]["status"] == "expired"


def test_stream_of_unknown_request_is_404_and_needs_a_token(api, node):
    from django.test import Client

    assert api.get("/api/v1/requests/nope/stream").status_code == 404
    assert Client().get("/api/v1/requests/nope/stream").status_code == 401


def test_streams_share_one_connection_pool_that_outlives_a_server_closed_connection(redis_url, redis_conn):
    """Readers on one event loop share a client: a second stream borrows the first one's connection
    instead of connecting anew, and a pooled connection the server closed meanwhile is replaced on the
    next read rather than failing the stream; clients of loops that have closed are let go."""
    import asyncio

    from scheduler.store import AsyncOutputReader

    redis_conn.xadd("fd:test:out", {"type": "token", "index": 0, "token_id": 7, "text": "a"})

    async def two_readers_and_a_killed_connection() -> tuple[bool, int, asyncio.AbstractEventLoop]:
        first, second = AsyncOutputReader(redis_url), AsyncOutputReader(redis_url)
        entries = await first.redis.xread({"fd:test:out": "0-0"}, count=10, block=10)
        me = redis_conn.client_id()
        others = [c for c in redis_conn.client_list() if int(c["id"]) != me]
        for client in others:  # as a Redis restart or a proxy's idle timeout would
            redis_conn.client_kill_filter(_id=client["id"])
        again = await second.redis.xread({"fd:test:out": "0-0"}, count=10, block=10)
        return first.redis is second.redis and entries == again, len(others), asyncio.get_running_loop()

    shared, killed, loop = async_to_sync(two_readers_and_a_killed_connection)()
    assert shared and killed >= 1  # the same client; and its connection was among those closed
    async_to_sync(two_readers_and_a_killed_connection)()
    assert loop not in AsyncOutputReader._clients  # closed: its client was let go
