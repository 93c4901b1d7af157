"""API tokens have a lifecycle and limits: scopes (submit, read, admin) narrow what a token may do, an
expiry ends it, revoking is for good, and per-token limits (requests per minute, requests in flight,
open streams) answer 429 with Retry-After and a message naming the limit. ``fdtoken`` makes such tokens;
in the admin a staff user mints tokens only for themselves."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from fdconsole.api.models import ApiToken

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]
SUBMIT = "/api/v1/topics/default/requests"


def client_of(plain: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {plain}")


def submit(client: Client, **extra):
    body = {"prompt": "Hello", "max_tokens": 4, **extra}
    return client.post(SUBMIT, data=json.dumps(body), content_type="application/json")


def error_of(answer) -> dict:
    return answer.json()["error"]


# -- scopes -------------------------------------------------------------------------------------------
def test_scopes_narrow_what_a_token_may_do(api_user, node):
    _, read = ApiToken.issue(api_user, "reader", scopes=["read"])
    _, write = ApiToken.issue(api_user, "writer", scopes="submit")
    reader, writer = client_of(read), client_of(write)
    assert reader.get("/api/v1/topics").status_code == 200
    assert reader.get("/v1/models").status_code == 200 and reader.get("/metrics").status_code == 200
    refused = submit(reader)
    assert refused.status_code == 403 and error_of(refused)["code"] == "insufficient_scope"
    assert "'submit' scope" in error_of(refused)["message"] and "read" in error_of(refused)["message"]
    chat = reader.post("/v1/chat/completions", data=json.dumps({"model": "default", "messages": [
        {"role": "user", "content": "hi"}]}), content_type="application/json")
    assert chat.status_code == 403 and chat.json()["error"]["type"] == "permission_error"
    assert reader.patch("/api/v1/topics/default", data='{"scheduler_ttl": 9}',
                        content_type="application/json").status_code == 403  # admin scope

    made = submit(writer, request_id="mine")
    assert made.status_code == 202, made.content
    assert writer.get("/api/v1/requests/mine").status_code == 403  # reading needs read
    assert writer.get("/api/v1/requests/mine/stream").status_code == 403
    assert writer.get("/metrics").status_code == 403
    assert writer.delete("/api/v1/requests/mine").status_code in (200, 202)  # cancel is submit's


def test_a_token_never_does_more_than_its_user_may(db, store, topic):
    from django.contrib.auth import get_user_model

    plain = ApiToken.issue(get_user_model().objects.create_user("carol"), "all scopes")[1]
    answer = client_of(plain).patch("/api/v1/topics/default", data='{"scheduler_ttl": 9}',
                                    content_type="application/json")
    assert answer.status_code == 403 and "topics.change_topic" in error_of(answer)["message"]


# -- expiry and revocation ----------------------------------------------------------------------------
def test_an_expired_token_is_refused_saying_so(api_user, store):
    row, plain = ApiToken.issue(api_user, "soon", expires_at=timezone.now() + timedelta(seconds=30))
    assert client_of(plain).get("/api/v1/nodes").status_code == 200
    ApiToken.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    answer = client_of(plain).get("/api/v1/nodes")
    assert answer.status_code == 401 and "expired" in error_of(answer)["message"]


def test_revoking_is_for_good(api_user, store):
    row, plain = ApiToken.issue(api_user, "once")
    row.revoke()
    answer = client_of(plain).get("/api/v1/nodes")
    assert answer.status_code == 401 and "revoked" in error_of(answer)["message"]
    row.revoked = False  # whoever saves over it, through any path
    row.save()
    row.refresh_from_db()
    assert row.revoked and row.revoked_at is not None
    assert client_of(plain).get("/api/v1/nodes").status_code == 401


def test_a_deactivated_users_tokens_are_refused(api_user, api_token, store):
    api_user.is_active = False
    api_user.save()
    answer = client_of(api_token).get("/api/v1/nodes")
    assert answer.status_code == 401 and "deactivated" in error_of(answer)["message"]


# -- limits -------------------------------------------------------------------------------------------
def test_requests_per_minute_are_limited_per_token(api_user, node):
    _, limited = ApiToken.issue(api_user, "rpm", rpm=3)
    _, other = ApiToken.issue(api_user, "free")
    client = client_of(limited)
    for i in range(3):
        assert submit(client).status_code == 202, i
    refused = submit(client)
    assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limited"
    assert "3 requests per minute" in error_of(refused)["message"] and "rpm" in error_of(refused)["message"]
    assert 1 <= int(refused["Retry-After"]) <= 60
    openai = client.post("/v1/completions", data=json.dumps({"model": "default", "prompt": "x"}),
                         content_type="application/json")
    assert openai.status_code == 429 and int(openai["Retry-After"]) >= 1
    assert openai.json()["error"]["type"] == "rate_limit_error"
    assert submit(client_of(other)).status_code == 202  # another token of the same user is not held back


def test_requests_in_flight_are_limited_per_token_and_free_again_when_they_end(api_user, node, run_node):
    row, plain = ApiToken.issue(api_user, "flight", max_in_flight=2)
    client = client_of(plain)
    assert submit(client).status_code == 202 and submit(client).status_code == 202
    refused = submit(client)
    assert refused.status_code == 429 and "max_in_flight" in error_of(refused)["message"]
    assert "has 2" in error_of(refused)["message"] and refused["Retry-After"] == "1"
    run_node()  # both finish; nobody reads them: the limit syncs their rows itself
    assert submit(client).status_code == 202
    assert row.requests.count() == 3


def test_streams_per_token_are_bounded(api_user, node, settings):
    from asgiref.sync import async_to_sync

    from fdconsole.inference.limits import RateLimited, StreamSlot, open_stream

    settings.FD_MAX_STREAMS_PER_TOKEN = 2
    token, plain = ApiToken.issue(api_user, "streams")
    client = client_of(plain)
    assert submit(client, request_id="s").status_code == 202
    held = [async_to_sync(StreamSlot(token).take)() for _ in range(2)]
    refused = client.get("/api/v1/requests/s/stream")
    assert refused.status_code == 429 and "FD_MAX_STREAMS_PER_TOKEN" in error_of(refused)["message"]
    assert refused["Retry-After"] == "1"
    async_to_sync(held[0].release)()
    opened = client.get("/api/v1/requests/s/stream")  # a slot is free again
    assert opened.status_code == 200 and opened["Content-Type"] == "text/event-stream"
    assert client.delete("/api/v1/requests/s").status_code in (200, 202)

    async def read(chunks) -> str:
        return b"".join([chunk async for chunk in chunks]).decode()

    assert "event: done" in async_to_sync(read)(opened.streaming_content)
    open_stream(token)  # the stream that ended gave its slot back
    with pytest.raises(RateLimited, match="streams open"):
        open_stream(token)


def test_a_stream_whose_client_left_at_once_still_gives_its_slot_back(api_user, store, settings):
    """A client that closes the connection as soon as it has the last event makes Django cancel the
    response while the stream ends: the slot must go back all the same, not lapse a minute later."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from asgiref.sync import async_to_sync

    from fdconsole.inference import limits

    settings.FD_MAX_STREAMS_PER_TOKEN = 1
    token, _ = ApiToken.issue(api_user, "left")

    async def leave_while_releasing() -> bool:
        slot = await limits.StreamSlot(token).take()
        # One worker thread, held busy: the release waits for it, so the cancel lands mid-release.
        loop, gate = asyncio.get_running_loop(), threading.Event()
        loop.set_default_executor(ThreadPoolExecutor(1))
        busy = loop.run_in_executor(None, gate.wait)
        releasing = asyncio.ensure_future(slot.release())
        await asyncio.sleep(0.05)
        releasing.cancel()  # the client is gone
        with pytest.raises(asyncio.CancelledError):
            await releasing
        gate.set()
        await busy
        key = limits._streams_key(token)
        for _ in range(200):  # bounded: 2 s
            if not limits.get_redis().zcard(key):
                return True
            await asyncio.sleep(0.01)
        return False

    assert async_to_sync(leave_while_releasing)()
    limits.close_stream(token, limits.open_stream(token))  # free again at once


