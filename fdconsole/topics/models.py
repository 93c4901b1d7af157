"""The Topic model: a name, the model it serves, and one column per scheduler parameter of the user's
table.

The scheduler columns are generated from ``scheduler.config.PARAMETERS`` so that names, types and
defaults cannot drift from the table; validation is ``scheduler.config.parse_config`` and nothing else.
The model column is checked by ``gpu_worker.model_source.inspect`` (``checked_model``). The model
validates only; changing a topic (saved, published to its Redis, checked against its users and its
work) is ``fdconsole.topics.services``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.model_source import MAX_NAME_LEN, inspect
from scheduler.config import PARAMETERS, Parameter, SchedulerConfig, parse_config, validate_name
from scheduler.errors import ConfigError, FdError

MODEL_HELP = ("tiny, smollm2, or an absolute path to a Hugging Face checkpoint directory or a .gguf file "
              "on the nodes' hosts. Every node of the topic serves it; it cannot change while the topic has "
              "unfinished requests or running nodes.")


def default_model() -> str:
    """The model of a topic created without one (``FD_MODEL``)."""
    return settings.FD_MODEL


def checked_model(value: Any) -> str:
    """``value`` as a topic's model, checked without loading weights (``model_source.inspect``: the path
    exists, the architecture is served, the files are whole); ``ConfigError`` on field ``model``."""
    try:
        return inspect(value).source.name
    except (CheckpointError, OSError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith("model") else f"model: {message}",
                          field="model") from None


class Topic(models.Model):
    name = models.CharField(max_length=64, unique=True, help_text="Letters, digits, '-', '_' and '.'.")
    model = models.CharField(max_length=MAX_NAME_LEN, default=default_model, help_text=MODEL_HELP)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        # Creating a topic needs add_topic, changing its model or scheduler parameters change_topic, and
        # pointing it at another Redis this one as well (``fdconsole.topics.access``).
        permissions = [("change_topic_redis", "Can change where a topic's Redis is "
                        "(scheduler_host/port/db/password)")]

    def __str__(self) -> str:
        return self.name

    @property
    def config(self) -> SchedulerConfig:
        # Through the parser: the database gives 5.0 for a float column holding 5; the API shows 5.
        return parse_config({p.name: getattr(self, p.name) for p in PARAMETERS})

    def validated(self, changes: dict[str, Any], *, from_text: bool = False) -> SchedulerConfig:
        """``changes`` over the current configuration, validated (``ConfigError`` naming the field at
        fault). Validation only: see ``fdconsole.topics.services`` to change a topic."""
        config = parse_config(changes, base=self.config, from_text=from_text)
        if config.scheduler_topic != self.name:
            raise ConfigError(f"scheduler_topic must be the topic's own name '{self.name}'",
                              field="scheduler_topic")
        return config

    def set_config(self, config: SchedulerConfig) -> None:
        """Put a validated configuration in this row's columns (not saved)."""
        for name, value in config.as_dict().items():
            setattr(self, name, value)

    def clean(self) -> None:
        """The admin form's validation: the same rules as ``validated``, over the row as edited."""
        try:
            validate_name(self.name, "name")
            if not self.scheduler_topic or self.scheduler_topic == "default":
                self.scheduler_topic = self.name
            parse_config(self.config.as_dict())
            if self.scheduler_topic != self.name:
                raise ConfigError("scheduler_topic must be the topic's own name", field="scheduler_topic")
        except FdError as exc:
            raise ValidationError({exc.field or "__all__": exc.message}) from None


def _column(param: Parameter) -> models.Field:
    options: dict[str, Any] = {"default": param.default, "help_text": param.help}
    if param.kind is str:
        return models.CharField(max_length=512 if "password" in param.name else 255, blank=True, **options)
    if param.kind is int:
        return models.BigIntegerField(**options)
    return models.FloatField(**options)


for _param in PARAMETERS:
    Topic.add_to_class(_param.name, _column(_param))
