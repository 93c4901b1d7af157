"""Named errors of the console, each carrying its ``code`` and HTTP ``status`` (see
``scheduler.errors.FdError``, their base, for the scheduling core's own). The API answers any of them
as ``{"error": {"code", "message", "field"}}`` with its status; the pages show its message."""

from __future__ import annotations

from scheduler.connection import describe, redact
from scheduler.errors import FdError


class ApiError(FdError):
    """An answer a view decides itself (no token, a method not allowed, a body too large...)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status, self.code = status, code


class UnknownObject(FdError):
    """A topic, node or request that does not exist."""

    code = "not_found"
    status = 404


class Forbidden(FdError):
    """The user (or their API token) may not do this: the message names the permission or scope."""

    code = "forbidden"
    status = 403


class TopicBusy(FdError):
    """The topic's Redis cannot change now: work or nodes depend on it."""

    code = "topic_busy"
    status = 409


class ModelUnavailable(FdError):
    """A topic's or request's model cannot be served or decoded now: its files are missing or broken on
    this host (the message names the model and what is wrong)."""

    code = "model_unavailable"
    status = 503


class TopicRedisUnavailable(FdError):
    """A topic's Redis did not answer; the message says where, never with the password."""

    code = "redis_unavailable"
    status = 503

    @classmethod
    def of(cls, topic: str, url: str, exc: Exception) -> TopicRedisUnavailable:
        return cls(f"the Redis of topic '{topic}' at {describe(url)} is unavailable: {redact(str(exc), url)}")


class UnknownModel(UnknownObject):
    """A model id of the OpenAI-compatible API that names no topic (OpenAI's ``model_not_found``)."""

    code = "model_not_found"


class GenerationFailed(FdError):
    """A request ended without its answer: it expired before any node took it, or its node failed it.
    Carries the status and code to answer with (the request's own error code, where it has one)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code
