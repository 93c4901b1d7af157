"""Bring a request row up to date from the cluster's live state in Redis.

Any process may call this (the node that ran the request, the reaper, the API on read): the update is
conditional on the row's status rank, so a slow reader can never move a request backwards.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from django.utils import timezone

from fdconsole.inference.models import Request
from fdconsole.redis_conn import get_topic_store
from scheduler.keys import RETENTION_S
from scheduler.state import RequestState
from scheduler.status import RequestStatus
from scheduler.store import RequestStore

log = logging.getLogger(__name__)
LOST_GRACE_S = 60
CANCEL_WAIT_S = 2.0


def cancel_request(row: Request) -> Request:
    """Cancel (the API's DELETE and the page's button): a waiting request ends at once, a running one
    stops at its next token, so this waits up to ``CANCEL_WAIT_S`` for the final status."""
    if row.is_final:
        return row
    store = get_topic_store(row.topic)
    store.cancel(row.topic.name, row.uid)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while not sync_request(row, store).is_final and time.monotonic() < deadline:
        time.sleep(0.05)
    return row


def sync_request(row: Request, store: RequestStore | None = None) -> Request:
    """Refresh ``row`` from its topic's Redis (or ``store``; no-op when it is already final); returns the
    refreshed row."""
    if row.is_final:
        return row
    store = store or get_topic_store(row.topic)
    if row.status == RequestStatus.QUEUED:
        # Lazy eviction: a reader sees an overdue request expire even when no reaper runs.
        store.expire_due(row.topic.name)
    state = store.state(row.topic.name, row.uid)
    if state is None:
        return _mark_lost_if_overdue(row)
    changes = _changes_from_state(row, state, store)
    _conditional_update(row, changes)
    return row


def sync_uids(topic: str, uids: list[str], store: RequestStore | None = None) -> int:
    """Refresh the rows of ``uids`` (e.g. the ones the reaper just expired); returns how many."""
    rows = Request.objects.select_related("topic").filter(topic__name=topic, uid__in=uids)
    for row in rows:
        sync_request(row, store)
    return len(rows)


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
    """Write ``changes`` unless the row has moved past their status meanwhile (never backwards)."""
    new = RequestStatus(changes["status"])
    allowed = [status for status in RequestStatus if status.may_become(new)]
    updated = Request.objects.filter(pk=row.pk, status__in=allowed).update(**changes)
    if updated:
        for name, value in changes.items():
            setattr(row, name, value)
    else:
        row.refresh_from_db()


def _mark_lost_if_overdue(row: Request) -> Request:
    """Redis no longer knows a request the database thinks is in flight (Redis restarted without
    persistence, or the submit died half-way). Once its TTL and the retention are past, say so."""
    ttl = row.topic.config.scheduler_ttl
    deadline = row.created_at + timedelta(seconds=ttl + LOST_GRACE_S)
    if row.status == RequestStatus.RUNNING:
        deadline = row.created_at + timedelta(seconds=ttl + RETENTION_S)
    if timezone.now() < deadline:
        return row
    log.warning("request %s lost its live state in Redis; marking it failed", row.request_id)
    _conditional_update(row, {
        "status": RequestStatus.FAILED, "finished_at": timezone.now(), "error_code": "lost",
        "error_message": "the request's live state was lost (was Redis restarted?)",
    })
    return row


def _time(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, tz=UTC) if seconds is not None else None
