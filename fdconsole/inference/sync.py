"""Bring a request row up to date from the cluster's live state in Redis.

Any process may call this (the node that ran the request, the reaper, the API on read): the update is
conditional on the row's status rank, so a slow reader can never move a request backwards.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta

from django.utils import timezone

from fdconsole.inference.models import Request
from fdconsole.redis_conn import get_topic_store
from scheduler.messages import FINAL_STATUSES, STATUS_RANK
from scheduler.store import RETENTION_S, RequestStore

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
    if row.status == "queued":
        # Lazy eviction: a reader sees an overdue request expire even when no reaper runs.
        store.expire_due(row.topic.name)
    state = store.state(row.topic.name, row.uid)
    if not state:
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


def _changes_from_state(row: Request, state: dict[str, str], store: RequestStore) -> dict:
    status = state.get("status", row.status)
    changes = {
        "status": status,
        "executed_by": state.get("executed_by", ""),
        "home_node": state.get("home_node", row.home_node),
        "prefill_node": state.get("prefill_node", ""),
        "decode_node": state.get("decode_node", ""),
        "handoff_bytes": int(state["handoff_bytes"]) if state.get("handoff_bytes") else None,
        "handoff_ms": float(state["handoff_ms"]) if state.get("handoff_ms") else None,
        "started_at": _time(state.get("started_at")),
        "first_token_at": _time(state.get("first_token_at")),
        "finished_at": _time(state.get("finished_at")),
        "finish_reason": state.get("finish_reason", ""),
        "error_code": state.get("error_code", ""),
        "error_message": state.get("error_message", ""),
    }
    if status in FINAL_STATUSES and "output_token_ids" in state:
        changes["output_token_ids"] = json.loads(state["output_token_ids"])
    elif status in ("running",) + FINAL_STATUSES:
        tokens = [e for e in store.read_output(row.topic.name, row.uid) if e.kind == "token"]
        changes["output_token_ids"] = [e.token_id for e in tokens]
    return changes


def _conditional_update(row: Request, changes: dict) -> None:
    new_rank = STATUS_RANK.get(changes["status"], 0)
    allowed = [s for s, rank in STATUS_RANK.items() if rank < new_rank or (rank == new_rank and rank < 2)]
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
    if row.status == "running":
        deadline = row.created_at + timedelta(seconds=ttl + RETENTION_S)
    if timezone.now() < deadline:
        return row
    log.warning("request %s lost its live state in Redis; marking it failed", row.request_id)
    _conditional_update(row, {
        "status": "failed", "finished_at": timezone.now(), "error_code": "lost",
        "error_message": "the request's live state was lost (was Redis restarted?)",
    })
    return row


def _time(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), tz=UTC) if raw else None
