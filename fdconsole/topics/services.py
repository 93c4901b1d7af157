"""Finding or creating topics and nodes by name, as fdnode and fdcluster need, and publishing a
topic's configuration to its Redis."""

from __future__ import annotations

import logging

from django.db import transaction
from redis.exceptions import RedisError

from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store, topic_url
from fdconsole.topics.models import Topic
from scheduler.config import SchedulerConfig, validate_name
from scheduler.connection import describe
from scheduler.errors import ConfigError

log = logging.getLogger(__name__)


def ensure_topic(name: str) -> Topic:
    """The topic ``name``, created with the default configuration when missing; its config published."""
    validate_name(name, "topic")
    topic, _ = Topic.objects.get_or_create(name=name, defaults={"scheduler_topic": name})
    publish_topic(topic)
    return topic


def publish_topic(topic: Topic, previous: SchedulerConfig | None = None) -> None:
    """Publish the topic's configuration to its Redis, where running nodes take it up. When the save
    moved the topic to another Redis (``previous`` lived elsewhere; ``Topic.apply_config`` allows that
    only while the topic is idle), the old Redis forgets it, so that no reaper walks it there."""
    store = get_topic_store(topic)
    store.publish_config(topic.name, topic.config)
    old_url = topic_url(previous) if previous is not None else None
    if old_url is None or old_url == topic_url(topic):
        return
    try:
        old = get_topic_store(previous)
        # Two URLs may name one server ('localhost' for '127.0.0.1', a rotated password both accept):
        # if the old one already holds what was just published, it is the same Redis, not a move.
        if old.published_config_json(topic.name) == store.published_config_json(topic.name):
            return
        old.forget_topic(topic.name)
    except RedisError as exc:  # the move is done; the old Redis only keeps a stale copy of the config
        log.warning("topic %s moved, but its old Redis at %s did not forget it: %s",
                    topic.name, describe(old_url), exc)


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
