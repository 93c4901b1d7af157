"""The request hash in Redis, declared: every field the scripts write, its type and what it means.

While a request is in flight, its hash (``fd:{topic}:req:<uid>``, see ``scheduler.keys.request``) is
the authority on it; the console's database copies it (``fdconsole.inference.sync``). The scripts
write it field by field (``scheduler/lua``); ``RequestState.from_hash`` is the one place that names
and parses those fields, as rq's ``Job.restore`` does for a job hash. A field the hash lacks takes
the default below (a request not yet claimed has no ``lease``, one never handed off no ``handoff_ms``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from scheduler.messages import Request
from scheduler.status import RequestStatus


@dataclass(frozen=True)
class RequestState:
    # -- identity and placement (written by submit) --
    request_id: str = ""  # the client's id (unique per topic while in flight)
    status: RequestStatus = RequestStatus.QUEUED
    home_node: str = ""  # the node it was placed on ('' while a splitwise request waits for a node)
    queue_node: str = ""  # the node whose queue holds it now; '' when in no node queue
    enqueued_at: float | None = None  # server time of its first enqueue (orders failover)
    ttl: int = 0  # scheduler_ttl when it was submitted, seconds
    prompt_tokens: int = 0
    payload: str = ""  # the request as JSON (``messages.Request``); see ``request``
    origin: str = ""  # who gets its results through the scheduler interface ('' for none)
    result_shard: str = ""  # splitwise: which of the origin's result lists ('' for its only one)
    # -- running (written by claim, emit, renew, failover) --
    attempt: int = 0  # claims so far; the lease of attempt a on node n is "n#a"
    executed_by: str = ""  # the node running it now ('' when none)
    lease: str = ""  # the current lease ('' when none)
    started_at: float | None = None  # server time of its first claim
    first_token_at: float | None = None
    num_output_tokens: int = 0  # tokens streamed so far: the next index
    requeues: int = 0  # times it went back to a queue after its node died
    cancel_requested: bool = False  # the client cancelled while it ran
    # -- the end (written by close) --
    finished_at: float | None = None
    finish_reason: str = ""  # "length", "stop", or how it ended otherwise ("cancelled", "expired"...)
    error_code: str = ""
    error_message: str = ""
    output_token_ids: list[int] | None = None  # recorded when it finishes; the output stream has them before
    # -- splitwise (written by placement and handoff) --
    phase: str = ""  # "prefill", "decode", or "" for a whole request on one node
    prefill_node: str = ""
    decode_node: str = ""
    charge_p: int = 0  # load charged to its prefill node (prompt tokens), until released
    charge_d: int = 0  # load charged to its decode node (one request), until released
    waiting_for: str = ""  # what placement lacks ("decode node", "live node"...); '' once placed
    handoff_bytes: int | None = None  # the KV cache's size when it was handed to the decode node
    handoff_ms: float | None = None  # how long writing that KV cache took

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> RequestState:
        """Parse a request hash as Redis returns it (bytes or str). Fields it lacks keep their
        defaults; fields this schema does not declare are ignored (``unknown_fields`` names them)."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            parse = _PARSERS.get(name)
            if parse is not None:
                values[name] = parse(value.decode() if isinstance(value, bytes) else value)
        return cls(**values)

    @classmethod
    def unknown_fields(cls, raw: Mapping[bytes | str, Any]) -> set[str]:
        """Names in ``raw`` that this schema does not declare (a script wrote a field nobody reads)."""
        names = {key.decode() if isinstance(key, bytes) else key for key in raw}
        return names - _PARSERS.keys()

    @property
    def request(self) -> Request:
        """The request as it was submitted (prompt, sampling)."""
        return Request.from_dict(json.loads(self.payload))

    @property
    def is_final(self) -> bool:
        return self.status.is_final


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: parse(text) if text != "" else None


# How each field's text becomes its value, from its declared type.
_BY_TYPE: dict[str, Callable[[str], Any]] = {
    "str": str, "int": int, "float | None": _optional(float), "int | None": _optional(int),
    "bool": lambda text: text == "1", "RequestStatus": RequestStatus,
    "list[int] | None": _optional(json.loads),
}
_PARSERS: dict[str, Callable[[str], Any]] = {f.name: _BY_TYPE[str(f.type)] for f in fields(RequestState)}
