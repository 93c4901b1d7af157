"""The Node model: one worker process of a topic, by name, with its role, admin state and capacity.

The capacity fields mirror ``gpu_worker.capacity.EngineCapacity`` (same names, same defaults; a test
keeps them equal) and are validated by its ``check``. That module imports torch, which the console
otherwise never loads, so it is imported inside the methods that need it, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError
from django.db import models

from scheduler.config import validate_name
from scheduler.errors import ConfigError

if TYPE_CHECKING:
    from gpu_worker.capacity import EngineCapacity

# The node's engine capacity, in EngineCapacity's field order: the admin's "Capacity" fieldset and the
# API's ``capacity`` object.
CAPACITY_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "kv_cache_memory_mb",
                   "block_size", "reserved_output_blocks", "enable_prefix_caching")


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
    max_num_seqs = models.PositiveIntegerField(
        default=32, help_text="Most sequences (requests) the engine runs together in one batch; at least 1.")
    max_num_batched_tokens = models.PositiveIntegerField(
        default=2048, help_text="Most tokens one engine step computes (decodes plus prefill chunks), in "
                                "tokens; at least 1.")
    num_kv_blocks = models.PositiveIntegerField(
        default=0, help_text="Size of the KV cache, in blocks of block_size tokens; 0 = as many as "
                             "kv_cache_memory_mb holds. When set, more than reserved_output_blocks.")
    kv_cache_memory_mb = models.PositiveIntegerField(
        default=0, help_text="Memory budget of the KV cache, in MiB, used when num_kv_blocks is 0; "
                             "0 = 256 MiB on a CPU, half the free memory (after the model) on CUDA.")
    block_size = models.PositiveIntegerField(
        default=16, help_text="Token slots per KV cache block, in tokens; 1 to 1024.")
    reserved_output_blocks = models.PositiveIntegerField(
        default=1, help_text="KV blocks a request must leave free for its output before it is admitted, "
                             "in blocks; 0 or more.")
    enable_prefix_caching = models.BooleanField(
        default=True, help_text="Share the KV blocks of equal prompt prefixes between requests.")
    host = models.CharField(max_length=255, blank=True, help_text="Where the worker last ran.")
    requests_run = models.PositiveBigIntegerField(default=0)
    requests_stolen = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_started_at = models.DateTimeField(null=True, blank=True)
    # What ``fdcluster`` saw of the node's process: how it last ended, and how often it started it again.
    last_exit_status = models.CharField(
        max_length=64, blank=True, help_text="How its process last ended: exit code 1, killed by SIGKILL…")
    last_exit_at = models.DateTimeField(null=True, blank=True, help_text="When its process last ended.")
    restarts = models.PositiveIntegerField(
        default=0, help_text="Times fdcluster started its process again after it died.")

    class Meta:
        ordering = ["topic__name", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def enabled(self) -> bool:
        return self.admin_state == self.AdminState.ENABLED

    def clean(self) -> None:
        """The name, and the capacity through ``EngineCapacity.check``; each error on its field."""
        from gpu_worker.capacity import CapacityError

        errors: dict[str, str] = {}
        try:
            validate_name(self.name, "name")
        except ConfigError as exc:
            errors["name"] = exc.message
        try:
            self.capacity().check()
        except CapacityError as exc:
            errors[exc.field] = exc.message
        if errors:
            raise ValidationError(errors)

    def capacity(self) -> EngineCapacity:
        """The engine capacity this record describes (unchecked: call ``check`` on it)."""
        from gpu_worker.capacity import EngineCapacity

        return EngineCapacity(**{name: getattr(self, name) for name in CAPACITY_FIELDS})
