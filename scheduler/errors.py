"""Named errors of the scheduling core.

Each carries the data a boundary (the HTTP API, a management command) needs to answer clearly:
a machine-readable ``code``, a human ``message`` and, where one input is at fault, its ``field``.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base of every error the core raises on purpose."""

    code = "scheduler_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class ConfigError(SchedulerError):
    """A scheduler parameter (or a request field) has a wrong type or value."""

    code = "invalid"


class QueueFull(SchedulerError):
    """The node queue already holds ``scheduler_max_size`` requests."""

    code = "queue_full"


class DuplicateRequest(SchedulerError):
    """A request id that the topic already knows."""

    code = "duplicate_request_id"


class UnknownRequest(SchedulerError):
    """No request with that id (it may have been removed after its final result)."""

    code = "not_found"


class NoNodeAvailable(SchedulerError):
    """The topic has no enabled node to queue the request on."""

    code = "no_node_available"
