"""Finding or creating topics and nodes by name, as fdnode and fdcluster need."""

from __future__ import annotations

from django.db import transaction

from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_store
from fdconsole.topics.models import Topic
from scheduler.config import validate_name
from scheduler.errors import ConfigError


def ensure_topic(name: str) -> Topic:
    """The topic ``name``, created with the default configuration when missing; its config published."""
    validate_name(name, "topic")
    topic, _ = Topic.objects.get_or_create(name=name, defaults={"scheduler_topic": name})
    get_store().publish_config(topic.name, topic.config)
    return topic


def ensure_node(name: str, topic: Topic, role: str | None = None, device: str | None = None) -> Node:
    """The node record ``name`` (created when missing); explicit role/device update it."""
    validate_name(name, "name")
    if role is not None and role not in Node.Role.values:
        raise ConfigError(f"role must be one of {', '.join(Node.Role.values)}", field="role")
    with transaction.atomic():
        node, created = Node.objects.select_for_update().get_or_create(
            name=name, defaults={"topic": topic, "role": role or Node.Role.MIXED, "device": device or "auto"},
        )
        if node.topic_id != topic.pk:
            raise ConfigError(f"node '{name}' belongs to topic '{node.topic.name}', not '{topic.name}'",
                              field="topic")
        asked = {"role": role, "device": device}
        changed = {k: v for k, v in asked.items() if v is not None and getattr(node, k) != v}
        if changed and not created:
            for key, value in changed.items():
                setattr(node, key, value)
            node.save(update_fields=[*changed, "updated_at"])
    return node
