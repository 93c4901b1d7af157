"""A prompt too long to fit in its topic's context, whatever it says, is refused with 400 naming its field
before the tokenizer (or a chat template) runs: native ``prompt`` and ``messages``, OpenAI's ``prompt`` and
``messages``. The bound is the context times the most characters one token of the model stands for (1
for the byte model; SmolLM2's longest token is 81 characters), so no prompt that fits is refused: a
prompt one token short of the context still runs. ``prompt_token_ids`` is measured against the context
before its ids are looked at."""

from __future__ import annotations

import pytest

from tests.api_errors import assert_error

pytestmark = pytest.mark.django_db
SUBMIT = "/api/v1/topics/default/requests"


@pytest.fixture
def context(node) -> int:
    from fdconsole.inference.submit import max_model_len

    return max_model_len(node.topic)


@pytest.fixture
def tokenizer_calls(monkeypatch) -> list[str]:
    """Every use of the byte model's tokenizer and chat template, by name."""
    from gpu_worker.tokenizer import ByteTokenizer

    calls: list[str] = []
    encode, template = ByteTokenizer.encode, ByteTokenizer.apply_chat_template

    def spy_encode(self, text, *args, **kwargs):
        calls.append("encode")
        return encode(self, text, *args, **kwargs)

    def spy_template(self, *args, **kwargs):
        calls.append("apply_chat_template")
        return template(self, *args, **kwargs)

    monkeypatch.setattr(ByteTokenizer, "encode", spy_encode)
    monkeypatch.setattr(ByteTokenizer, "apply_chat_template", spy_template)
    return calls


def assert_too_long(error: dict, num_chars: int, context: int) -> None:
    assert "too long" in error["message"] and str(num_chars) in error["message"], error
    assert f"context of {context} tokens" in error["message"], error


# -- the native API ----------------------------------------------------------------------------------
def test_a_prompt_longer_than_the_context_can_hold_is_refused_untokenized(api, context, tokenizer_calls):
    error = assert_error(api.post(SUBMIT, {"prompt": "x" * (context + 1), "max_tokens": 1}), 400, "prompt")
    assert_too_long(error, context + 1, context)
    assert tokenizer_calls == []


def test_a_prompt_that_fits_is_not_refused_by_the_bound(api, context, tokenizer_calls):
    answer = api.post(SUBMIT, {"prompt": "x" * (context - 1), "max_tokens": 1})
    assert answer.status_code == 202, answer.content
    assert answer.json()["prompt_tokens"] == context - 1
    # At the bound itself the tokenizer decides: the context check refuses it, in tokens.
    error = assert_error(api.post(SUBMIT, {"prompt": "x" * context, "max_tokens": 1}), 400, "prompt")
    assert f"({context} tokens) leaves no room" in error["message"]
    assert tokenizer_calls == ["encode", "encode"]


def test_a_chat_longer_than_the_context_can_hold_is_refused_before_its_template(api, context,
                                                                                 tokenizer_calls):
    half = "x" * (context // 2 + 1)
    body = {"messages": [{"role": "user", "content": half}, {"role": "user", "content": half}]}
    error = assert_error(api.post(SUBMIT, body), 400, "messages")
    assert_too_long(error, 2 * len(half), context)
    assert tokenizer_calls == []


def test_prompt_token_ids_are_measured_before_they_are_read(api, context):
    too_many = [10**9] * (context + 5)  # none of them in the vocabulary: the length is told first
    error = assert_error(api.post(SUBMIT, {"prompt_token_ids": too_many, "max_tokens": 1}), 400,
                         "prompt_token_ids")
    assert f"({context + 5} tokens) leaves no room" in error["message"]


# -- the OpenAI-compatible API -----------------------------------------------------------------------
def openai_error(answer, param: str) -> dict:
    assert answer.status_code == 400, answer.content
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    return error


def test_openai_prompts_are_bounded_the_same_way(api, context, tokenizer_calls):
    answer = api.post("/v1/completions", {"model": "default", "prompt": "x" * (context + 1)})
    assert_too_long(openai_error(answer, "prompt"), context + 1, context)
    chat = [{"role": "user", "content": "x" * (context + 1)}]
    answer = api.post("/v1/chat/completions", {"model": "default", "messages": chat})
    assert_too_long(openai_error(answer, "messages"), context + 1, context)
    assert tokenizer_calls == []

    # One token short of the context, it is tokenized and measured in tokens: no room for 2 more.
    answer = api.post("/v1/completions", {"model": "default", "prompt": "x" * (context - 1), "max_tokens": 2})
    assert "exceeds the model's context" in openai_error(answer, "max_tokens")["message"]
    assert tokenizer_calls == ["encode"]


# -- a real model's tokenizer ------------------------------------------------------------------------
def test_smollm2_prompts_of_long_tokens_still_fit(api, store):
    """SmolLM2 spells 64 '=' as one token: a prompt of 64 characters per token fits, and is taken. A
    fixed bound of, say, 16 characters per token would have refused it unread."""
    from fdconsole.inference.submit import longest_token_chars, max_model_len, topic_tokenizer
    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import ensure_node

    assert api.post("/api/v1/topics", {"name": "smol", "model": "smollm2"}).status_code == 201
    topic = Topic.objects.get(name="smol")
    ensure_node("smol-a", topic)
    context, per_token = max_model_len(topic), longest_token_chars(topic_tokenizer(topic))
    assert per_token >= 64

    ruler = "=" * (64 * (context // 2))
    answer = api.post("/api/v1/topics/smol/requests", {"prompt": ruler, "max_tokens": 1})
    assert answer.status_code == 202, answer.content[:500]
    assert answer.json()["prompt_tokens"] <= context // 2 + 2 and len(ruler) > 16 * context

    bound = context * per_token
    over = api.post("/api/v1/topics/smol/requests", {"prompt": "=" * (bound + 1)})
    error = assert_error(over, 400, "prompt")
    assert_too_long(error, bound + 1, context)
