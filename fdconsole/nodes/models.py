"""The Node model: one worker process of a topic, by name, with its role and admin state."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from scheduler.config import validate_name
from scheduler.errors import ConfigError


class Node(models.Model):
    class Role(models.TextChoices):
        MIXED = "mixed", "mixed (prefill and decode)"
        PREFILL = "prefill", "prefill"
        DECODE = "decode", "decode"

    class AdminState(models.TextChoices):
        ENABLED = "enabled", "enabled"
        DRAINING = "draining", "draining (finishes its queue, takes no new requests)"
        DISABLED = "disabled", "disabled"

    name = models.CharField(max_length=64, unique=True, help_text="Unique across the console.")
    topic = models.ForeignKey("topics.Topic", on_delete=models.PROTECT, related_name="nodes")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MIXED)
    device = models.CharField(max_length=32, default="auto", help_text="auto, cpu, cuda or cuda:N.")
    admin_state = models.CharField(max_length=16, choices=AdminState.choices, default=AdminState.ENABLED)
    max_num_seqs = models.PositiveIntegerField(default=8, help_text="Most requests in one batch.")
    max_num_batched_tokens = models.PositiveIntegerField(default=2048, help_text="Token budget of a batch.")
    host = models.CharField(max_length=255, blank=True, help_text="Where the worker last ran.")
    requests_run = models.PositiveBigIntegerField(default=0)
    requests_stolen = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_started_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["topic__name", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def enabled(self) -> bool:
        return self.admin_state == self.AdminState.ENABLED

    def clean(self) -> None:
        try:
            validate_name(self.name, "name")
        except ConfigError as exc:
            raise ValidationError({"name": exc.message}) from None
        if self.max_num_seqs < 1:
            raise ValidationError({"max_num_seqs": "must be at least 1"})
        if self.max_num_batched_tokens < 1:
            raise ValidationError({"max_num_batched_tokens": "must be at least 1"})