def test_a_stream_slot_of_a_dead_process_lapses(api_user, store, settings, monkeypatch):
    from fdconsole.inference import limits

    settings.FD_MAX_STREAMS_PER_TOKEN = 1
    token, _ = ApiToken.issue(api_user, "lapse")
    limits.open_stream(token)  # its process dies: never released, never renewed
    with pytest.raises(limits.RateLimited):
        limits.open_stream(token)
    monkeypatch.setattr(limits.time, "time", lambda real=time.time: real() + limits.STREAM_LEASE_S + 1)
    limits.close_stream(token, limits.open_stream(token))


# -- fdtoken ------------------------------------------------------------------------------------------
def fdtoken(*args: str) -> str:
    out = StringIO()
    call_command("fdtoken", *args, stdout=out, stderr=StringIO())
    return out.getvalue().strip().splitlines()[-1]


def test_fdtoken_makes_tokens_with_scopes_expiry_and_limits(store):
    plain = fdtoken("--user", "bot", "--scope", "read", "--scope", "submit", "--expires-days", "2",
                    "--rpm", "30", "--max-in-flight", "4")
    row = ApiToken.find(plain)
    assert row.scopes == "submit,read" and (row.rpm, row.max_in_flight) == (30, 4)
    assert timedelta(days=1.99) < row.expires_at - timezone.now() <= timedelta(days=2)
    assert ApiToken.find(fdtoken("--user", "bot")).scopes == "submit,read,admin"
    for args, message in [(("--scope", "write"), "unknown scope 'write'"), (("--rpm", "0"), "--rpm must"),
                          (("--max-in-flight", "-1"), "--max-in-flight must"),
                          (("--expires-days", "0"), "--expires-days must")]:
        with pytest.raises(CommandError, match=message):
            fdtoken("--user", "nobody-made", *args)
    from django.contrib.auth import get_user_model

    assert not get_user_model().objects.filter(username="nobody-made").exists()


