"""Who may change a topic, and which Redis servers a topic may be pointed at.

Creating a topic needs ``topics.add_topic``; changing its model or scheduler parameters
``topics.change_topic``; changing where its Redis is (``scheduler_host/port/db/password``)
``topics.change_topic_redis``, since that decides which server the console and the topic's nodes
connect to and run scripts on. Refusals are ``Forbidden`` (403) naming the permission and the field.
Whoever asks, a topic's Redis host must be one the operator allows: ``FD_TOPIC_REDIS_HOSTS``, by
default the host of ``FD_REDIS_URL`` only.
"""

from __future__ import annotations

from django.conf import settings

from fdconsole.errors import Forbidden
from scheduler.config import SchedulerConfig
from scheduler.connection import CONNECTION_FIELDS, RedisEndpoint, topic_redis_url
from scheduler.errors import ConfigError

ADD = "topics.add_topic"
CHANGE = "topics.change_topic"
CHANGE_REDIS = "topics.change_topic_redis"
NAMES = {ADD: "Can add topic", CHANGE: "Can change topic",
         CHANGE_REDIS: "Can change where a topic's Redis is (scheduler_host/port/db/password)"}


def changed_fields(old: SchedulerConfig, new: SchedulerConfig) -> list[str]:
    return [name for name in new.as_dict() if getattr(old, name) != getattr(new, name)]


def needed_permissions(previous: SchedulerConfig | None, config: SchedulerConfig,
                       model_changed: bool) -> dict[str, str]:
    """{permission: the field that needs it} for turning ``previous`` (None: a new topic) into
    ``config`` (and a new model when ``model_changed``)."""
    base = previous or SchedulerConfig(scheduler_topic=config.scheduler_topic)
    changed = changed_fields(base, config)
    needed: dict[str, str] = {}
    if previous is None:
        needed[ADD] = "name"
    redis_fields = [name for name in changed if name in CONNECTION_FIELDS]
    if redis_fields:
        needed[CHANGE_REDIS] = redis_fields[0]
    other = [name for name in changed if name not in CONNECTION_FIELDS and name != "scheduler_topic"]
    if previous is not None and (other or model_changed):
        needed[CHANGE] = "model" if model_changed and not other else other[0]
    return needed


def refuse_without_permission(user, previous: SchedulerConfig | None, config: SchedulerConfig,
                              model_changed: bool = False) -> None:
    """``Forbidden`` naming the first permission ``user`` lacks for the change (and the field)."""
    for permission, field in needed_permissions(previous, config, model_changed).items():
        if not (user.is_active and user.has_perm(permission)):
            what = {ADD: "creating a topic", CHANGE: f"changing {field}",
                    CHANGE_REDIS: f"changing {field} (where the topic's Redis is)"}[permission]
            raise Forbidden(f"{what} needs the permission {permission} (\"{NAMES[permission]}\")",
                            field=field)


def allowed_redis_hosts() -> list[str]:
    return settings.FD_TOPIC_REDIS_HOSTS or [RedisEndpoint.parse(settings.FD_REDIS_URL).host]


def refuse_unlisted_redis_host(config: SchedulerConfig) -> None:
    """``ConfigError`` on ``scheduler_host`` when ``config`` puts the topic's Redis on a host
    ``FD_TOPIC_REDIS_HOSTS`` does not list (a topic in ``FD_REDIS_URL`` itself is always allowed)."""
    url = topic_redis_url(config, settings.FD_REDIS_URL)
    if url == settings.FD_REDIS_URL:
        return
    host, allowed = RedisEndpoint.parse(url).host, allowed_redis_hosts()
    if host not in allowed:
        raise ConfigError(f"scheduler_host {host!r} is not a Redis host topics may use here: "
                          f"FD_TOPIC_REDIS_HOSTS allows {', '.join(allowed)}", field="scheduler_host")
