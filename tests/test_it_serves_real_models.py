"""Nodes serve real checkpoints through the batching engine: greedy tokens equal ``transformers``' for
requests arriving staggered into one batch; a stream resumed after a failover adds up to the text of an
uninterrupted one; KV handoffs never cross models; the packaged SmolLM2 answers in words; a node serves
its topic's checkpoint over HTTP, and one that cannot load it says why and does not join."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoints import load_hf_model, reference_greedy, save_checkpoint, save_tokenizer
from tests.nodes import wait_final

pytest.importorskip("transformers")

VOCAB = {"llama": 512, "qwen2": 300, "qwen3": 1000, "gpt2": 400}  # tests/checkpoints.py's SPECS
PROMPTS = ["Hello world! The year 2024", "Grüße aus München: Äpfel", "中文文本：你好", "def add(x, y):"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One random checkpoint per architecture, each with a trained byte-level BPE beside it."""
    folders = {}
    for kind, vocab in VOCAB.items():
        folder = tmp_path_factory.mktemp(kind)
        save_checkpoint(kind, folder)
        save_tokenizer(folder, vocab)
        folders[kind] = folder
    return folders


def engine_for(path: Path):
    from gpu_worker.engine import Engine

    return Engine("cpu", model=str(path))


def run(batch, arrivals: dict[int, list[tuple[str, list[int], int]]], resume: dict | None = None):
    """Steps ``batch`` until idle, adding each (request id, prompt, max_tokens) at its step; returns each
    request's steps."""
    from scheduler.messages import SamplingParams

    steps: dict[str, list] = {}
    step = 0
    while step <= max(arrivals) or batch.has_work:
        for rid, prompt, max_tokens in arrivals.get(step, []):
            batch.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens),
                              resume_token_ids=(resume or {}).get(rid, ()))
            steps[rid] = []
        for rid, out in batch.step():
            steps[rid].append(out)
        step += 1
    return steps


@pytest.mark.parametrize("kind", list(VOCAB))
def test_staggered_requests_in_one_batch_get_transformers_greedy_tokens(kind, checkpoints):
    from gpu_worker.batch_engine import BatchEngine

    engine = engine_for(checkpoints[kind])
    reference = load_hf_model(checkpoints[kind])
    prompts = [engine.tokenizer.encode(text) for text in PROMPTS]
    arrivals = {0: [("r0", prompts[0], 20)], 2: [("r1", prompts[1], 20)], 3: [("r2", prompts[2], 12)],
                7: [("r3", prompts[3], 20)]}
    steps = run(BatchEngine(engine), arrivals)
    for (rid, prompt, max_tokens) in (a for group in arrivals.values() for a in group):
        tokens = [s.token_id for s in steps[rid] if s.token_id >= 0]
        assert tokens == reference_greedy(reference, prompt, max_tokens, engine.eos_token_ids), rid
    assert len({t for s in steps.values() for t in (x.token_id for x in s)}) > 8  # not one repeated token


