"""Submitting a request: validate, record, place on a node, queue. Shared by the API and the web UI.

Order matters for "never a half-written record": the row is inserted first (its unique request_id is
the duplicate check), then Redis queues the request atomically; when Redis refuses (queue full, no
Redis) the row is deleted again before the error reaches the client.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from fdconsole.errors import ModelUnavailable, UnknownObject
from fdconsole.inference.models import Request, model_tokenizer
from fdconsole.inference.sync import sync_uids
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store
from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.model_source import inspect
from scheduler.errors import DuplicateRequest, InvalidRequest, NoNodeAvailable, QueueFull
from scheduler.messages import SubmissionBody, parse_submission
from scheduler.store import new_uid
from scheduler.validation import validated

if TYPE_CHECKING:
    from fdconsole.topics.models import Topic

log = logging.getLogger(__name__)


def get_request_row(request_id: str) -> Request:
    """The request ``request_id``; ``UnknownObject`` when there is none."""
    row = None
    if request_id.isprintable():
        row = Request.objects.select_related("topic").filter(request_id=request_id).first()
    if row is None:
        raise UnknownObject(f"no request '{request_id}'", field="request_id")
    return row


def submit_request(topic: Topic, body: Any, user=None) -> Request:
    """Validate ``body`` (a ``SubmissionBody``, or a decoded JSON body validated as one here) and queue
    it on ``topic``; returns the recorded row.

    Raises InvalidRequest (400), UnknownObject (404), DuplicateRequest (409), QueueFull (429),
    NoNodeAvailable (503), ModelUnavailable (503: the topic's model cannot be served here any more) or
    a redis error (503).
    """
    if not isinstance(body, SubmissionBody):
        body = validated(SubmissionBody, body, InvalidRequest)
    context = max_model_len(topic)  # first: it says best what is wrong with a model that is gone
    tokenizer = topic_tokenizer(topic)
    chat = body.messages is not None
    if chat:
        ids = chat_prompt_ids(topic, [turn.model_dump() for turn in body.messages], "messages")
        body = body.model_copy(update={"messages": None, "prompt_token_ids": ids})
    try:
        request, request_id, node_name = parse_submission(
            body, max_model_len=context, encode=tokenizer.encode,
            # a prompt of the byte model holds bytes only, never its end-of-text id
            vocab_size=getattr(tokenizer, "prompt_vocab_size", tokenizer.vocab_size),
        )
    except InvalidRequest as exc:
        if chat and exc.field == "prompt_token_ids":  # the prompt the chat rendered into
            raise InvalidRequest(exc.message.replace("prompt_token_ids", "messages (as the chat template "
                                                     "renders them)"), field="messages") from None
        raise
    config = topic.config
    request.request_id = request_id or f"req-{uuid.uuid4().hex}"
    request.topic = topic.name
    store = get_topic_store(topic)
    if not store.has_config(topic.name):  # Redis restarted without persistence: the database knows
        store.publish_config(topic.name, config)
    candidates = _candidate_nodes(topic, node_name, store)
    row = _insert_row(topic, request, candidates[0], user)
    try:
        home, expired = _queue_on_first_with_room(store, topic, config, row, request, candidates)
    except BaseException:
        row.delete()
        raise
    if home != row.home_node:
        Request.objects.filter(pk=row.pk).update(home_node=home)
        row.home_node = home
    if expired:
        sync_uids(topic.name, expired, store)
    return row


def chat_prompt_ids(topic: Topic, messages: Any, field: str) -> list[int]:
    """The token ids of ``messages`` ([{"role", "content"}, ...]) rendered through the topic's model's
    chat template with the assistant's turn opened; the template writes the special tokens (BOS
    included) itself, so none are added. ``InvalidRequest`` on ``field`` for a malformed chat or a
    model without a template."""
    tokenizer = topic_tokenizer(topic)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}", field=field) from None
    return tokenizer.encode(text, add_special_tokens=False)


def topic_tokenizer(topic: Topic):
    """The tokenizer of ``topic``'s model; ``ModelUnavailable`` naming the model when it is gone."""
    return model_tokenizer(topic.model, f"topic '{topic.name}'")


def max_model_len(topic: Topic) -> int:
    """The longest request (prompt plus generated tokens) ``topic`` takes: its model's context, capped by
    ``FD_MAX_MODEL_LEN``. ``ModelUnavailable`` when the model cannot be inspected any more."""
    try:
        context = inspect(topic.model).max_model_len
    except (CheckpointError, OSError) as exc:
        raise ModelUnavailable(f"topic '{topic.name}' cannot take requests: its model {topic.model} "
                               f"cannot be served: {exc}") from None
    return min(settings.FD_MAX_MODEL_LEN, context)


def _queue_on_first_with_room(store, topic: Topic, config, row: Request, request, candidates: list[str]):
    """Queue on the first candidate whose queue has room; QueueFull only when none has."""
    for home in candidates:
        try:
            return home, store.submit(topic.name, row.uid, request, home, config)
        except QueueFull:
            continue
    where = f"node '{candidates[0]}'" if len(candidates) == 1 else f"every enabled node of '{topic.name}'"
    _count_rejection(store, topic, "queue_full")
    raise QueueFull(f"queue full: {where} already holds scheduler_max_size="
                    f"{config.scheduler_max_size} waiting requests")


def _candidate_nodes(topic: Topic, node_name: str | None, store) -> list[str]:
    """The named node alone, else the enabled nodes in round-robin order from the next one (in global
    mode only that next one matters: its queue is never full, and idle nodes steal from it)."""
    if node_name is not None:
        node = Node.objects.filter(name=node_name, topic=topic).first()
        if node is None:
            raise UnknownObject(f"topic '{topic.name}' has no node '{node_name}'", field="node")
        if not node.enabled:
            raise InvalidRequest(f"node '{node_name}' is {node.admin_state} and takes no new requests",
                                 field="node")
        return [node.name]
    enabled = list(
        Node.objects.filter(topic=topic, admin_state=Node.AdminState.ENABLED)
        .order_by("name").values_list("name", flat=True)
    )
    try:
        first = enabled.index(store.next_home(topic.name, enabled))
    except NoNodeAvailable:
        _count_rejection(store, topic, "no_node")
        raise
    return enabled[first:] + enabled[:first]


def _count_rejection(store, topic: Topic, reason: str) -> None:
    """Counts a refused submission in the topic's Redis (``/metrics``); the refusal itself is what the
    client must get, so a Redis error here is only logged."""
    try:
        store.count_rejection(topic.name, reason)
    except RedisError as exc:
        log.warning("could not count a rejection (%s) of topic %s: %s", reason, topic.name, exc)


def _insert_row(topic: Topic, request, home: str, user) -> Request:
    if Request.objects.filter(request_id=request.request_id).exists():
        raise DuplicateRequest(f"request_id '{request.request_id}' is already taken", field="request_id")
    try:
        with transaction.atomic():
            return Request.objects.create(
                uid=new_uid(), request_id=request.request_id, topic=topic, model=topic.model,
                home_node=home, prompt_token_ids=request.prompt_token_ids, prompt_tokens=request.prompt_len,
                sampling=request.to_dict()["sampling"], created_at=timezone.now(),
                submitted_by=user if user is not None and user.is_authenticated else None,
            )
    except IntegrityError:
        raise DuplicateRequest(
            f"request_id '{request.request_id}' is already taken", field="request_id"
        ) from None