# -- the admin ------------------------------------------------------------------------------------------
def test_staff_mint_tokens_only_for_themselves_and_superusers_for_anyone(db, store, admin):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    users = get_user_model().objects
    staff = users.create_user("sam", password="pw-sam-12345", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(content_type__app_label="api"))
    bob = users.create_user("bob")
    browser = Client()
    browser.force_login(staff)
    page = browser.get("/admin/api/apitoken/add/").content.decode()
    assert f'value="{staff.pk}"' in page and f'value="{bob.pk}"' not in page
    add = "/admin/api/apitoken/add/"
    forged = browser.post(add, {"user": bob.pk, "name": "x", "scope_choices": ["read"]})
    assert forged.status_code == 200 and not ApiToken.objects.filter(user=bob).exists()  # form error
    made = browser.post(add, {"user": staff.pk, "name": "mine", "scope_choices": ["read"], "rpm": "5"})
    assert made.status_code == 302 and ApiToken.objects.get(user=staff).rpm == 5
    ApiToken.issue(bob, "bob's")
    assert "bob&#x27;s" not in browser.get("/admin/api/apitoken/").content.decode()  # not theirs to see
    assert admin.post("/admin/api/apitoken/add/", {"user": bob.pk, "name": "for bob",
                                                   "scope_choices": ["submit"]}).status_code == 302
    assert ApiToken.objects.filter(user=bob, name="for bob", scopes="submit").exists()
    bad = admin.post("/admin/api/apitoken/add/", {"user": bob.pk, "name": "z", "scope_choices": ["read"],
                                                  "max_in_flight": "0"})
    assert bad.status_code == 200 and "max_in_flight must be at least 1" in bad.content.decode()


def test_a_revoked_token_cannot_be_restored_in_the_admin(admin, api_user, api_token):
    row = ApiToken.objects.get()
    row.revoke()
    page = admin.get(f"/admin/api/apitoken/{row.pk}/change/").content.decode()
    assert 'name="revoked"' not in page  # shown, not editable
    admin.post(f"/admin/api/apitoken/{row.pk}/change/", {"name": "again", "scope_choices": ["read"],
                                                         "revoked": ""})
    row.refresh_from_db()
    assert row.revoked


def test_a_submit_only_token_cancels_without_reading_the_output(api_user, node):
    _, write = ApiToken.issue(api_user, "writer", scopes="submit")
    writer = client_of(write)
    assert submit(writer, request_id="w").status_code == 202
    answer = writer.delete("/api/v1/requests/w")
    assert answer.status_code in (200, 202) and answer.json() == {"request_id": "w", "status": "cancelled"}


def test_a_stream_ends_once_its_token_is_revoked(api_user, node, monkeypatch):
    from asgiref.sync import async_to_sync

    from fdconsole.api import stream
    from fdconsole.inference import limits

    monkeypatch.setattr(stream, "KEEPALIVE_S", 0.05)  # news (a keep-alive) comes at once
    monkeypatch.setattr(limits, "STREAM_RENEW_S", 0.0)  # and each one renews, checking the token
    token, plain = ApiToken.issue(api_user, "watch")
    client = client_of(plain)
    assert submit(client, request_id="long").status_code == 202  # queued: it would stream for hours
    opened = client.get("/api/v1/requests/long/stream")
    assert opened.status_code == 200
    token.revoke()

    async def read(chunks) -> str:
        return b"".join([chunk async for chunk in chunks]).decode()

    started = time.monotonic()
    body = async_to_sync(read)(opened.streaming_content)  # ends: no done, no error, just the end
    assert time.monotonic() - started < 10 and "event: done" not in body
    assert client.get("/api/v1/requests/long/stream").status_code == 401


def test_a_users_page_streams_are_bounded_too(api_user, api, node, settings):
    from asgiref.sync import async_to_sync

    from fdconsole.inference.limits import StreamSlot

    settings.FD_MAX_STREAMS_PER_TOKEN = 1
    assert api.post(SUBMIT, {"prompt": "Hi", "max_tokens": 4, "request_id": "p"}).status_code == 202
    browser = Client()
    browser.force_login(api_user)
    async_to_sync(StreamSlot(api_user).take)()  # another tab holds the one stream
    refused = browser.get("/requests/p/stream")
    assert refused.status_code == 429 and "FD_MAX_STREAMS_PER_TOKEN" in refused.content.decode()
