"""Bounds on what a client can make the console read before any view or consumer runs: request bodies
(``FD_MAX_BODY_BYTES``) and WebSocket frames and messages.

A request body is buffered whole twice before a Django view sees it: daphne (Twisted) receives all of it
into a file before it calls the ASGI application, and Django's ``ASGIHandler`` then reads all of it into
a spooled file before any Django middleware runs (``DATA_UPLOAD_MAX_MEMORY_SIZE`` is checked only when a
view reads ``request.body``). So the limit is kept at both edges, with the same answer, 413 in the API's
error shape (OpenAI's under ``/v1/``):

- ``BodyLimit``, ASGI middleware around the Django application: a declared ``Content-Length`` over the
  limit is refused at once; otherwise the ``http.request`` messages are counted as they arrive and the
  answer goes out as soon as the count passes the limit, the rest never read. What any ASGI server that
  streams bodies to the application (uvicorn, hypercorn) needs.
- ``bound_daphne``: the same where daphne reads the socket, since it would otherwise buffer the whole
  body before ``BodyLimit`` saw a byte; and daphne's WebSocket frames capped at ``MAX_WS_FRAME_BYTES``
  (autobahn then closes with 1009, "message too big", before it reads the payload).
- ``MessageLimit``, ASGI middleware around the WebSocket stack: a message over ``MAX_WS_MESSAGE_BYTES``
  (small frames can make a large one) closes the socket with ``MESSAGE_TOO_BIG`` before any consumer
  decodes it. The live pages send nothing; a few KiB is room to spare.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from daphne import http_protocol
from django.core.exceptions import ImproperlyConfigured
from twisted.web.http import HTTPChannel

from fdconsole.openai_api.http import error_body

log = logging.getLogger(__name__)
MAX_WS_FRAME_BYTES = 4096
MAX_WS_MESSAGE_BYTES = 4096
# 1009 is WebSocket's own "message too big", but an ASGI application may not send it under daphne
# (autobahn takes only 1000 and 3000-4999 from one): 4000 + the HTTP status, as 4401 and 4404 of the
# live pages' consumer.
MESSAGE_TOO_BIG = 4413
# After a 413 sent while the body still arrives, what comes is read and dropped this long before the
# connection closes: closing a socket with unread data resets it, and a reset can destroy the answer
# before the client reads it (Go's net/http waits 500 ms the same way).
LINGER_S = 0.5


def too_large(path: str, max_body_bytes: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The 413 answer (status, headers, body) for a request to ``path``: the API's error shape, OpenAI's
    under ``/v1/``."""
    message = (f"the request body is larger than {max_body_bytes} bytes, the most this console reads "
               "(FD_MAX_BODY_BYTES)")
    log.info("413 for %r: %s", path, message)
    if path == "/v1" or path.startswith("/v1/"):
        error = error_body(413, "request_too_large", message)
    else:
        error = {"error": {"code": "too_large", "message": message}}
    body = json.dumps(error).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return 413, headers, body


def checked_limit(max_body_bytes: int) -> int:
    if max_body_bytes < 1:
        raise ImproperlyConfigured(f"FD_MAX_BODY_BYTES must be at least 1 (got {max_body_bytes})")
    return max_body_bytes


class BodyLimit:
    """ASGI middleware: a request body over ``max_body_bytes`` gets 413 before it is read whole."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = checked_limit(max_body_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self.refuse(scope, send)
            return
        num_body_bytes, refused = 0, False

        async def bounded_receive() -> dict:
            nonlocal num_body_bytes, refused
            message = await receive()
            if message["type"] == "http.request":
                num_body_bytes += len(message.get("body", b""))
                if num_body_bytes > self.max_body_bytes:
                    refused = True
                    await self.refuse(scope, send)
                    return {"type": "http.disconnect"}  # Django stops reading and answers nothing
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:  # the answer was ours; nothing the application says after it goes out
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)

    async def refuse(self, scope: dict, send: Any) -> None:
        status, headers, body = too_large(scope.get("path", ""), self.max_body_bytes)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def content_length(scope: dict) -> int | None:
    """The request's declared ``Content-Length``; None when it has none (chunked) or it is no number
    (the server refuses that itself)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class MessageLimit:
    """ASGI middleware: a WebSocket message over ``max_message_bytes`` closes the socket with
    ``MESSAGE_TOO_BIG`` instead of reaching the application, which then sees a disconnect."""

    def __init__(self, app: Any, max_message_bytes: int = MAX_WS_MESSAGE_BYTES) -> None:
        self.app = app
        self.max_message_bytes = max_message_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        closed = False

        async def bounded_receive() -> dict:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.receive" and message_size(message) > self.max_message_bytes:
                closed = True
                await send({"type": "websocket.close", "code": MESSAGE_TOO_BIG})
                return {"type": "websocket.disconnect", "code": MESSAGE_TOO_BIG}
            return message

        async def guarded_send(message: dict) -> None:
            if not closed:
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)


