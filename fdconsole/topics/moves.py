"""Moving a topic to another Redis, or giving it another model: allowed only while nothing depends on
what it has now.

A topic's queues, leases, output streams and rq jobs live in its Redis, and its running nodes hold
connections to it. Pointing the topic elsewhere while a request is unfinished or a node runs would
strand that work in the old Redis, out of reach of the console and of every new node. So a change of
``scheduler_host/port/db/password`` that resolves to another Redis is refused until the topic's
requests have ended and its nodes are stopped.

The same holds for the model: a running node keeps the weights it loaded, and an unfinished request's
prompt holds token ids of the current model's vocabulary. Changing it then would run a request on a
model it was not tokenized for, or give one topic nodes that answer with different models.
"""

from __future__ import annotations

from contextlib import suppress

from redis.exceptions import RedisError

from fdconsole.errors import TopicBusy
from fdconsole.inference.models import Request
from fdconsole.inference.sync import sync_request
from fdconsole.redis_conn import get_topic_store, topic_url
from fdconsole.topics.models import Topic
from scheduler.config import SchedulerConfig
from scheduler.connection import CONNECTION_FIELDS
from scheduler.liveness import limits, node_state
from scheduler.status import RequestStatus

SYNC_LIMIT = 100  # unfinished rows brought up to date from Redis before counting them


def moved_field(old: SchedulerConfig, new: SchedulerConfig) -> str | None:
    """The first connection parameter that changed, when the change puts the topic in another Redis."""
    if topic_url(old) == topic_url(new):
        return None
    return next(name for name in CONNECTION_FIELDS if getattr(old, name) != getattr(new, name))


def refuse_busy_move(topic: Topic, old: SchedulerConfig, new: SchedulerConfig) -> None:
    """Raise ``TopicBusy`` naming the changed field when ``new`` moves a busy topic to another Redis."""
    field = moved_field(old, new)
    if field is None:
        return
    unfinished = _unfinished_requests(topic, old)
    if unfinished:
        raise TopicBusy(f"{field} cannot change while topic '{topic.name}' has {unfinished} unfinished "
                        "request(s) in its current Redis: let them finish (or cancel them) first",
                        field=field)
    running = _running_nodes(topic, old)
    if running:
        raise TopicBusy(f"{field} cannot change while node(s) {', '.join(running)} of topic '{topic.name}' "
                        "are running against its current Redis: stop the topic's nodes first", field=field)


def refuse_busy_model_change(topic: Topic, old_model: str, new_model: str) -> None:
    """Raise ``TopicBusy`` on field ``model`` when ``topic`` (as saved: its current Redis) has unfinished
    requests or running nodes and ``new_model`` is another model than ``old_model``."""
    if new_model == old_model:
        return
    current = topic.config
    unfinished = _unfinished_requests(topic, current)
    if unfinished:
        raise TopicBusy(f"model cannot change while topic '{topic.name}' has {unfinished} unfinished "
                        f"request(s), tokenized for {old_model}: let them finish (or cancel them) first",
                        field="model")
    running = _running_nodes(topic, current)
    if running:
        raise TopicBusy(f"model cannot change while node(s) {', '.join(running)} of topic '{topic.name}' "
                        f"are running (serving {old_model}): stop them first", field="model")


def _unfinished_requests(topic: Topic, old: SchedulerConfig) -> int:
    """Unfinished requests, after bringing the rows up to date from the current Redis (a row may lag
    behind a request that has ended, or expired waiting)."""
    rows = (Request.objects.select_related("topic").filter(topic=topic)
            .exclude(status__in=RequestStatus.finals()))
    store = get_topic_store(old)
    with suppress(RedisError):  # the current Redis is down: the rows are what we know; they count
        for row in rows[:SYNC_LIMIT]:
            sync_request(row, store)
    return rows.count()


def _running_nodes(topic: Topic, old: SchedulerConfig) -> list[str]:
    """The topic's nodes whose heartbeat in the current Redis says they run (not stopped nor dead)."""
    names = list(topic.nodes.order_by("name").values_list("name", flat=True))
    if not names:
        return []
    store = get_topic_store(old)
    try:
        beats = store.read_heartbeats(topic.name, names)
        topic_limits = limits(store.config_of(topic.name))
    except RedisError:
        return []  # no node can run against a Redis that does not answer
    return [name for name in names if node_state(beats[name], "enabled", None, *topic_limits) != "dead"]
