"""One vocabulary: a request's status, and what the scripts answer.

``RequestStatus`` is what the request hash in Redis, the console's database (its Django choices), the
in-process scheduler and the API all say. It is ordered, as vLLM's ``RequestStatus`` is: ``QUEUED <
RUNNING <`` the final statuses, which rank alike, so "has it finished?" is a comparison
(``status >= RequestStatus.FINISHED``, spelled ``status.is_final``). A request only ever moves to a
higher rank. Members are strings too, so they go into JSON, Redis and the database as they are.

The reply enums name the values a script answers with. The Lua scripts get the same names and values
as constants (``scheduler.scripts`` generates them from here), so each is spelled once.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any

FINAL_RANK = 2


class RequestStatus(StrEnum):
    """Ordered by rank: ``a < b`` when ``a`` comes before ``b``; final statuses rank alike (neither
    ``FINISHED < FAILED`` nor ``FAILED < FINISHED``) and only equal themselves."""

    QUEUED = "queued"  # waiting in a node's queue (or, splitwise, for an eligible node)
    RUNNING = "running"  # claimed by a node, under its lease
    FINISHED = "finished"  # generated to its end (length or end of text)
    FAILED = "failed"  # the engine failed, or the request's live state was lost
    EXPIRED = "expired"  # waited longer than scheduler_ttl
    CANCELLED = "cancelled"  # the client cancelled it

    @property
    def rank(self) -> int:
        return _RANKS[self]

    @property
    def is_final(self) -> bool:
        return self.rank == FINAL_RANK

    def may_become(self, other: RequestStatus) -> bool:
        """Whether a request in this status may be recorded as ``other`` (never backwards, and a final
        status is never replaced)."""
        return other.rank > self.rank or (other.rank == self.rank and not self.is_final)

    @classmethod
    def finals(cls) -> tuple[RequestStatus, ...]:
        return tuple(status for status in cls if status.is_final)

    @classmethod
    def choices(cls) -> list[tuple[str, str]]:
        """For a Django field: (value, label) pairs."""
        return [(status.value, status.value.capitalize()) for status in cls]

    def _compare(self, other: Any) -> int:
        if not isinstance(other, RequestStatus):
            raise TypeError(f"a RequestStatus compares only with another, not with {other!r}")
        return self.rank - other.rank

    def __lt__(self, other: Any) -> bool:
        return self._compare(other) < 0

    def __le__(self, other: Any) -> bool:
        return self._compare(other) <= 0

    def __gt__(self, other: Any) -> bool:
        return self._compare(other) > 0

    def __ge__(self, other: Any) -> bool:
        return self._compare(other) >= 0


_RANKS = {status: min(i, FINAL_RANK) for i, status in enumerate(RequestStatus)}


class SubmitReply(StrEnum):
    """What ``submit`` answers for one request."""

    OK = "ok"  # queued (or, splitwise, waiting for an eligible node)
    FULL = "full"  # local mode: its node's queue holds scheduler_max_size requests
    DUPLICATE = "duplicate"  # its request id is already in flight in the topic


class EmitReply(IntEnum):
    """What ``emit`` answers for one token."""

    GO_ON = 0
    CANCEL_ASKED = 1  # the client cancelled: stop generating and finish
    LEASE_LOST = -1  # the request is no longer the caller's (another node carries it on)
    OUT_OF_ORDER = -2  # not the next index: each index is streamed exactly once, in order


class CancelReply(StrEnum):
    """What ``cancel`` answers besides a request's status (CANCELLED when it was waiting, else the
    final status it already had); ``finish`` answers MISSING too."""

    CANCELLING = "cancelling"  # running: its node stops at its next token
    MISSING = "missing"  # Redis does not know the request


_REPLIES = frozenset(reply.value for reply in CancelReply)


def status_or_reply(value: str) -> RequestStatus | CancelReply:
    """A script's answer that is a request's status, or one of the replies that are not."""
    return CancelReply(value) if value in _REPLIES else RequestStatus(value)


def lua_constants() -> dict[str, str | int]:
    """The names the Lua scripts use for these values (``QUEUED``, ``SUBMIT_OK``, ``EMIT_GO_ON``...)."""
    constants: dict[str, str | int] = {status.name: status.value for status in RequestStatus}
    constants.update({f"SUBMIT_{reply.name}": reply.value for reply in SubmitReply})
    constants.update({f"EMIT_{reply.name}": int(reply) for reply in EmitReply})
    constants.update({reply.name: reply.value for reply in CancelReply})
    return constants