def message_size(message: dict) -> int:
    text = message.get("text")
    return len(text.encode()) if text is not None else len(message.get("bytes") or b"")


# -- daphne ---------------------------------------------------------------------------------------
class BoundedWebRequest(http_protocol.WebRequest):
    """daphne's HTTP request, refusing a body over ``max_body_bytes`` while it arrives (Twisted calls
    ``gotLength`` once the headers are in, then ``handleContentChunk`` per piece of the body, and only
    then ``process``, which starts the ASGI application), and capping the frames of a WebSocket it
    upgrades to."""

    max_body_bytes = 1024 * 1024
    max_ws_frame_bytes = MAX_WS_FRAME_BYTES
    num_body_bytes, refused = 0, False

    def gotLength(self, length: int | None) -> None:
        self.num_body_bytes, self.refused = 0, False
        if length is not None and length > self.max_body_bytes and self.refuse():
            # Nothing of the body will be kept, and a client waiting for "100 Continue" must not get it
            # after the 413 (Twisted sends it once this returns).
            self.requestHeaders.removeHeader(b"expect")
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return  # dropped: the answer is out
        self.num_body_bytes += len(data)
        if self.num_body_bytes > self.max_body_bytes and self.refuse():
            return
        super().handleContentChunk(data)

    def process(self) -> Any:
        if self.refused:  # the client sent the rest within LINGER_S: the answer is out, close
            self.channel.transport.loseConnection()
            return None
        upgrade = self.requestHeaders.getRawHeaders(b"upgrade") or [b""]
        if upgrade[0].lower() == b"websocket":
            # Autobahn takes a connection's options from the factory when its handshake starts. Without
            # failByDrop it tells a client what it refuses (a close frame: 1009 for a frame too big)
            # instead of dropping the connection with no reason.
            self.server.ws_factory.setProtocolOptions(maxFramePayloadSize=self.max_ws_frame_bytes,
                                                      failByDrop=False)
        return super().process()

    def refuse(self) -> bool:
        """Sends the 413 and closes the connection after ``LINGER_S``; False (and nothing done) where the
        request does not own its connection (an HTTP/2 stream): ``BodyLimit`` answers there."""
        channel = self.channel
        if not isinstance(channel, HTTPChannel) or channel.transport is None:
            return False
        self.refused = True
        target = getattr(channel, "_path", b"")  # the request line's; Twisted keeps it until the body ends
        status, headers, body = too_large(target.split(b"?")[0].decode("latin-1"), self.max_body_bytes)
        head = b"HTTP/1.1 %d Content Too Large\r\n" % status
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        channel.transport.write(head + b"\r\n" + body)
        channel.persistent = False
        from twisted.internet import reactor  # daphne's, installed by the time a request arrives

        reactor.callLater(LINGER_S, channel.transport.loseConnection)
        return True


def bound_daphne(max_body_bytes: int) -> None:
    """Makes the daphne server of this process (the one that loads ``fdconsole.asgi``) use
    ``BoundedWebRequest``. daphne has no setting for a body limit and no hook for its request class but
    the module name its factory builds requests from."""
    BoundedWebRequest.max_body_bytes = checked_limit(max_body_bytes)
    http_protocol.WebRequest = BoundedWebRequest
