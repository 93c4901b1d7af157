"""Bring a request row up to date from the cluster's live state in Redis.

Any process may call this (the node that ran the request, the reaper, the API on read): the update is
conditional on the row's status rank, so a slow reader can never move a request backwards.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from django.db import DatabaseError, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from fdconsole.errors import ModelUnavailable
from fdconsole.inference.models import Request
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store
from gpu_worker.tokenizer import text_stream
from scheduler.keys import RETENTION_S
from scheduler.messages import Request as WireRequest
from scheduler.state import RequestState
from scheduler.status import CancelReply, RequestStatus
from scheduler.store import RequestStore

log = logging.getLogger(__name__)
# A row is committed only once Redis has its request (submit_request), so a row Redis does not know was
# lost there; this much younger, it is left for the next pass all the same (clocks, a commit under way).
RESUBMIT_GRACE_S = 3
CANCEL_WAIT_S = 2.0
KEPT_TIMES = ("started_at", "first_token_at")
STATE_FIELDS = [f.attname for f in Request._meta.concrete_fields if not f.is_relation]


def cancel_request(row: Request) -> Request:
    """Cancel (the API's DELETE and the page's button): a waiting request ends at once, a running one
    stops at its next token, so this waits up to ``CANCEL_WAIT_S`` for the final status."""
    if row.is_final:
        return row
    store = get_topic_store(row.topic)
    if store.cancel(row.topic.name, row.uid) == CancelReply.MISSING:
        _cancel_lost(row)  # Redis lost it: cancelled here, never queued again from its row
        return row
    deadline = time.monotonic() + CANCEL_WAIT_S
    while not sync_request(row, store).is_final and time.monotonic() < deadline:
        time.sleep(0.05)
    return row


def _cancel_lost(row: Request) -> None:
    """Ends as cancelled an unfinished request Redis does not know (it restarted without its data)."""
    _conditional_update(row, {
        "status": RequestStatus.CANCELLED, "finished_at": timezone.now(), "finish_reason": "cancelled",
        "error_code": "cancelled", "error_message": "cancelled by the client",
    })


def sync_request(row: Request, store: RequestStore | None = None) -> Request:
    """Refresh ``row`` from its topic's Redis (or ``store``; no-op when it is already final); returns the
    refreshed row. A request Redis no longer knows is queued again from the row (``recover_lost``)."""
    if row.is_final:
        return row
    store = store or get_topic_store(row.topic)
    if _refresh(row, store):
        _once_committed(lambda: store.recorded(row.topic.name, [row.uid]))
    return row


def sync_uids(topic: str, uids: list[str], store: RequestStore | None = None) -> int:
    """Refresh the rows of ``uids`` (e.g. the ones the reaper just expired); returns how many."""
    rows = list(Request.objects.select_related("topic").filter(topic__name=topic, uid__in=uids))
    return len(sync_rows(rows, store))


def sync_rows(rows: list[Request], store: RequestStore | None = None) -> list[Request]:
    """Refresh ``rows`` (all of one topic) from their topic's Redis; returns those that are final now.
    Redis keeps a final state until the database has it: told so here, in one round trip."""
    if not rows:
        return []
    store = store or get_topic_store(rows[0].topic)
    final = []
    for row in rows:
        try:
            if not row.is_final and _refresh(row, store):
                final.append(row)
        except (RedisError, DatabaseError):
            raise  # its Redis or the database: the caller's to handle, for the whole topic
        except Exception:  # one row that cannot be brought up to date must not hold up the others
            log.exception("could not bring request %s up to date from Redis", row.request_id)
    _once_committed(lambda: store.recorded(rows[0].topic.name, [row.uid for row in final]))
    return final


def _once_committed(tell_redis) -> None:
    """Tells Redis the database has the rows once it really has them: after the commit of the
    transaction under way (at once when there is none). Redis not answering then is no error: it keeps
    them a day, and the next pass tells it again."""

    def tell() -> None:
        try:
            tell_redis()
        except RedisError as exc:
            log.warning("could not tell Redis the database has recorded requests: %s", exc)

    transaction.on_commit(tell)


def _refresh(row: Request, store: RequestStore) -> bool:
    """Bring ``row`` (unfinished) up to date; whether it is final now."""
    if row.status == RequestStatus.QUEUED:
        # Lazy eviction: a reader sees an overdue request expire even when no reaper runs.
        store.expire_due(row.topic.name)
    state = store.state(row.topic.name, row.uid)
    if state is None:
        recover_lost(row, store)
    else:
        _conditional_update(row, _changes_from_state(row, state, store))
    return row.is_final


def recover_lost(row: Request, store: RequestStore) -> None:
    """Redis does not know ``row``, which the database has in flight: Redis restarted without its data
    (or lost its last second of writes), or the submission is still on its way (``RESUBMIT_GRACE_S``).
    While its TTL runs it is queued again from the row, resuming after the tokens the row holds, as
    after a node failure (a waiting one keeps its place in time, a running one waits afresh); past its
    TTL it expired. A running row older than its TTL plus the retention is a record from another
    Redis's time, not a request to run now: it expired too."""
    age = (timezone.now() - row.created_at).total_seconds()
    if age < RESUBMIT_GRACE_S:
        return
    config = row.topic.config
    horizon = config.scheduler_ttl + (RETENTION_S if row.status == RequestStatus.RUNNING else 0)
    if age >= horizon:
        _expire_lost(row, config.scheduler_ttl)
        return
    home = _home_for(row, store)
    if home is None:
        return  # no enabled node: tried again on the next pass, until the TTL ends it
    if not store.has_config(row.topic.name):
        store.publish_config(row.topic.name, config)
    waiting_since = row.created_at.timestamp() if row.status == RequestStatus.QUEUED else time.time()
    output = list(row.output_token_ids) if row.status == RequestStatus.RUNNING else []
    if store.resubmit(row.topic.name, row.uid, _request_of(row), home, config, waiting_since=waiting_since,
                      output_token_ids=output, texts=_texts(row, output), attempt=int(time.time())):
        log.warning("request %s of %s was not in Redis any more (restarted without its data?); queued "
                    "again on %s from its record, after %d token(s)", row.request_id, row.topic.name, home,
                    len(output))


