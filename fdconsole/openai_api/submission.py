"""An OpenAI-style request becomes a native one: the topic its ``model`` names, the prompt's token ids
(rendered through the chat template for a chat), the sampling with OpenAI's defaults; then it is
submitted exactly as ``POST /api/v1/topics/{topic}/requests`` submits (scheduled, visible in the
console, failed over, streamed exactly once).

A ``request_id`` or an ``Idempotency-Key`` sent again by the same user with the same prompt and
sampling reattaches to that request, running or finished, instead of starting another
(``submit_or_replay``): a client that lost its connection asks again and reads the same answer. The
same name with anything else is 409.
"""

from __future__ import annotations

from typing import Any

from fdconsole.errors import ModelUnavailable, UnknownModel, UnknownObject
from fdconsole.inference.submit import Submitted, chat_prompt_ids, max_model_len, prompt_ids, submit_or_replay
from fdconsole.nodes.models import Node
from fdconsole.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelCard,
)
from fdconsole.redis_conn import topic_redis_errors
from fdconsole.topics.models import Topic
from fdconsole.topics.services import get_topic
from scheduler.config import NAME_RE
from scheduler.errors import InvalidRequest


def start_request(body: GenerationRequest, user, token=None, idempotency_key: str = "") -> Submitted:
    """Submit ``body`` on the topic its ``model`` names, or reattach to the request its ``request_id``
    or ``idempotency_key`` already made. Raises what ``submit_or_replay`` raises (an ``InvalidRequest``
    naming this client's field), and ``UnknownModel`` (404) for a model that names no topic."""
    topic = model_topic(body.model)
    with topic_redis_errors(topic):
        native, renamed = native_body(topic, body)
        try:
            return submit_or_replay(topic, native, user, token, idempotency_key)
        except InvalidRequest as exc:
            if exc.field not in renamed:
                raise
            field = renamed[exc.field]
            raise InvalidRequest(exc.message.replace(exc.field, field), field=field) from None


def model_topic(model: str) -> Topic:
    try:
        return get_topic(model)
    except UnknownObject:
        raise UnknownModel(f"The model '{model}' does not exist: a model is a topic of this console "
                           "(GET /v1/models lists them)", field="model") from None


def native_body(topic: Topic, body: GenerationRequest) -> tuple[dict[str, Any], dict[str, str]]:
    """The native submission of ``body`` (its prompt as token ids, its sampling with defaults filled in:
    ``max_tokens`` the endpoint's default within the context the prompt leaves), and the native fields
    that stand for another of ``body``'s (the native checks then name what this client sent)."""
    prompt_ids, prompt_field = prompt_token_ids(topic, body)
    context_left = max_model_len(topic) - len(prompt_ids)
    native = {"prompt_token_ids": prompt_ids, **body.native_sampling(body.resolved_max_tokens(context_left))}
    renamed = {"prompt_token_ids": prompt_field}
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        renamed["max_tokens"] = "max_completion_tokens"
    return native, renamed


def prompt_token_ids(topic: Topic, body: GenerationRequest) -> tuple[list[int], str]:
    """The prompt's token ids in the topic's model's vocabulary, and the field it came from."""
    if isinstance(body, ChatCompletionRequest):
        return chat_prompt_ids(topic, body.chat(), "messages"), "messages"
    assert isinstance(body, CompletionRequest)
    if isinstance(body.prompt, str):
        return prompt_ids(topic, body.prompt, "prompt"), "prompt"
    return body.prompt, "prompt"


# -- GET /v1/models ---------------------------------------------------------------------------------
def model_cards(name: str | None = None) -> list[ModelCard]:
    """The topics that take requests (at least one enabled node) as models; only ``name`` when given."""
    topics = Topic.objects.filter(nodes__admin_state=Node.AdminState.ENABLED).distinct().order_by("name")
    if name is not None:  # a name that no topic could have is not looked up (PostgreSQL refuses a NUL)
        topics = topics.filter(name=name) if NAME_RE.match(name) else topics.none()
    return [ModelCard(id=topic.name, created=int(topic.created_at.timestamp()), root=topic.model,
                      max_model_len=context_of(topic)) for topic in topics]


def context_of(topic: Topic) -> int | None:
    try:
        return max_model_len(topic)
    except ModelUnavailable:  # its files are gone from this host: listed, with no context to tell
        return None
