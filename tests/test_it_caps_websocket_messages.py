"""The live pages' WebSockets take only small messages (the pages themselves send none): a frame over
4 KiB is refused by the server with 1009 ("message too big") from its header, before its payload is
read; a message over 4 KiB made of smaller frames closes the socket with 4413 before any consumer
decodes it. Small messages change nothing: the socket stays open.

The real console (daphne) is spoken to over its port with hand-made frames; the application's own cap is
also driven in this process through the real ASGI stack (origin check, session cookie) with
``WebsocketCommunicator``.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings

from fdconsole.bounded_input import MAX_WS_FRAME_BYTES, MAX_WS_MESSAGE_BYTES, MESSAGE_TOO_BIG

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGE_TOO_BIG_RFC = 1009  # RFC 6455's code, which the server itself sends for a frame too big
TEXT, CONTINUATION, CLOSE = 0x1, 0x0, 0x8


@pytest.fixture
def session_key(db, store) -> str:
    """A logged-in user's session, in the database the console reads too."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.create_user("erin", password="pw-erin-websocket-1"))
    return client.session.session_key


# -- the real console, over its port ------------------------------------------------------------------
class RawSocket:
    """A WebSocket client that writes its frames by hand, so that it can send what browsers would not."""

    def __init__(self, console, session_key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", console.port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((
            f"GET /ws/cluster/ HTTP/1.1\r\nHost: 127.0.0.1:{console.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://127.0.0.1:{console.port}\r\n"
            f"Cookie: {settings.SESSION_COOKIE_NAME}={session_key}\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        handshake, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert handshake.startswith(b"HTTP/1.1 101"), handshake

    def send(self, payload: bytes, opcode: int = TEXT, fin: bool = True) -> None:
        mask = os.urandom(4)
        length = len(payload)
        header = bytes([(0x80 if fin else 0) | opcode])
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 2**16:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection without a close frame")
            self.buffer += data
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return taken

    def frame(self) -> tuple[int, bytes]:
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        return first & 0x0F, self._take(length)

    def close_code(self, seconds: float = 5.0) -> int | None:
        """The code of the server's close frame, skipping the live updates before it; None when it sends
        none within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                opcode, payload = self.frame()
            except TimeoutError:
                return None
            if opcode == CLOSE:
                return struct.unpack("!H", payload[:2])[0]
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(console, session_key):
    sockets = []

    def connect() -> RawSocket:
        sockets.append(RawSocket(console, session_key))
        return sockets[-1]

    yield connect
    for sock in sockets:
        sock.close()


def test_a_frame_over_the_cap_is_refused_with_1009(raw):
    talk = raw()
    talk.send(b"x" * (MAX_WS_FRAME_BYTES + 1))
    assert talk.close_code() == MESSAGE_TOO_BIG_RFC


def test_a_message_over_the_cap_made_of_small_frames_is_refused(raw):
    talk = raw()
    piece = b"x" * (MAX_WS_FRAME_BYTES // 2)
    talk.send(piece, TEXT, fin=False)
    talk.send(piece, CONTINUATION, fin=False)
    talk.send(b"x", CONTINUATION)  # one byte over the message cap, no frame over the frame cap
    assert talk.close_code() == MESSAGE_TOO_BIG


def test_small_messages_leave_the_socket_open(raw):
    talk = raw()
    talk.send(b'{"hello": "console"}')
    talk.send(b'"' + b"x" * (MAX_WS_MESSAGE_BYTES - 2) + b'"')  # a JSON string of exactly the cap
    assert talk.close_code(seconds=1.5) is None


# -- the application's own cap, in this process -------------------------------------------------------
def communicate(session_key: str, text: str) -> int | None:
    """Connects to the real application with the session cookie, reads the hello, sends ``text``; the
    code the application closes with (None when it stays open)."""
    from fdconsole.asgi import application

    async def run():
        cookie = f"{settings.SESSION_COOKIE_NAME}={session_key}".encode()
        talk = WebsocketCommunicator(application, "/ws/cluster/",
                                     headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)])
        assert (await talk.connect(timeout=5))[0]
        assert (await talk.receive_json_from(timeout=5))["type"] == "cluster"  # the hello
        await talk.send_to(text_data=text)
        code = None
        deadline = time.monotonic() + 2
        while code is None and time.monotonic() < deadline:
            if await talk.receive_nothing(timeout=0.1):
                continue
            message = await talk.receive_output()
            if message["type"] == "websocket.close":
                code = message.get("code")
        await talk.disconnect()
        return code

    return async_to_sync(run)()


def test_the_application_closes_on_a_message_over_the_cap(session_key):
    assert communicate(session_key, "é" * (MAX_WS_MESSAGE_BYTES // 2 + 1)) == MESSAGE_TOO_BIG  # bytes count


def test_the_application_takes_a_message_within_the_cap(session_key):
    assert communicate(session_key, '"' + "x" * (MAX_WS_MESSAGE_BYTES - 2) + '"') is None
