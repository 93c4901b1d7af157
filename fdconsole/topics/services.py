"""Changing a topic: the one way, for the API (create, PATCH), the config page, the admin, the
benchmarks and the commands. Also finding or creating topics and nodes by name, as fdnode and
fdcluster need.

The rule. A change is validated (``Topic.validated``; the model by ``checked_model``), allowed for the
user (each kind of change needs its permission, and a topic's Redis must be on a host the operator
allows: ``fdconsole.topics.access``), allowed for the topic (neither moved to another
Redis nor given another model while it has work or running nodes: ``fdconsole.topics.moves``), saved,
and published to the topic's Redis, where running nodes take it up at their next scheduling step.
All of it happens in one database transaction: when the topic's Redis does not take the
configuration, nothing is saved (``TopicRedisUnavailable``), so the database and Redis never disagree
about a topic.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from redis.exceptions import RedisError

from fdconsole.errors import UnknownObject
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store, store_for_url, topic_redis_errors, topic_url
from fdconsole.topics.access import refuse_unlisted_redis_host, refuse_without_permission
from fdconsole.topics.models import Topic, checked_model
from fdconsole.topics.moves import refuse_busy_model_change, refuse_busy_move
from scheduler.config import NAME_RE, SchedulerConfig, validate_name
from scheduler.connection import describe
from scheduler.errors import ConfigError
from scheduler.store import RequestStore

log = logging.getLogger(__name__)


def create_topic(name: str, changes: dict[str, Any] | None = None, *, user=None,
                 from_text: bool = False) -> Topic:
    """A new topic ``name`` with ``changes`` (scheduler parameters and ``model``, by default
    ``FD_MODEL``) over the default configuration, saved and published. ``user`` is who asks (None: the
    system itself, trusted with every permission). Raises ``ConfigError`` (invalid), ``Forbidden``,
    ``TopicRedisUnavailable``; a duplicate name is the caller's to refuse first."""
    validate_name(name, "name")
    topic = Topic(name=name, scheduler_topic=name)
    with transaction.atomic():
        _apply(topic, {"scheduler_topic": name, **(changes or {})}, user, from_text, previous=None)
    return topic


def change_topic(topic: Topic, changes: dict[str, Any], *, user=None, from_text: bool = False) -> Topic:
    """``topic`` with ``changes`` (scheduler parameters and ``model``) applied, saved and published;
    returns the saved row. Raises ``ConfigError``, ``Forbidden``, ``TopicBusy`` (a busy topic moved to
    another Redis or given another model) or ``TopicRedisUnavailable`` (nothing saved)."""
    with transaction.atomic():
        row = Topic.objects.select_for_update().get(pk=topic.pk)
        _apply(row, changes, user, from_text, previous=row.config)
    return row


def check_change(topic: Topic, config: SchedulerConfig, user, model: str | None = None) -> None:
    """Raise what ``change_topic`` would for giving the saved ``topic`` the validated ``config`` (and
    the checked ``model``, when given) now (the admin asks while validating its form, so that a refusal
    shows beside the field)."""
    previous = topic.config
    refuse_unlisted_redis_host(config)
    if user is not None:
        refuse_without_permission(user, previous, config, model is not None and model != topic.model)
    refuse_busy_move(topic, previous, config)
    if model is not None:
        refuse_busy_model_change(topic, topic.model, model)


def _apply(row: Topic, changes: dict[str, Any], user, from_text: bool,
           previous: SchedulerConfig | None) -> None:
    model = row.model
    if isinstance(changes, dict) and "model" in changes:  # not a scheduler parameter: checked on its own
        model, changes = changes["model"], {k: v for k, v in changes.items() if k != "model"}
    config = row.validated(changes, from_text=from_text)
    # Setting the model a topic already serves is no change (a client may send back what GET gave).
    new_model = checked_model(model) if previous is None or model != row.model else None
    refuse_unlisted_redis_host(config)
    if user is not None:  # who may ask first: the busy check reads Redis and tells about the topic's work
        refuse_without_permission(user, previous, config, model_changed=previous is not None and
                                  new_model is not None)
    if previous is not None:
        refuse_busy_move(row, previous, config)
        if new_model is not None:
            refuse_busy_model_change(row, row.model, new_model)  # before set_config: its Redis
    row.set_config(config)
    if new_model is not None:
        row.model = new_model
    row.save()
    # Inside the caller's transaction: if Redis refuses, the database change rolls back.
    with topic_redis_errors(row):
        publish_topic(row, previous)


def publish_topic(topic: Topic, previous: SchedulerConfig | None = None) -> None:
    """Publish the topic's configuration to its Redis, where running nodes take it up. When the change
    moved the topic to another Redis (``previous`` lived elsewhere; allowed only while the topic is
    idle), the old Redis forgets it once the change is committed, so that no reaper walks it there
    (and a change rolled back leaves it where it was)."""
    store = get_topic_store(topic)
    store.publish_config(topic.name, topic.config)
    old_url = topic_url(previous) if previous is not None else None
    if old_url is not None and old_url != topic_url(topic):
        published = store.published_config_json(topic.name)
        transaction.on_commit(lambda: _forget_in_old_redis(topic.name, previous, old_url, published))


def _forget_in_old_redis(name: str, previous: SchedulerConfig, old_url: str, published: bytes | None) -> None:
    try:
        old = get_topic_store(previous)
        # Two URLs may name one server ('localhost' for '127.0.0.1', a rotated password both accept):
        # if the old one already holds what was just published, it is the same Redis, not a move.
        if old.published_config_json(name) == published:
            return
        old.forget_topic(name)
    except RedisError as exc:  # the move is done; the old Redis only keeps a stale copy of the config
        log.warning("topic %s moved, but its old Redis at %s did not forget it: %s", name, describe(old_url),
                    exc)


def ensure_topic(name: str) -> Topic:
    """The topic ``name``, created with the default configuration when missing; its config published."""
    validate_name(name, "topic")
    topic = Topic.objects.filter(name=name).first()
    if topic is None:
        try:
            return create_topic(name)
        except IntegrityError:  # another process (a node starting beside this one) created it first
            topic = Topic.objects.get(name=name)
    publish_topic(topic)
    return topic


def get_topic(name: str) -> Topic:
    """The topic ``name``; ``UnknownObject`` when there is none."""
    # A name that could never be valid is unknown without asking the database (PostgreSQL would
    # refuse a NUL in it with an error instead of "not found").
    topic = Topic.objects.filter(name=name).first() if NAME_RE.match(name) else None
    if topic is None:
        raise UnknownObject(f"no topic '{name}'", field="topic")
    return topic


def topic_store(name: str) -> RequestStore:
    """The store of topic ``name``'s Redis; for a topic the database does not know yet, that of the
    default configuration (where fdnode would create it)."""
    row = Topic.objects.filter(name=name).first()
    return get_topic_store(row if row is not None else SchedulerConfig(scheduler_topic=name))


def topic_stores() -> list[RequestStore]:
    """The console's store and one per distinct topic Redis (what the console's reaper walks)."""
    urls = {settings.FD_REDIS_URL} | {topic_url(topic) for topic in Topic.objects.all()}
    return [store_for_url(url) for url in sorted(urls)]


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
