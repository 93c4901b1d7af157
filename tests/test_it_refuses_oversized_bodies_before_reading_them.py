"""A request body over FD_MAX_BODY_BYTES (1 MiB by default) is answered 413, in the API's error shape
(OpenAI's under /v1/), before the console has read it: as soon as a declared Content-Length says so, and
as soon as the bytes of a chunked body pass the limit, the rest never waited for. A body of exactly the
limit is served as before, and so are the login and admin forms.

The real console (daphne, which would otherwise buffer the whole body before the application saw a byte)
is spoken to over its port, with raw sockets where the test must control what is sent and when; the ASGI
middleware, what any other ASGI server relies on, is driven in this process with a body that never ends.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest
from django.conf import settings

pytestmark = pytest.mark.django_db(transaction=True)
LIMIT = settings.FD_MAX_BODY_BYTES
SUBMIT = "/api/v1/topics/default/requests"
ANSWER_S = 5.0  # the answer comes at once; the rest is room for a loaded machine


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer_to(console, *sends: bytes) -> tuple[int, dict, bytes]:
    """Sends ``sends`` on a fresh connection, then (sending nothing more, the connection left open) reads
    the answer: its status, headers and body. Fails when none comes within ANSWER_S."""
    with socket.create_connection(("127.0.0.1", console.port), timeout=ANSWER_S) as sock:
        for data in sends:
            sock.sendall(data)
        received = b""
        deadline = time.monotonic() + ANSWER_S
        while b"\r\n\r\n" not in received or len(received) < _expected_length(received):
            assert time.monotonic() < deadline, f"no whole answer within {ANSWER_S}s: {received!r}"
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    header_block, _, body = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in header_block.split(b"\r\n") if line)
    return int(status_line.split()[1]), headers, body


def _expected_length(received: bytes) -> int:
    found = re.search(rb"\r\ncontent-length: *(\d+)", received, re.IGNORECASE)
    header_end = received.find(b"\r\n\r\n")
    return header_end + 4 + int(found.group(1)) if found else 0


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def assert_native_413(status: int, body: bytes) -> None:
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["code"] == "too_large", error
    assert str(LIMIT) in error["message"] and "FD_MAX_BODY_BYTES" in error["message"], error


# -- the real console --------------------------------------------------------------------------------
def test_a_declared_length_over_the_limit_is_refused_before_any_of_the_body_is_sent(console):
    status, headers, body = answer_to(console, head("POST", SUBMIT, f"Content-Length: {100 * 2**20}"))
    assert_native_413(status, body)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"


def test_the_openai_api_refuses_in_openais_shape(console):
    status, _, body = answer_to(console, head("POST", "/v1/chat/completions", f"Content-Length: {LIMIT + 1}"))
    assert status == 413
    assert json.loads(body) == {"error": {
        "message": f"the request body is larger than {LIMIT} bytes, the most this console reads "
                   "(FD_MAX_BODY_BYTES)",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}}


def test_a_client_waiting_for_100_continue_gets_the_413_instead(console):
    status, _, body = answer_to(console, head("POST", SUBMIT, f"Content-Length: {LIMIT + 1}",
                                              "Expect: 100-continue"))
    assert_native_413(status, body)  # the first status line is the 413: no "100 Continue" before it


def test_a_chunked_body_is_refused_once_it_passes_the_limit_without_waiting_for_its_end(console):
    piece = b" " * 65536
    pieces = [chunk(piece)] * (LIMIT // len(piece)) + [chunk(b" ")]  # one byte over, and no last chunk
    status, _, body = answer_to(console, head("POST", SUBMIT, "Transfer-Encoding: chunked"), *pieces)
    assert_native_413(status, body)


def test_a_streaming_client_is_stopped_long_before_its_body_ends(console, api_token):
    """httpx sends a generator as a chunked body, as fast as the server takes it: without the limit the
    console would read all 64 MiB before answering."""
    total, sent = 64 * 2**20, 0

    def body():
        nonlocal sent
        while sent < total:
            sent += 65536
            yield b" " * 65536
            if sent > 2 * LIMIT:
                time.sleep(0.005)  # past the limit, slow enough that reading to the end takes seconds

    with httpx.Client(base_url=console.url, timeout=30,
                      headers={"Authorization": f"Bearer {api_token}"}) as client:
        started = time.monotonic()
        answer = client.post(SUBMIT, content=body(), headers={"Content-Type": "application/json"})
    assert_native_413(answer.status_code, answer.content)
    assert sent < total / 4, f"the console read {sent} bytes of the body before answering"
    print(f"413 after {time.monotonic() - started:.2f}s, {sent} bytes sent")


def test_a_body_of_exactly_the_limit_is_served(console, node, api_token):
    request = json.dumps({"prompt": "Hello", "max_tokens": 1, "request_id": "at-the-limit"}).encode()
    with httpx.Client(base_url=console.url, timeout=30,
                      headers={"Authorization": f"Bearer {api_token}",
                               "Content-Type": "application/json"}) as client:
        fits = client.post(SUBMIT, content=request + b" " * (LIMIT - len(request)))
        assert fits.status_code == 202, fits.text
        assert fits.json()["request_id"] == "at-the-limit"
        over = client.post(SUBMIT, content=request + b" " * (LIMIT + 1 - len(request)))
    assert_native_413(over.status_code, over.content)


def test_the_login_and_admin_forms_still_work(console):
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-body-limit")
    with httpx.Client(base_url=console.url, timeout=30) as client:
        form = client.get("/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
        logged_in = client.post("/login/", data={"csrfmiddlewaretoken": token, "username": "root",
                                                 "password": "pw-root-body-limit", "next": "/"})
        assert logged_in.status_code == 302 and logged_in.headers["location"] == "/", logged_in.text
        admin = client.get("/admin/auth/user/add/")
        assert admin.status_code == 200
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', admin.text).group(1)
        added = client.post("/admin/auth/user/add/", data={
            "csrfmiddlewaretoken": token, "username": "dora", "password1": "pw-dora-body-limit",
            "password2": "pw-dora-body-limit", "usable_password": "true", "_save": "Save"})
        assert added.status_code == 302, added.text[-2000:]
    assert get_user_model().objects.filter(username="dora").exists()


def test_django_itself_refuses_the_same_bodies():
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE == settings.FD_MAX_BODY_BYTES == LIMIT


# -- the ASGI middleware, as any ASGI server runs it --------------------------------------------------
def asgi_request(path: str, headers: list[tuple[bytes, bytes]], pieces):
    """Runs the console's ASGI application on one POST whose body is ``pieces`` (an iterator of byte
    strings, possibly endless); returns what it sent and how many body messages it asked for."""
    from fdconsole.asgi import application

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    sent, asked, ended = [], 0, False

    async def receive():
        nonlocal asked, ended
        if ended:  # the client waits for the answer: no disconnect
            await asyncio.Event().wait()
        asked += 1
        data = next(pieces, None)
        ended = data is None
        return {"type": "http.request", "body": data or b"", "more_body": not ended}

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(application(scope, receive, send), timeout=30))
    return sent, asked


def endless(piece: bytes):
    while True:
        yield piece


def test_the_middleware_stops_reading_an_endless_body_at_the_limit():
    piece = b" " * 65536
    sent, asked = asgi_request(SUBMIT, [], endless(piece))
    assert asked == LIMIT // len(piece) + 1  # the message that passed the limit was the last one read
    assert sent[0]["status"] == 413 and len(sent) == 2  # and nothing from Django after it
    assert_native_413(sent[0]["status"], sent[1]["body"])


def test_the_middleware_refuses_a_declared_length_without_reading_at_all():
    declared = [(b"content-length", str(LIMIT + 1).encode())]
    sent, asked = asgi_request("/v1/completions", declared, endless(b" "))
    assert asked == 0
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


def test_the_middleware_passes_a_body_within_the_limit_to_django():
    pieces = iter([b'{"prompt": "hi"}', b" " * (LIMIT - 16)])
    sent, _ = asgi_request(SUBMIT, [], pieces)
    assert sent[0]["status"] == 401  # Django's answer: read whole, then refused for its missing token