def test_a_stream_resumed_after_a_failover_adds_up_to_the_uninterrupted_text(checkpoints):
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.tokenizer import streamed_text

    engine = engine_for(checkpoints["qwen3"])  # the widest vocabulary: multi-byte pieces come out often
    prompt = engine.tokenizer.encode(PROMPTS[2])
    whole = run(BatchEngine(engine), {0: [("r", prompt, 40)]})["r"]
    ids = [s.token_id for s in whole if s.token_id >= 0]
    text = "".join(s.text for s in whole)
    # what was streamed is what the request records, and the whole decode (random weights emit stray
    # bytes, which decode as U+FFFD either way)
    assert text == streamed_text(ids, whole[-1].finish_reason, engine.tokenizer)
    assert text == engine.tokenizer.decode(ids)
    for cut in (1, 7, len(ids) // 2, len(ids) - 1):
        resumed = run(BatchEngine(engine), {0: [("r", prompt, 40)]}, resume={"r": ids[:cut]})["r"]
        assert [s.index for s in resumed][0] == cut
        assert [s.token_id for s in resumed] == [s.token_id for s in whole[cut:]]
        assert "".join(s.text for s in whole[:cut]) + "".join(s.text for s in resumed) == text


def test_kv_handoffs_and_failovers_never_cross_models(checkpoints, tmp_path):
    from gpu_worker.engine import Engine
    from gpu_worker.kv_transfer import HandoffError, check_compatible

    llama, again = engine_for(checkpoints["llama"]), engine_for(checkpoints["llama"])
    check_compatible(llama.config, again.config)  # the same files, the same dtype: one model
    retrained = tmp_path / "llama-other"
    save_checkpoint("llama", retrained, rms_norm_eps=1e-6)  # same sizes, other numbers
    save_tokenizer(retrained, VOCAB["llama"])
    others = [engine_for(retrained), engine_for(checkpoints["qwen2"]), Engine("cpu"),
              Engine("cpu", model=str(checkpoints["llama"]), dtype="bfloat16")]
    for other in others:
        with pytest.raises(HandoffError, match="another model"):
            check_compatible(other.config, llama.config)


def test_the_builtin_model_is_gpt2_for_the_benchmarks_reference():
    """``fdbench model --model tiny`` times transformers' GPT-2 carrying tiny's weights: the same function."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpu_worker.bench import tiny_as_gpt2_config, tiny_as_gpt2_weights
    from gpu_worker.engine import Engine

    engine = Engine("cpu")
    reference = GPT2LMHeadModel(GPT2Config(**tiny_as_gpt2_config(engine.config)))
    reference.load_state_dict(tiny_as_gpt2_weights(engine.model))
    ids = torch.tensor([list("Grüße, world".encode())])
    with torch.no_grad():
        ours, theirs = engine.model(ids), reference.eval()(ids).logits[..., :engine.vocab_size]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_smollm2_answers_the_capital_of_france():
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.engine import Engine

    engine = Engine("cpu", model="smollm2")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(chat), add_special_tokens=False)
    steps = run(BatchEngine(engine), {0: [("paris", prompt, 24)]})["paris"]
    answer = "".join(s.text for s in steps)
    assert "Paris" in answer, answer
    assert steps[-1].finish_reason == "stop"  # it ends by itself, at <|im_end|>


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_nodes_serve_their_topics_checkpoints_over_http(api, node_processes, checkpoints):
    """One topic per architecture, each with a node of its own (started together): a text prompt comes
    back as transformers' greedy continuation of the model's own tokens, with its streamed text."""
    from gpu_worker.model_source import load_tokenizer
    from gpu_worker.tokenizer import streamed_text

    for kind, folder in checkpoints.items():
        created = api.post("/api/v1/topics", {"name": f"real-{kind}", "model": str(folder)})
        assert created.status_code == 201, created.content
        assert created.json()["model"] == str(folder)
    started = {kind: node_processes.start(f"{kind}-a", f"real-{kind}", wait=False) for kind in checkpoints}
    for kind, process in started.items():
        node_processes.wait_alive(f"{kind}-a", f"real-{kind}", process)
    text = "Grüße aus München, 中文"
    for kind in checkpoints:
        answer = api.post(f"/api/v1/topics/real-{kind}/requests",
                          {"prompt": text, "max_tokens": 16, "request_id": f"real-{kind}"})
        assert answer.status_code == 202, answer.content
    for kind, folder in checkpoints.items():
        done = wait_final(api, f"real-{kind}")
        assert done["status"] == "finished" and done["model"] == str(folder), kind
        tokenizer = load_tokenizer(str(folder))
        prompt = tokenizer.encode(text)
        assert done["prompt_tokens"] == len(prompt)
        expected = reference_greedy(load_hf_model(folder), prompt, 16, engine_for(folder).eos_token_ids)
        assert done["output_token_ids"] == expected, kind
        assert done["output_text"] == streamed_text(expected, done["finish_reason"], tokenizer)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_node_that_cannot_load_its_model_says_why_and_does_not_join(api, node_processes, checkpoints,
                                                                     tmp_path, store):
    import shutil

    folder = tmp_path / "soon-broken"
    shutil.copytree(checkpoints["llama"], folder)
    assert api.post("/api/v1/topics", {"name": "broken", "model": str(folder)}).status_code == 201
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    argv = [sys.executable, "manage.py", "fdnode", "--topic", "broken", "--name", "broken-a"]
    result = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent, env=node_processes.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "cannot serve model" in result.stderr and "truncated" in result.stderr, result.stderr
    beats = store.read_heartbeats("broken", ["broken-a"])["broken-a"]
    assert not beats  # it never beat: it did not join
