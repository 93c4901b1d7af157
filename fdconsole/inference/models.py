"""The persisted request object of the HTTP contract.

While a request is in flight Redis holds its live state (``scheduler.store``); this row is brought up
to date from there by ``fdconsole.inference.sync`` and keeps everything after Redis lets it go.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from scheduler.store import FINAL_STATUSES


class Request(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        FINISHED = "finished"
        FAILED = "failed"
        EXPIRED = "expired"
        CANCELLED = "cancelled"

    uid = models.CharField(max_length=32, unique=True, editable=False, help_text="Internal id (Redis, rq).")
    request_id = models.CharField(max_length=128, unique=True)
    topic = models.ForeignKey("topics.Topic", on_delete=models.CASCADE, related_name="requests")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    home_node = models.CharField(max_length=64, blank=True, db_index=True)
    executed_by = models.CharField(max_length=64, blank=True)
    prefill_node = models.CharField(max_length=64, blank=True)
    decode_node = models.CharField(max_length=64, blank=True)
    prompt_token_ids = models.JSONField(default=list)
    sampling = models.JSONField(default=dict)
    prompt_tokens = models.PositiveIntegerField(default=0)
    output_token_ids = models.JSONField(default=list, blank=True)
    output_text = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["topic", "status"])]

    def __str__(self) -> str:
        return self.request_id

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def stolen(self) -> bool:
        return bool(self.executed_by) and self.executed_by != self.home_node

    def as_api(self) -> dict[str, Any]:
        """The request object exactly as the HTTP contract gives it."""
        error = {"code": self.error_code, "message": self.error_message} if self.error_code else None
        return {
            "request_id": self.request_id,
            "topic": self.topic.name,
            "status": self.status,
            "home_node": self.home_node or None,
            "executed_by": self.executed_by or None,
            "stolen": self.stolen,
            "prefill_node": self.prefill_node or None,
            "decode_node": self.decode_node or None,
            "prompt_tokens": self.prompt_tokens,
            "output_token_ids": list(self.output_token_ids),
            "output_text": self.output_text,
            "finish_reason": self.finish_reason if self.finish_reason in ("length", "stop") else None,
            "error": error,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "first_token_at": _iso(self.first_token_at),
            "finished_at": _iso(self.finished_at),
        }


def _iso(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