def _home_for(row: Request, store: RequestStore) -> str | None:
    """Its home node while that is enabled, else the next enabled node of its topic; None when none is."""
    enabled = list(Node.objects.filter(topic=row.topic, admin_state=Node.AdminState.ENABLED)
                   .order_by("name").values_list("name", flat=True))
    if row.home_node in enabled:
        return row.home_node
    return store.next_home(row.topic.name, enabled) if enabled else None


def _request_of(row: Request) -> WireRequest:
    """The request as it was submitted, from its row."""
    return WireRequest.from_dict({
        "request_id": row.request_id, "prompt_token_ids": list(row.prompt_token_ids),
        "sampling": dict(row.sampling or {}), "topic": row.topic.name,
        "arrival_time": row.created_at.timestamp(),
    })


def _texts(row: Request, token_ids: list[int]) -> list[str]:
    """The text each of ``token_ids`` streamed as (what a resumed node's decoder goes on from)."""
    if not token_ids:
        return []
    try:
        stream = text_stream(row.tokenizer, (row.sampling or {}).get("stop") or ())
    except ModelUnavailable:
        return [""] * len(token_ids)  # its node will say the model is gone; the ids are what matters
    return [stream.push(token_id) for token_id in token_ids]


def _changes_from_state(row: Request, state: RequestState, store: RequestStore) -> dict:
    changes = {
        "status": state.status,
        "executed_by": state.executed_by,
        "home_node": state.home_node,
        "prefill_node": state.prefill_node,
        "decode_node": state.decode_node,
        "handoff_bytes": state.handoff_bytes,
        "handoff_ms": state.handoff_ms,
        "started_at": _time(state.started_at),
        "first_token_at": _time(state.first_token_at),
        "finished_at": _time(state.finished_at),
        "finish_reason": state.finish_reason,
        "error_code": state.error_code,
        "error_message": state.error_message,
    }
    if state.is_final and state.output_token_ids is not None:
        changes["output_token_ids"] = state.output_token_ids
    elif state.status >= RequestStatus.RUNNING:
        tokens = [e for e in store.read_output(row.topic.name, row.uid) if e.kind == "token"]
        changes["output_token_ids"] = [e.token_id for e in tokens]
    return changes


def _conditional_update(row: Request, changes: dict) -> None:
    """Write ``changes`` unless the row has moved past their status meanwhile (never backwards), and not
    when they change nothing. A time the row has is never taken away (a request queued again from its
    row starts a new hash, which has not seen its first claim or token)."""
    changes = {name: value for name, value in changes.items()
               if value is not None or name not in KEPT_TIMES or getattr(row, name) is None}
    if all(getattr(row, name) == value for name, value in changes.items()):
        return
    new = RequestStatus(changes["status"])
    allowed = [status for status in RequestStatus if status.may_become(new)]
    updated = Request.objects.filter(pk=row.pk, status__in=allowed).update(**changes)
    if updated:
        for name, value in changes.items():
            setattr(row, name, value)
    else:  # its own fields only: the cached topic stays (async readers must not query for it again)
        row.refresh_from_db(fields=STATE_FIELDS)


def _expire_lost(row: Request, ttl: int) -> None:
    log.warning("request %s lost its live state in Redis after its TTL; it expired", row.request_id)
    _conditional_update(row, {
        "status": RequestStatus.EXPIRED, "finished_at": timezone.now(), "error_code": "expired",
        "error_message": f"its live state was lost (Redis restarted without its data) and scheduler_ttl="
                         f"{ttl}s has passed since it was submitted",
    })


def _time(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, tz=UTC) if seconds is not None else None
