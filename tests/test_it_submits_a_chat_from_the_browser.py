"""The submit page's chat box: messages (a role and a content each) are rendered through the chat
template of the topic's model, encoded without adding special tokens (the template writes them) and
queued as ``prompt_token_ids``; a model without a chat template (``tiny``) says so instead, and a bad
chat is refused inline, queueing nothing."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db
MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def smol(store):
    """Topic ``smol`` serving SmolLM2 (its GGUF file's chat template), with a node to queue on."""
    from fdconsole.topics.services import create_topic, ensure_node

    topic = create_topic("smol", {"model": "smollm2"})
    ensure_node("smol-a", topic)
    return topic


def chat_form(topic: str, messages: list[dict[str, str]], **fields) -> dict:
    return {"topic": topic, "input": "chat", "prompt": "", "max_tokens": "8", "temperature": "0",
            "top_p": "1", "top_k": "0", "seed": "", "node": "",
            "chat_role": [m["role"] for m in messages], "chat_content": [m["content"] for m in messages],
            **fields}


def test_the_chat_box_shows_for_a_model_with_a_chat_template(admin, smol):
    page = admin.get("/requests/new/?topic=smol").content.decode()
    assert '<div id="chat-box">' in page and '<p class="hint" id="chat-none" hidden>' in page
    assert 'name="chat_role"' in page and 'name="chat_content"' in page and 'id="add-message"' in page
    assert 'data-chat="1"' in page and 'value="chat"' in page


def test_the_byte_model_has_no_chat_box(admin, topic, smol):
    page = admin.get("/requests/new/?topic=default").content.decode()
    assert "has no chat template" in page and '<div id="chat-box" hidden>' in page
    assert 'value="chat" disabled>' in page
    assert 'data-model="tiny" data-chat="0"' in page and 'data-model="smollm2" data-chat="1"' in page


def test_a_chat_is_rendered_through_the_models_template_and_queued(admin, smol):
    from fdconsole.inference.models import Request
    from gpu_worker.model_source import load_tokenizer

    answer = admin.post("/requests/new/", chat_form("smol", MESSAGES))
    assert answer.status_code == 302, answer.content.decode()[-3000:]
    row = Request.objects.get()
    tokenizer = load_tokenizer("smollm2")
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert row.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert row.prompt_token_ids[0] == tokenizer.encode("<|im_start|>", add_special_tokens=False)[0]
    assert row.model == "smollm2" and row.prompt_tokens == len(row.prompt_token_ids)
    assert row.sampling["max_tokens"] == 8


def test_empty_messages_are_left_out(admin, smol):
    from fdconsole.inference.models import Request
    from gpu_worker.model_source import load_tokenizer

    messages = [{"role": "system", "content": "  "}, {"role": "user", "content": "Hi"}]
    assert admin.post("/requests/new/", chat_form("smol", messages)).status_code == 302
    tokenizer = load_tokenizer("smollm2")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert Request.objects.get().prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("topic_name, messages, says", [
    ("smol", [{"role": "system", "content": ""}, {"role": "user", "content": ""}], "at least one message"),
    ("smol", [{"role": "robot", "content": "beep"}], "role must be one of system, user, assistant"),
    ("default", MESSAGES, "no chat template"),
])
def test_a_bad_chat_is_refused_inline(admin, topic, smol, topic_name, messages, says):
    from fdconsole.inference.models import Request

    answer = admin.post("/requests/new/", chat_form(topic_name, messages))
    page = answer.content.decode().replace("&#x27;", "'")
    assert answer.status_code == 400
    assert 'class="field-error" data-for="chat"' in page and says in page, page[-4000:]
    assert all(m["content"] in page for m in messages)  # what was typed, to correct
    assert Request.objects.count() == 0


def test_a_chat_too_long_for_the_request_is_refused_on_the_chat(admin, smol, settings):
    from fdconsole.inference.models import Request

    settings.FD_MAX_MODEL_LEN = 40
    answer = admin.post("/requests/new/", chat_form("smol", MESSAGES, max_tokens="30"))
    page = answer.content.decode()
    assert answer.status_code == 400 and 'data-for="max_tokens"' in page
    answer = admin.post("/requests/new/", chat_form("smol", [{"role": "user", "content": "word " * 60}]))
    page = answer.content.decode()
    assert answer.status_code == 400 and 'data-for="chat"' in page and "context of 40 tokens" in page
    assert Request.objects.count() == 0


def test_the_raw_prompt_is_still_sent_as_written(admin, smol):
    from fdconsole.inference.models import Request
    from gpu_worker.model_source import load_tokenizer

    form = chat_form("smol", MESSAGES, input="prompt", prompt="The capital of France is")
    assert admin.post("/requests/new/", form).status_code == 302
    expected = load_tokenizer("smollm2").encode("The capital of France is")
    assert Request.objects.get().prompt_token_ids == expected
