"""Submitting a request: validate, record, place on a node, queue. Shared by the API and the web UI.

Order matters for "never a half-written record": the row is inserted (its unique request_id is the
duplicate check) and Redis queues the request, atomically, inside one database transaction; when Redis
refuses (queue full, no Redis) the transaction rolls back before the error reaches the client. Until it
commits nobody sees the row: no retry is answered with a request that is then refused, and the
reconciler never queues again what is still on its way.

Design note (idempotency). A client whose reply was lost sends the same submission again; that must be
the request it already made, not a second one. A submission is named by its ``request_id`` (when the
client gives one) and its ``Idempotency-Key`` (unique per submitter, as Stripe's); what it asks for is
``submission_digest``, a hash of its validated content (topic, model, prompt token ids, sampling,
node), kept on the row. The same submitter sending the same digest under a name already taken is a
retry: it is answered with the request that name holds (``Submitted.replayed``), and adds no row,
queues nothing and takes none of the token's limits. A name taken by another user, or by other
content, is a 409. Two identical submissions racing meet at the row's unique constraints (the token's
row lock first, when it has an in-flight limit): the loser reads the winner's row and compares.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import RedisError
from tokenizers.models import BPE

from fdconsole.errors import ModelUnavailable, UnknownObject
from fdconsole.inference.limits import RateLimited, take_in_flight, take_rate
from fdconsole.inference.models import Request, model_tokenizer
from fdconsole.inference.sync import sync_uids
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_store, get_topic_telemetry
from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.model_source import inspect
from scheduler.errors import DuplicateRequest, FdError, InvalidRequest, NoNodeAvailable, QueueFull
from scheduler.messages import Request as QueuedRequest
from scheduler.messages import SubmissionBody, parse_submission
from scheduler.store import new_uid
from scheduler.validation import validated

if TYPE_CHECKING:
    from fdconsole.topics.models import Topic

log = logging.getLogger(__name__)
IDEMPOTENCY_HEADER = "Idempotency-Key"  # where the API takes a submission's idempotency key (checked there)


class IdempotencyKeyReused(FdError):
    """An Idempotency-Key of this submitter that already names a submission of other content."""

    code = "idempotency_key_reused"
    status = 409


@dataclass(frozen=True)
class Submitted:
    """What a submission came to: its request's row, and whether it was a retry of one already made
    (``replayed``: then nothing was added, queued or counted against a limit)."""

    row: Request
    replayed: bool = False


@dataclass(frozen=True)
class Submission:
    """Who submits what under which names: what tells a retry from a new request."""

    owner: Any  # the submitting user; None when there is none (then nothing is a retry)
    digest: str  # ``submission_digest`` of its validated content
    request_id: str | None  # the client's; None when it gave none
    idempotency_key: str  # "" when it sent none

    def earlier(self) -> Request | None:
        """The request this very submission already made, None when there is none. ``IdempotencyKeyReused``
        or ``DuplicateRequest`` (409) when one of its names holds another submission (another user's
        request is not described)."""
        if self.owner is None:
            return None
        if self.idempotency_key:
            row = _rows().filter(submitted_by=self.owner, idempotency_key=self.idempotency_key).first()
            if row is not None:
                if recorded_digest(row) != self.digest or self.request_id not in (None, row.request_id):
                    raise IdempotencyKeyReused(
                        f"{IDEMPOTENCY_HEADER} '{self.idempotency_key}' was used with another submission "
                        "(another topic, prompt, sampling, node or request_id): send a new key for a new "
                        "request", field=IDEMPOTENCY_HEADER)
                return row
        if self.request_id is not None:
            row = _rows().filter(request_id=self.request_id).first()
            if row is not None and row.submitted_by_id != self.owner.pk:
                raise DuplicateRequest(f"request_id '{self.request_id}' is already taken", field="request_id")
            if row is not None and recorded_digest(row) != self.digest:
                raise DuplicateRequest(f"request_id '{self.request_id}' is already taken by another of your "
                                       "requests (another topic, prompt, sampling or node)",
                                       field="request_id")
            return row
        return None


def _rows():
    return Request.objects.select_related("topic")


def submission_digest(topic: str, model: str, prompt_token_ids: list[int], sampling: dict[str, Any],
                      node: str | None) -> str:
    """SHA-256 (hex) of what a validated submission asks: its topic and model, prompt token ids,
    sampling (``Request.to_dict``'s: max_tokens and stop included) and home ``node``; the same for every
    way of asking the same (a prompt or its token ids, a chat or its rendering, a default left out or
    sent)."""
    content = {"topic": topic, "model": model, "prompt_token_ids": prompt_token_ids, "sampling": sampling,
               "node": node}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recorded_digest(row: Request) -> str:
    """The ``submission_digest`` of ``row``'s submission; for a row made before digests were kept, as
    its own fields say it (the node it asked for is not recorded: none)."""
    return row.submission_digest or submission_digest(row.topic.name, row.model, row.prompt_token_ids,
                                                       row.sampling, None)


def get_request_row(request_id: str) -> Request:
    """The request ``request_id``; ``UnknownObject`` when there is none."""
    row = None
    if request_id.isprintable():
        row = _rows().filter(request_id=request_id).first()
    if row is None:
        raise UnknownObject(f"no request '{request_id}'", field="request_id")
    return row


def submit_request(topic: Topic, body: Any, user=None, token=None, idempotency_key: str = "") -> Request:
    """``submit_or_replay``'s row."""
    return submit_or_replay(topic, body, user, token, idempotency_key).row


def submit_or_replay(topic: Topic, body: Any, user=None, token=None, idempotency_key: str = "") -> Submitted:
    """Validate ``body`` (a ``SubmissionBody``, or a decoded JSON body validated as one here) and queue
    it on ``topic``; or, when ``user`` made this very submission already (under its request_id or
    ``idempotency_key``), answer with that request (see the note).

    Raises InvalidRequest (400), UnknownObject (404), DuplicateRequest or IdempotencyKeyReused (409),
    QueueFull (429), RateLimited (429: a limit of ``token``, the API token it came with),
    NoNodeAvailable (503), ModelUnavailable (503: the topic's model cannot be served here any more) or a
    redis error (503).
    """
    request, client_request_id, node_name = _validated_request(topic, body)
    owner = user if user is not None and user.is_authenticated else None
    digest = submission_digest(topic.name, topic.model, request.prompt_token_ids,
                               request.to_dict()["sampling"], node_name)
    submission = Submission(owner, digest, client_request_id, idempotency_key)
    earlier = submission.earlier()  # before Redis is asked anything: a retry is answered whatever it says
    if earlier is not None:
        return Submitted(earlier, replayed=True)
    config = topic.config
    request.request_id = client_request_id or f"req-{uuid.uuid4().hex}"
    request.topic = topic.name
    store = get_topic_store(topic)
    if not store.has_config(topic.name):  # Redis restarted without persistence: the database knows
        store.publish_config(topic.name, config)
    candidates = _candidate_nodes(topic, node_name, store)
    _refuse_over_waiting_cap(store, topic)
    submitted, expired = _record_and_queue(topic, request, candidates, submission, token, store, config)
    if expired:  # accepted already: what is left to do must not turn that into an error
        try:
            sync_uids(topic.name, expired, store)
        except (DatabaseError, RedisError) as exc:  # the reconciler writes them in a moment anyway
            log.warning("could not record the requests that expired before %s: %s",
                        submitted.row.request_id, exc)
    return submitted


def _validated_request(topic: Topic, body: Any) -> tuple[QueuedRequest, str | None, str | None]:
    """``body`` checked against ``topic``'s model (a chat rendered through its template): the request
    (its request_id still to set), the client's request_id and the node it asked for (or None)."""
    if not isinstance(body, SubmissionBody):
        body = validated(SubmissionBody, body, InvalidRequest)
    context = max_model_len(topic)  # first: it says best what is wrong with a model that is gone
    tokenizer = topic_tokenizer(topic)
    if body.prompt is not None:
        refuse_long_prompt(topic, len(body.prompt), "prompt", context)
    chat = body.messages is not None
    if chat:
        ids = chat_prompt_ids(topic, [turn.model_dump() for turn in body.messages], "messages")
        body = body.model_copy(update={"messages": None, "prompt_token_ids": ids})
    try:
        return parse_submission(
            body, max_model_len=context, encode=tokenizer.encode,
            # a prompt of the byte model holds bytes only, never its end-of-text id
            vocab_size=getattr(tokenizer, "prompt_vocab_size", tokenizer.vocab_size),
        )
    except InvalidRequest as exc:
        if chat and exc.field == "prompt_token_ids":  # the prompt the chat rendered into
            raise InvalidRequest(exc.message.replace("prompt_token_ids", "messages (as the chat template "
                                                     "renders them)"), field="messages") from None
        raise


def chat_prompt_ids(topic: Topic, messages: Any, field: str) -> list[int]:
    """The token ids of ``messages`` ([{"role", "content"}, ...]) rendered through the topic's model's
    chat template with the assistant's turn opened; the template writes the special tokens (BOS
    included) itself, so none are added. ``InvalidRequest`` on ``field`` for a malformed chat or a
    model without a template, or a chat too long to fit in the context (told before it is rendered or
    tokenized, as ``refuse_long_prompt`` tells)."""
    tokenizer = topic_tokenizer(topic)
    if isinstance(messages, list):
        contents = (m.get("content") for m in messages if isinstance(m, dict))
        refuse_long_prompt(topic, sum(len(c) for c in contents if isinstance(c, str)), field)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}", field=field) from None
    refuse_long_prompt(topic, len(text), field)  # what the template adds counts too
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(topic: Topic, text: str, field: str) -> list[int]:
    """The token ids of the prompt ``text`` in ``topic``'s model; ``InvalidRequest`` on ``field``, before
    the tokenizer runs, when the text is too long to fit in the context (``refuse_long_prompt``)."""
    refuse_long_prompt(topic, len(text), field)
    return list(topic_tokenizer(topic).encode(text))


