"""The in-process scheduler: one FIFO queue in memory with FastDeploy's Local semantics, defects
fixed; a node's engine admits requests from it by its KV-block and token budgets.

Design note. FastDeploy's LocalScheduler keeps a list of ids and a read cursor into it; removing an id
anywhere in the list moves the cursor, which hands requests out twice or skips them, and its TTL
eviction only runs when the queue is over ``max_size`` (which ``put`` prevents) and pops the wrong
indices. Here every request lives in ``requests`` (id -> entry) from its put until its final result
has been taken, and sits in exactly one of two places while it is alive:

- ``waiting``: an ``OrderedDict`` in put order. ``get_requests`` pops from its front, so a request is
  handed out at most once and removing one (cancel, expiry, an early final result) disturbs no other.
- ``running``: handed out and not yet finished.

A request whose final result is queued in ``outputs`` is in neither (its status is final); it stays in
``requests`` (so its id is still a duplicate) until ``get_results`` has taken that final result.

Expiry: put times come from a monotonic clock and ``waiting`` is in put order, so the expired requests
are always a prefix of ``waiting`` and eviction stops at the first live one.

Budgets: a request costs ``ceil(prompt_len / block_size) + reserved_output_blocks`` KV blocks and
``prompt_len`` tokens. The first request of a call is taken whenever its blocks fit
``available_blocks``, even if its prompt alone is longer than ``max_num_batched_tokens``: FastDeploy
requires ``max_num_batched_tokens >= max_model_len`` without chunked prefill (and skips the token check
with it), so its intent is that the token budget limits batching, never admission of a lone request.
Refusing it would block the FIFO head, and everything behind it, forever. Requests after the first
must fit what is left of both budgets; the first one that does not ends the batch (no skipping ahead).

All state is guarded by one condition variable; ``wait_for_requests``/``wait_for_results`` let an owner
block on it instead of polling.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scheduler.config import UNBOUNDED, SchedulerConfig
from scheduler.errors import ConfigError
from scheduler.interface.base import Scheduler
from scheduler.messages import Request, Result
from scheduler.status import RequestStatus

logger = logging.getLogger(__name__)
CANCELLED_MESSAGE = "the request was cancelled"


@dataclass
class _Entry:
    request: Request
    put_time: float  # clock() at put; TTL is measured from here
    status: RequestStatus = RequestStatus.QUEUED  # final: its final result waits in outputs
    cancelled: bool = False  # set on a running request; its final result becomes "cancelled"


class InProcessScheduler(Scheduler):
    """Thread-safe in-process scheduler with FastDeploy's Local semantics, defects fixed."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock  # must not go backwards: expiry relies on put order == put-time order
        self._cond = threading.Condition()
        self.requests: dict[str, _Entry] = {}
        self.waiting: OrderedDict[str, _Entry] = OrderedDict()
        self.running: dict[str, _Entry] = {}
        self.outputs: dict[str, list[Result]] = {}  # results not yet taken by get_results

    # -- requests ----------------------------------------------------------------------------------

    def put_requests(self, requests: list[Request]) -> list[tuple[str, str | None]]:
        """Queue ``requests``; answer ``(request_id, error or None)`` for exactly these, in order.

        Expired requests are evicted first so that they never take a place a new request needs.
        """
        with self._cond:
            self._evict_expired()
            answers = [(request.request_id, self._admit(request)) for request in requests]
            self._cond.notify_all()
        return answers

    def _admit(self, request: Request) -> str | None:
        request_id = request.request_id
        if request_id in self.requests:
            return f"duplicate request id '{request_id}'"
        max_size = self.config.scheduler_max_size
        if max_size != UNBOUNDED and len(self.waiting) >= max_size:
            return f"queue full (scheduler_max_size={max_size})"
        entry = _Entry(request, put_time=self.clock())
        self.requests[request_id] = entry
        self.waiting[request_id] = entry
        return None

    def get_requests(
        self,
        available_blocks: int,
        block_size: int,
        reserved_output_blocks: int,
        max_num_batched_tokens: int,
        batch: int = 1,
    ) -> list[Request]:
        """Hand out up to ``batch`` waiting requests that fit the KV-block and token budgets, FIFO.

        Each handed-out request moves to ``running`` and is never handed out again. See the module
        note for the first-request rule.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        with self._cond:
            self._evict_expired()
            if available_blocks <= reserved_output_blocks or batch < 1:
                return []
            return self._schedule(available_blocks, block_size, reserved_output_blocks,
                                  max_num_batched_tokens, batch)

    def _schedule(self, block_budget: int, block_size: int, reserved_output_blocks: int,
                  token_budget: int, batch: int) -> list[Request]:
        scheduled: list[Request] = []
        while self.waiting and len(scheduled) < batch:
            entry = next(iter(self.waiting.values()))
            num_tokens = entry.request.prompt_len
            num_blocks = math.ceil(num_tokens / block_size) + reserved_output_blocks
            if num_blocks > block_budget:
                break
            # The first request ignores the token budget, else a long prompt blocks the queue forever.
            if scheduled and num_tokens > token_budget:
                break
            block_budget -= num_blocks
            token_budget -= num_tokens
            self._start(entry)
            scheduled.append(entry.request)
        return scheduled

    def _start(self, entry: _Entry) -> None:
        request_id = entry.request.request_id
        del self.waiting[request_id]
        entry.status = RequestStatus.RUNNING
        self.running[request_id] = entry

    def wait_for_requests(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a request is waiting; True if one is."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.waiting), timeout)

    # -- results -----------------------------------------------------------------------------------

    def put_results(self, results: list[Result]) -> None:
        """Append each result to its request's outputs, in order; results of unknown ids are dropped.

        An error result is a result like any other: it finishes its own request and nothing else.
        """
        with self._cond:
            for result in results:
                self._deliver(result)
            self._cond.notify_all()

    def _deliver(self, result: Result) -> None:
        entry = self.requests.get(result.request_id)
        if entry is None:
            logger.warning("dropping a result for unknown request %r (finished, expired or reset)",
                           result.request_id)
            return
        if entry.status.is_final:
            logger.warning("dropping a result for request %r after its final result", result.request_id)
            return
        if entry.cancelled:
            if result.finished:  # the runner stopped: its end is reported as the cancellation
                self._finish(entry, _terminal(result.request_id, RequestStatus.CANCELLED, CANCELLED_MESSAGE))
            return  # tokens made after the cancel are not wanted any more
        if result.finished:
            self._finish(entry, result)
        else:
            self.outputs.setdefault(result.request_id, []).append(result)

    def _finish(self, entry: _Entry, final: Result) -> None:
        """Queue ``final`` and take the request out of ``waiting``/``running`` (not ``requests``)."""
        request_id = entry.request.request_id
        self.waiting.pop(request_id, None)
        self.running.pop(request_id, None)
        entry.status = _final_status(final)
        self.outputs.setdefault(request_id, []).append(final)

    def get_results(self) -> dict[str, list[Result]]:
        """Take everything delivered since the last call; a request is forgotten with its final result."""
        with self._cond:
            self._evict_expired()
            taken, self.outputs = self.outputs, {}
            for request_id in taken:
                entry = self.requests.get(request_id)
                if entry is not None and entry.status.is_final:
                    del self.requests[request_id]
        return taken

    def wait_for_results(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a result can be taken; True if one can."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.outputs), timeout)

    # -- lifecycle ---------------------------------------------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """Cancel a waiting or running request; False when unknown, finished or already cancelled.

        A waiting request leaves the queue at once with a "cancelled" final result. A running one is
        marked: the runner should poll ``is_cancelled`` and stop, and its final result is delivered as
        "cancelled". The id stays known until then, so it cannot be reused while the runner still works.
        """
        with self._cond:
            entry = self.requests.get(request_id)
            if entry is None or entry.status.is_final or entry.cancelled:
                return False
            if entry.status == RequestStatus.QUEUED:
                self._finish(entry, _terminal(request_id, RequestStatus.CANCELLED, CANCELLED_MESSAGE))
            else:
                entry.cancelled = True
            self._cond.notify_all()
            return True

    def is_cancelled(self, request_id: str) -> bool:
        """Whether a running request has been cancelled (the runner should stop and finish it)."""
        with self._cond:
            entry = self.requests.get(request_id)
            return entry is not None and entry.cancelled

    def evict_expired(self) -> list[str]:
        """Evict requests still waiting ``scheduler_ttl`` seconds after their put; return their ids.

        Each evicted request's origin gets an "expired" final result. Runs on every put, get_requests
        and get_results too; an owner may also call it on a timer.
        """
        with self._cond:
            expired = self._evict_expired()
            if expired:
                self._cond.notify_all()
            return expired

    def _evict_expired(self) -> list[str]:
        ttl = self.config.scheduler_ttl
        deadline = self.clock() - ttl  # put at or before this => expired
        expired: list[str] = []
        while self.waiting:
            entry = next(iter(self.waiting.values()))
            if entry.put_time > deadline:
                break  # put order is put-time order: everything behind is younger
            request_id = entry.request.request_id
            message = f"the request waited more than {ttl} s in the queue (scheduler_ttl={ttl})"
            self._finish(entry, _terminal(request_id, RequestStatus.EXPIRED, message))
            expired.append(request_id)
        if expired:
            logger.info("evicted %d expired request(s): %s", len(expired), expired)
        return expired

    def reset(self) -> None:
        """Forget every request and result; results that arrive later for them are dropped."""
        with self._cond:
            self.requests.clear()
            self.waiting.clear()
            self.running.clear()
            self.outputs.clear()
            self._cond.notify_all()
        logger.info("local scheduler reset")

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "scheduler": "local",
                "waiting": len(self.waiting),
                "running": len(self.running),
                "max_size": self.config.scheduler_max_size,
                "ttl": self.config.scheduler_ttl,
            }

    def apply_config(self, config: SchedulerConfig) -> None:
        """Take new ``scheduler_max_size``/``scheduler_ttl`` at once.

        The TTL applies to requests already waiting, measured from their put. A smaller max_size
        refuses new puts until the queue is below it; requests already waiting stay. Switching to
        another scheduler cannot be done in place: the owner must build a new one.
        """
        if config.scheduler_name != "local":
            raise ConfigError(
                f"a running local scheduler cannot become '{config.scheduler_name}'; create a new one",
                field="scheduler_name",
            )
        with self._cond:
            self.config = config
            if self._evict_expired():
                self._cond.notify_all()


def _final_status(final: Result) -> RequestStatus:
    """The status a request ends with, from its final result."""
    if final.error is None:
        return RequestStatus.FINISHED
    code = final.error.get("code")
    if code in (RequestStatus.CANCELLED, RequestStatus.EXPIRED):
        return RequestStatus(code)
    return RequestStatus.FAILED


def _terminal(request_id: str, status: RequestStatus, message: str) -> Result:
    """A final result for a request that ends without (more) generation: expired or cancelled."""
    code = status.value
    return Result(request_id, finished=True, finish_reason=code, error={"code": code, "message": message})
