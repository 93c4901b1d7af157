"""Named errors of the scheduling core, each carrying what a boundary needs to answer clearly: a
machine-readable ``code``, the HTTP ``status`` it answers with, a human ``message`` and, where one
input is at fault, its ``field``. ``FdError`` is the base of every error raised on purpose in any layer
(the console's own are in ``fdconsole.errors``); a boundary answers any of them the same way.
"""

from __future__ import annotations

from redis.exceptions import ResponseError


class FdError(Exception):
    """Base of every error raised on purpose; handled at the boundary."""

    code = "error"
    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class ConfigError(FdError):
    """A scheduler parameter, or a topic or node name, has a wrong type or value."""

    code = "invalid"


class InvalidRequest(FdError):
    """A field of a submitted request (prompt, sampling, request_id, node) has a wrong type or value."""

    code = "invalid"


class QueueFull(FdError):
    """The node queue already holds ``scheduler_max_size`` requests."""

    code = "queue_full"
    status = 429


class DuplicateRequest(FdError):
    """A request id that the topic already knows."""

    code = "duplicate_request_id"
    status = 409


class NoNodeAvailable(FdError):
    """The topic has no enabled node to queue the request on."""

    code = "no_node_available"
    status = 503


class ScriptError(ResponseError):
    """A Lua script failed in Redis: a bug, or Redis refusing a command. The message names the script
    and the file and line of ``scheduler/lua`` where it happened, then what Redis said. A
    ``ResponseError``, so whoever handles Redis errors handles this one."""

    def __init__(self, script: str, where: str | None, reply: str) -> None:
        super().__init__(f"script {script} failed at {where or 'an unknown line'}: {reply}")
        self.script, self.where, self.reply = script, where, reply
