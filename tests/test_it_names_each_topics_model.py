"""Each topic names the model it serves (``tiny``, ``smollm2`` or an absolute path to a Hugging Face
checkpoint directory or a .gguf file): set through the API, the config page and the admin, checked
cheaply when set (a bad one is refused on field ``model``, naming what is wrong, and changes nothing),
refused with 409 while the topic has unfinished requests or running nodes, and used by the web tier to
tokenize prompts, bound their length and decode their output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.api_errors import assert_error
from tests.test_it_manages_nodes_in_the_admin import topic_form
from tests.test_it_serves_the_console_pages import form as config_form

pytestmark = pytest.mark.django_db
TOPICS = "/api/v1/topics"
TOPIC = "/api/v1/topics/default"
HF_CONTEXT = 64  # max_position_embeddings of the small checkpoint below


# -- checkpoints made here, without torch -------------------------------------------------------------
def hf_checkpoint(folder: Path, architecture: str = "LlamaForCausalLM", truncate: bool = False) -> Path:
    """A checkpoint directory that ``model_source.inspect`` accepts: config.json, tokenizer.json (a word
    tokenizer), tokenizer_config.json and one safetensors file (cut short when ``truncate``)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    folder.mkdir(parents=True)
    config = {"architectures": [architecture], "model_type": "llama", "vocab_size": 5,
              "max_position_embeddings": HF_CONTEXT}
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    header = json.dumps({"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    data = len(header).to_bytes(8, "little") + header + bytes(16)
    (folder / "model.safetensors").write_bytes(data[:-5] if truncate else data)
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return hf_checkpoint(tmp_path / "small-llama")


def beat(store, state: str, topic: str = "default", node: str = "node-a") -> None:
    """What a node's heartbeat says (as a running or a stopped fdnode writes it)."""
    store.write_heartbeat(topic, node, {"state": state, "role": "mixed"})


def submit(api, topic: str = "default", **body) -> dict:
    body = {"max_tokens": 4, **body}
    if "prompt_token_ids" not in body and "messages" not in body:
        body.setdefault("prompt", "hello world")
    answer = api.post(f"{TOPICS}/{topic}/requests", body)
    assert answer.status_code == 202, answer.content
    return answer.json()


# -- naming a model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_a_topic_is_created_with_the_model_it_names(api, store, model):
    answer = api.post(TOPICS, {"name": "served", "model": model})
    assert answer.status_code == 201, answer.content
    assert answer.json()["model"] == model
    assert api.get(f"{TOPICS}/served").json()["model"] == model
    assert {t["name"]: t["model"] for t in api.get(TOPICS).json()["topics"]} == {"served": model}


def test_a_checkpoint_directory_is_a_model(api, store, checkpoint):
    answer = api.post(TOPICS, {"name": "hf", "model": str(checkpoint)})
    assert answer.status_code == 201, answer.content
    assert answer.json()["model"] == str(checkpoint)


@pytest.mark.parametrize("default", ["smollm2", "tiny"])
def test_a_topic_created_without_a_model_gets_fd_model(api, store, settings, default):
    from fdconsole.topics.services import ensure_topic

    settings.FD_MODEL = default
    assert api.post(TOPICS, {"name": "plain"}).json()["model"] == default
    assert ensure_topic("by-a-node").model == default  # as fdnode creates its topic


def test_a_bad_fd_model_is_named_when_a_topic_is_created(api, store, settings):
    settings.FD_MODEL = "/nowhere/to/be/found"
    error = assert_error(api.post(TOPICS, {"name": "plain"}), 400, "model")
    assert "/nowhere/to/be/found" in error["message"]
    assert api.get(f"{TOPICS}/plain").status_code == 404


# -- bad models --------------------------------------------------------------------------------------
def bad_models(tmp_path: Path) -> dict[str, tuple[str, list[str]]]:
    """kind -> (model, what the message must say)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = hf_checkpoint(tmp_path / "truncated", truncate=True)
    foo = hf_checkpoint(tmp_path / "foo", architecture="FooForCausalLM")
    text_file = tmp_path / "weights.bin"
    text_file.write_text("not a model")
    return {
        "missing-path": (str(tmp_path / "no-such-model"), ["does not exist", "no-such-model"]),
        "relative-path": ("models/llama", ["absolute path", "models/llama"]),
        "no-config": (str(empty), ["config.json", str(empty)]),
        "truncated-safetensors": (str(truncated), ["model.safetensors", "truncated"]),
        "unknown-architecture": (str(foo), ["FooForCausalLM", "not supported", "LlamaForCausalLM",
                                            "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"]),
        "neither-directory-nor-gguf": (str(text_file), ["neither a checkpoint directory nor a .gguf file"]),
        "empty": ("", ["model must be"]),
        "not-a-string": (5, ["model must be"]),
    }


BAD_KINDS = ["missing-path", "relative-path", "no-config", "truncated-safetensors", "unknown-architecture",
             "neither-directory-nor-gguf", "empty", "not-a-string"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_model_is_refused_when_creating_and_nothing_is_made(api, store, tmp_path, kind):
    model, says = bad_models(tmp_path)[kind]
    error = assert_error(api.post(TOPICS, {"name": "bad", "model": model}), 400, "model")
    assert error["code"] == "invalid"
    for words in says:
        assert words in error["message"], error
    assert api.get(f"{TOPICS}/bad").status_code == 404
    assert not store.redis.exists("fd:{bad}:config")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_model_is_refused_when_changing_and_the_topic_is_unchanged(api, topic, store, tmp_path, kind):
    model, says = bad_models(tmp_path)[kind]
    error = assert_error(api.patch(TOPIC, {"model": model, "scheduler_ttl": 60}), 400, "model")
    for words in says:
        assert words in error["message"], error
    after = api.get(TOPIC).json()
    assert (after["model"], after["scheduler_ttl"]) == ("tiny", 900)
    assert store.config_of("default").scheduler_ttl == 900


# -- changing the model ------------------------------------------------------------------------------
def test_an_idle_topic_changes_its_model(api, node, store, checkpoint):
    beat(store, "stopped")  # a node that has stopped keeps nothing loaded
    for model in ("smollm2", str(checkpoint), "tiny"):
        answer = api.patch(TOPIC, {"model": model})
        assert answer.status_code == 200, answer.content
        assert answer.json()["model"] == model == api.get(TOPIC).json()["model"]


def test_an_unfinished_request_keeps_the_model(api, node, store):
    request_id = submit(api)["request_id"]
    error = assert_error(api.patch(TOPIC, {"model": "smollm2", "scheduler_ttl": 60}), 409, "model")
    assert error["code"] == "topic_busy"
    assert "1 unfinished request" in error["message"] and "'default'" in error["message"]
    after = api.get(TOPIC).json()
    assert (after["model"], after["scheduler_ttl"]) == ("tiny", 900)  # nothing of the PATCH was saved

    assert api.delete(f"/api/v1/requests/{request_id}").json()["status"] == "cancelled"
    assert api.patch(TOPIC, {"model": "smollm2"}).status_code == 200


@pytest.mark.parametrize("state", ["idle", "busy", "draining"])
def test_a_running_node_keeps_the_model(api, node, store, state):
    beat(store, state)
    error = assert_error(api.patch(TOPIC, {"model": "smollm2"}), 409, "model")
    assert "node-a" in error["message"] and "stop them first" in error["message"]
    assert api.get(TOPIC).json()["model"] == "tiny"


def test_the_same_model_again_is_no_change_even_while_busy(api, node, store):
    beat(store, "busy")
    submit(api)
    sent_back = {k: v for k, v in api.get(TOPIC).json().items() if k != "scheduler_password"}
    answer = api.patch(TOPIC, {**sent_back, "scheduler_ttl": 60})  # GET's object, edited and sent back
    assert answer.status_code == 200, answer.content
    assert (answer.json()["model"], answer.json()["scheduler_ttl"]) == ("tiny", 60)


# -- the config page ---------------------------------------------------------------------------------
def test_the_config_page_shows_the_model_with_its_help(admin, topic):
    page = admin.get("/topics/default/config/").content.decode()
    assert 'name="model"' in page and 'value="tiny"' in page
    assert "or an absolute path to a Hugging Face checkpoint directory or a .gguf file" in page


def test_the_config_page_saves_the_model(admin, topic):
    answer = admin.post("/topics/default/config/", config_form(topic, model="smollm2"), follow=True)
    page = answer.content.decode()
    assert answer.status_code == 200 and "flash success" in page and "serve model smollm2" in page
    topic.refresh_from_db()
    assert topic.model == "smollm2"


def test_the_config_page_refuses_a_bad_model_inline(admin, topic, tmp_path):
    missing = str(tmp_path / "gone")
    answer = admin.post("/topics/default/config/", config_form(topic, model=missing, scheduler_ttl="60"))
    page = answer.content.decode()
    assert answer.status_code == 400
    assert 'class="field-error" data-for="model"' in page and "does not exist" in page
    assert f'value="{missing}"' in page  # what was typed, to correct
    topic.refresh_from_db()
    assert (topic.model, topic.scheduler_ttl) == ("tiny", 900)


def test_the_config_page_refuses_a_busy_model_change_inline(admin, api, node, store):
    beat(store, "idle")
    answer = admin.post("/topics/default/config/", config_form(node.topic, model="smollm2"))
    assert answer.status_code == 400
    page = answer.content.decode()
    assert 'data-for="model"' in page and "stop them first" in page
    node.topic.refresh_from_db()
    assert node.topic.model == "tiny"


# -- the admin ---------------------------------------------------------------------------------------
def test_the_admin_lists_and_shows_the_model(admin, topic):
    changelist = admin.get("/admin/topics/topic/").content.decode()
    assert "column-model" in changelist and '<td class="field-model">tiny</td>' in changelist
    page = admin.get(f"/admin/topics/topic/{topic.pk}/change/").content.decode()
    assert 'name="model"' in page and 'value="tiny"' in page and ">Model<" in page


def test_the_admin_saves_a_model_and_keeps_it_when_left_empty(admin, topic):
    from fdconsole.topics.models import Topic

    answer = admin.post(f"/admin/topics/topic/{topic.pk}/change/", topic_form(topic, model="smollm2"))
    assert answer.status_code == 302, answer.context and answer.context["adminform"].form.errors
    assert Topic.objects.get(pk=topic.pk).model == "smollm2"
    answer = admin.post(f"/admin/topics/topic/{topic.pk}/change/", topic_form(topic, scheduler_ttl=30))
    assert answer.status_code == 302
    assert Topic.objects.get(pk=topic.pk).model == "smollm2"


@pytest.mark.parametrize("kind", ["missing-path", "relative-path", "no-config", "unknown-architecture"])
def test_the_admin_refuses_a_bad_model_beside_the_field(admin, topic, tmp_path, kind):
    from fdconsole.topics.models import Topic

    model, says = bad_models(tmp_path)[kind]
    answer = admin.post(f"/admin/topics/topic/{topic.pk}/change/", topic_form(topic, model=model))
    assert answer.status_code == 200  # the form again, not a redirect
    errors = answer.context["adminform"].form.errors
    assert says[0] in errors["model"][0], errors
    assert Topic.objects.get(pk=topic.pk).model == "tiny"
    answer = admin.post("/admin/topics/topic/add/", topic_form(topic, name="fresh", scheduler_topic="fresh",
                                                               model=model))
    assert "model" in answer.context["adminform"].form.errors
    assert not Topic.objects.filter(name="fresh").exists()


def test_the_admin_refuses_a_busy_model_change_beside_the_field(admin, api, node, store):
    from fdconsole.topics.models import Topic

    submit(api)
    answer = admin.post(f"/admin/topics/topic/{node.topic.pk}/change/",
                        topic_form(node.topic, model="smollm2"))
    assert answer.status_code == 200
    errors = answer.context["adminform"].form.errors
    assert "unfinished request" in errors["model"][0], errors
    assert Topic.objects.get(pk=node.topic.pk).model == "tiny"


# -- requests carry their model ----------------------------------------------------------------------
def test_a_request_records_its_topics_model(api, node, store):
    from fdconsole.inference.models import Request

    body = submit(api)
    assert body["model"] == "tiny" and body["prompt_tokens"] == len(b"hello world")
    assert Request.objects.get(request_id=body["request_id"]).model == "tiny"
    assert api.get(f"/api/v1/requests/{body['request_id']}").json()["model"] == "tiny"


def test_a_request_is_tokenized_with_its_topics_model(api, store):
    from fdconsole.inference.models import Request
    from fdconsole.topics.services import create_topic, ensure_node
    from gpu_worker.model_source import load_tokenizer

    ensure_node("smol-a", create_topic("smol", {"model": "smollm2"}))
    body = submit(api, "smol", prompt="The capital of France is")
    ids = load_tokenizer("smollm2").encode("The capital of France is")
    assert body["model"] == "smollm2" and body["prompt_tokens"] == len(ids) < len("The capital of France is")
    assert Request.objects.get(request_id=body["request_id"]).prompt_token_ids == ids


def test_prompt_token_ids_must_be_in_the_models_vocabulary(api, node, store):
    from fdconsole.topics.services import create_topic, ensure_node

    error = assert_error(api.post(f"{TOPIC}/requests", {"prompt_token_ids": [97, 256]}), 400,
                         "prompt_token_ids")
    assert "vocabulary" in error["message"] and "0 to 255" in error["message"]

    ensure_node("smol-a", create_topic("smol", {"model": "smollm2"}))
    error = assert_error(api.post(f"{TOPICS}/smol/requests", {"prompt_token_ids": [1, 49152]}), 400,
                         "prompt_token_ids")
    assert "vocabulary" in error["message"] and "0 to 49151" in error["message"]
    assert submit(api, "smol", prompt_token_ids=[1, 49151, 256])["prompt_tokens"] == 3


def test_the_models_context_bounds_a_request(api, store, checkpoint, settings):
    from fdconsole.topics.services import create_topic, ensure_node

    ensure_node("hf-a", create_topic("hf", {"model": str(checkpoint)}))
    assert settings.FD_MAX_MODEL_LEN > HF_CONTEXT
    too_long = {"prompt": "hello world", "max_tokens": HF_CONTEXT}
    error = assert_error(api.post(f"{TOPICS}/hf/requests", too_long), 400, "max_tokens")
    assert f"context of {HF_CONTEXT} tokens" in error["message"]
    assert submit(api, "hf", max_tokens=HF_CONTEXT - 2)["prompt_tokens"] == 2
    error = assert_error(api.post(f"{TOPICS}/hf/requests", {"prompt": "   "}), 400, "prompt")
    assert "no tokens" in error["message"]  # the word tokenizer drops blanks: nothing to run


def test_output_text_is_decoded_with_the_requests_model(api, store):
    from fdconsole.inference.models import Request
    from fdconsole.topics.services import create_topic, ensure_node
    from gpu_worker.model_source import load_tokenizer

    ensure_node("smol-a", create_topic("smol", {"model": "smollm2"}))
    request_id = submit(api, "smol")["request_id"]
    output = load_tokenizer("smollm2").encode(" Paris, of course.", add_special_tokens=False)
    Request.objects.filter(request_id=request_id).update(output_token_ids=output, finish_reason="length")
    row = Request.objects.get(request_id=request_id)
    assert row.output_text == " Paris, of course."
    assert row.as_api()["output_text"] == " Paris, of course."


@pytest.mark.django_db(transaction=True)  # the node's database hooks close connections
def test_output_text_of_the_byte_model_is_unchanged(api, node, store, run_node):
    from gpu_worker.tokenizer import ByteTokenizer, streamed_text

    request_id = submit(api, max_tokens=6)["request_id"]
    run_node()
    body = api.get(f"/api/v1/requests/{request_id}").json()
    assert body["status"] == "finished" and len(body["output_token_ids"]) == 6
    ids, reason = body["output_token_ids"], body["finish_reason"]
    assert body["output_text"] == streamed_text(ids, reason) == streamed_text(ids, reason, ByteTokenizer())


# -- a model whose files are gone --------------------------------------------------------------------
def test_a_model_removed_from_the_host_is_named_not_guessed(api, admin, store, checkpoint):
    from fdconsole.api.stream import replay_from_database
    from fdconsole.inference.models import Request
    from fdconsole.topics.services import create_topic, ensure_node

    ensure_node("hf-a", create_topic("hf", {"model": str(checkpoint)}))
    request_id = submit(api, "hf")["request_id"]
    Request.objects.filter(request_id=request_id).update(status="finished", output_token_ids=[3, 4],
                                                         finish_reason="length")
    assert api.get(f"/api/v1/requests/{request_id}").json()["output_text"] == "world again"
    shutil.rmtree(checkpoint)

    error = assert_error(api.post(f"{TOPICS}/hf/requests", {"prompt": "hello"}), 503)
    assert error["code"] == "model_unavailable" and str(checkpoint) in error["message"]
    assert "does not exist" in error["message"]
    error = assert_error(api.get(f"/api/v1/requests/{request_id}"), 503)  # never an empty output_text
    assert error["code"] == "model_unavailable" and str(checkpoint) in error["message"]
    events = replay_from_database(Request.objects.get(request_id=request_id), -1)
    assert len(events) == 1 and events[0].startswith("event: error") and str(checkpoint) in events[0]

    page = admin.get(f"/requests/{request_id}/")  # the page shows what it knows and says why not the rest
    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="model-note"' in text and "cannot be shown" in text and str(checkpoint) in text
    assert "2 3" in text  # the prompt's token ids instead of its text

    # The topic is still the topic: sending its model back with another change is no change of model.
    answer = api.patch(f"{TOPICS}/hf", {"model": str(checkpoint), "scheduler_ttl": 60})
    assert answer.status_code == 200, answer.content


# -- a chat through the native API ---------------------------------------------------------------------
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_messages_are_rendered_through_the_models_chat_template(api, store):
    from fdconsole.inference.models import Request
    from fdconsole.topics.services import create_topic, ensure_node
    from gpu_worker.model_source import load_tokenizer

    ensure_node("smol-a", create_topic("smol", {"model": "smollm2"}))
    body = submit(api, "smol", messages=CHAT)
    tokenizer = load_tokenizer("smollm2")
    ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    assert Request.objects.get(request_id=body["request_id"]).prompt_token_ids == ids
    assert body["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("body, message", [
    ({"messages": CHAT, "prompt": "x"}, "exactly one of prompt, prompt_token_ids and messages"),
    ({"messages": []}, "messages: .*non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages: messages\[0\].role must be one of"),
    ({"messages": [{"role": "user", "content": 7}]}, r"messages\[0\].content must be a string"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, r"messages \(as the chat template renders"),
])
def test_a_bad_chat_is_refused_on_messages(api, store, body, message):
    from fdconsole.topics.services import create_topic, ensure_node

    ensure_node("smol-a", create_topic("smol", {"model": "smollm2"}))
    error = assert_error(api.post(f"{TOPICS}/smol/requests", {"max_tokens": 4, **body}), 400, "messages")
    assert re.search(message, error["message"]), error


def test_a_model_without_a_chat_template_refuses_messages(api, node, store):
    error = assert_error(api.post(f"{TOPIC}/requests", {"messages": CHAT}), 400, "messages")
    assert "no chat template" in error["message"], error


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_smollm2_answers_a_chat_through_a_node(api, node_processes, store):
    """The demo's model, end to end on the CPU: a node loads the packaged GGUF and answers in words."""
    from tests.nodes import wait_final

    assert api.post(TOPICS, {"name": "smol", "model": "smollm2"}).status_code == 201
    node_processes.start("smol-a", "smol")
    body = submit(api, "smol", messages=CHAT, max_tokens=24, request_id="paris")
    done = wait_final(api, body["request_id"])
    assert done["status"] == "finished" and done["finish_reason"] == "stop", done
    assert "Paris" in done["output_text"], done["output_text"]