def refuse_long_prompt(topic: Topic, num_chars: int, field: str, context: int | None = None) -> None:
    """``InvalidRequest`` on ``field`` when a prompt of ``num_chars`` characters cannot fit in ``topic``'s
    context (``context`` tokens, by default ``max_model_len``) whatever it says: when it is longer than
    the context times the most characters one token of the model stands for. Checked before the
    tokenizer (or a chat template) runs, so that a huge prompt costs nothing but this comparison; no
    prompt that would fit is refused, which a fixed characters-per-token factor could not promise
    (SmolLM2 has tokens of 64 '=' and of a newline and 80 spaces). Where a token may stand for any
    length of text, nothing is refused here (the body limit, FD_MAX_BODY_BYTES, bounds the prompt)."""
    per_token = longest_token_chars(topic_tokenizer(topic))
    if per_token is None:
        return
    context = context or max_model_len(topic)
    if num_chars > context * per_token:
        raise InvalidRequest(
            f"{field} is too long: {num_chars} characters, and at most {context * per_token} can fit in the "
            f"model's context of {context} tokens (a token of it stands for {per_token} characters at most)",
            field=field,
        )


@functools.lru_cache(maxsize=16)
def longest_token_chars(tokenizer) -> int | None:
    """The most characters one token of ``tokenizer`` stands for: 1 for the byte model, whose tokens are
    bytes; else its longest vocabulary entry (which spells a byte-level token one character per byte, a
    SentencePiece one character for character: never fewer than the text's). None when an unknown token
    may stand for a whole word or a run of text (WordLevel, WordPiece, Unigram, BPE's fuse_unk)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return 1
    model = backend.model
    if not isinstance(model, BPE) or (model.unk_token is not None and model.fuse_unk):
        return None
    return max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)


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


def _refuse_over_waiting_cap(store, topic: Topic) -> None:
    """QueueFull when ``FD_MAX_WAITING_PER_TOPIC`` requests already wait in the topic, whatever its
    scheduler (a global or splitwise topic has no per-node bound of its own)."""
    cap = settings.FD_MAX_WAITING_PER_TOPIC
    waiting = get_topic_telemetry(topic).waiting_count(topic.name)
    if waiting >= cap:
        _count_rejection(store, topic, "queue_full")
        raise QueueFull(f"queue full: topic '{topic.name}' already has {waiting} waiting requests "
                        f"(FD_MAX_WAITING_PER_TOPIC={cap})")


def _record_and_queue(topic: Topic, request: QueuedRequest, candidates: list[str], submission: Submission,
                      token, store, config) -> tuple[Submitted, list[str]]:
    """The new request's row, made after the token's limits are checked, and the request queued in Redis,
    all in one transaction (a refused submission leaves nothing, a retry takes nothing, nobody sees the
    row before Redis has the request); with the uids that expired meanwhile. Or the earlier request of
    the same submission, when a twin got there first (``replayed``)."""
    try:
        with transaction.atomic():
            earlier = submission.earlier()  # a twin may have committed since the first look
            if earlier is not None:
                return Submitted(earlier, replayed=True), []
            if token is not None:
                take_in_flight(token)  # counted and held on the token's row until the row is made
            row = Request.objects.create(
                api_token=token, uid=new_uid(), request_id=request.request_id, topic=topic, model=topic.model,
                home_node=candidates[0], prompt_token_ids=request.prompt_token_ids,
                prompt_tokens=request.prompt_len, sampling=request.to_dict()["sampling"],
                created_at=timezone.now(), submitted_by=submission.owner,
                idempotency_key=submission.idempotency_key, submission_digest=submission.digest,
            )
            if token is not None:
                take_rate(token)  # a refusal rolls the row back, and a retry never gets here
            home, expired = _queue_on_first_with_room(store, topic, config, row, request, candidates)
            if home != row.home_node:
                row.home_node = home
                row.save(update_fields=["home_node"])
            return Submitted(row), expired
    except (IntegrityError, RateLimited) as exc:
        # A twin committed meanwhile (its row took a name, or the last place in flight): this is its retry.
        earlier = submission.earlier()
        if earlier is not None:
            return Submitted(earlier, replayed=True), []
        if isinstance(exc, RateLimited):
            raise
        raise DuplicateRequest(
            f"request_id '{request.request_id}' is already taken", field="request_id"
        ) from None
