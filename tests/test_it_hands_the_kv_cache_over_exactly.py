"""A prefill node hands its KV cache over through Redis and a decode node continues exactly where one
uninterrupted generation would: the same tokens and text, greedy and seeded. Bad handoffs are refused
by name, and a handoff in Redis always expires."""

import json
import struct
import time

import pytest
import safetensors.torch
import torch

from gpu_worker.engine import Engine
from gpu_worker.kv_transfer import (
    HandoffError,
    KVHandoff,
    RedisKVStore,
    cache_from_kv,
    continue_from_handoff,
    decode_handoff,
    encode_handoff,
    first_step,
    prefill_for_handoff,
)
from gpu_worker.model import GPTConfig
from gpu_worker.steps import GenerationStep
from scheduler import keys
from scheduler.messages import SamplingParams

TOPIC = "default"
LONG_PROMPT = ("Splitwise hands the cache over; Ωμέγα and 日本語 travel as bytes. " * 12)[:760]
PROMPTS = ["Hello, world", "héllo wörld — 日本語 🙂 ça va?", LONG_PROMPT]
GREEDY = SamplingParams(max_tokens=24)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=20240917)


@pytest.fixture(scope="module")
def decode_engine() -> Engine:
    """A second engine with the same config: the decode node shares nothing with the prefill one."""
    return Engine("cpu")


@pytest.fixture
def kv_store(redis_conn) -> RedisKVStore:
    return RedisKVStore(redis_conn)


def hand_over(engine: Engine, decode_engine: Engine, kv_store: RedisKVStore, prompt: str,
              sampling: SamplingParams) -> list[GenerationStep]:
    """Token 0 from the prefill node, then the decode node's steps after a trip through Redis."""
    prompt_ids = engine.tokenizer.encode(prompt)
    handoff = prefill_for_handoff(engine, prompt_ids, sampling)
    kv_store.put(TOPIC, "req#1 ü", handoff, ttl_s=30)
    received = kv_store.get(TOPIC, "req#1 ü", decode_engine.device, decode_engine.config)
    assert received is not None
    decoded = continue_from_handoff(decode_engine, received, prompt_ids, sampling)
    return [first_step(engine, handoff, sampling), *decoded]


def test_the_long_prompt_is_long_and_fits_the_context() -> None:
    from gpu_worker.model import GPTConfig

    assert 880 <= len(LONG_PROMPT.encode()) <= GPTConfig().block_size - GREEDY.max_tokens


@pytest.mark.parametrize("prompt", PROMPTS, ids=["ascii", "utf8", "long"])
def test_greedy_output_after_a_handoff_equals_local_generation(engine, decode_engine, kv_store,
                                                              prompt: str) -> None:
    expected = list(engine.generate(engine.tokenizer.encode(prompt), GREEDY))
    steps = hand_over(engine, decode_engine, kv_store, prompt, GREEDY)
    assert len(steps) > 1
    assert steps == expected


@pytest.mark.parametrize("prompt", PROMPTS[:2], ids=["ascii", "utf8"])
def test_seeded_sampling_after_a_handoff_equals_local_generation(engine, decode_engine, kv_store,
                                                                prompt: str) -> None:
    expected = list(engine.generate(engine.tokenizer.encode(prompt), SEEDED))
    steps = hand_over(engine, decode_engine, kv_store, prompt, SEEDED)
    assert steps == expected
    greedy_tokens = [s.token_id for s in engine.generate(engine.tokenizer.encode(prompt), GREEDY)]
    assert [s.token_id for s in steps] != greedy_tokens  # it really sampled


def test_a_cancelled_decode_ends_with_the_same_marker(engine, decode_engine, kv_store) -> None:
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    asked = iter([False, False, False, True])
    expected = list(engine.generate(prompt_ids, GREEDY, should_stop=lambda: next(asked)))
    asked = iter([False, False, True])  # the prefill node asked once, before token 0
    handoff = prefill_for_handoff(engine, prompt_ids, GREEDY)
    steps = [first_step(engine, handoff, GREEDY),
             *continue_from_handoff(decode_engine, handoff, prompt_ids, GREEDY, lambda: next(asked))]
    assert steps == expected
    assert steps[-1].finish_reason == "cancelled"


def test_the_first_decode_logits_match_the_in_process_cache(engine, decode_engine, kv_store) -> None:
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    max_len = len(prompt_ids) + GREEDY.max_tokens
    cache, logits = engine.prefill([prompt_ids], max_len)  # [1, V]
    token = int(logits.argmax(dim=-1))
    expected = engine.decode_step(cache, [token])  # [1, V]

    kv_store.put(TOPIC, "r1", prefill_for_handoff(engine, prompt_ids, GREEDY), ttl_s=30)
    received = kv_store.get(TOPIC, "r1", "cpu", decode_engine.config)
    rebuilt = cache_from_kv(received.kv, decode_engine.config, "cpu", max_len)
    assert (received.first_token, rebuilt.length, rebuilt.max_len) == (token, len(prompt_ids), max_len)
    actual = decode_engine.decode_step(rebuilt, [received.first_token])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# --- refusing bad handoffs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw(engine) -> bytes:
    return encode_handoff(prefill_for_handoff(engine, engine.tokenizer.encode("héllo"), GREEDY))


def rewritten(raw: bytes, edit) -> bytes:
    """``raw`` with its tensors changed by ``edit`` and its metadata kept, re-encoded."""
    (header_len,) = struct.unpack_from("<Q", raw)
    metadata = json.loads(raw[8:8 + header_len])["__metadata__"]
    tensors = safetensors.torch.load(raw)
    edit(tensors, metadata)
    return safetensors.torch.save(tensors, metadata=metadata)


@pytest.mark.parametrize(("blob", "message"), [
    (b"this is not a KV handoff, only text", "truncated or not safetensors"),
    (struct.pack("<Q", 6) + b"\xff\xfe{oops", "header is not JSON"),
    (safetensors.torch.save({"w": torch.zeros(2)}), "not a KV handoff"),
    (b"\x10\x00", "truncated: 2 bytes"),
], ids=["text", "not-json", "other-safetensors", "short"])
def test_garbage_is_refused_by_name(blob: bytes, message: str) -> None:
    with pytest.raises(HandoffError, match=message):
        decode_handoff(blob, "cpu")


def test_truncated_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(HandoffError, match="truncated or corrupt"):
        decode_handoff(raw[:-100], "cpu")
    with pytest.raises(HandoffError, match="truncated or not safetensors"):
        decode_handoff(raw[:300], "cpu")


def test_a_missing_tensor_is_named(raw: bytes) -> None:
    blob = rewritten(raw, lambda tensors, metadata: tensors.pop("v.2"))
    with pytest.raises(HandoffError, match=r"missing tensor v\.2"):
        decode_handoff(blob, "cpu")


def test_a_misshapen_tensor_is_named(raw: bytes) -> None:
    def narrow(tensors, metadata) -> None:
        tensors["k.1"] = tensors["k.1"][:, :, :3].contiguous()

    expected = r"tensor k\.1 has shape \[1, 4, 3, 32\], expected \[1, 4, 6, 32\]"
    with pytest.raises(HandoffError, match=expected):
        decode_handoff(rewritten(raw, narrow), "cpu")


def test_a_bad_scalar_field_is_named(raw: bytes) -> None:
    def lose_token(tensors, metadata) -> None:
        del metadata["first_token"]

    with pytest.raises(HandoffError, match="lacks the field first_token"):
        decode_handoff(rewritten(raw, lose_token), "cpu")


def test_a_handoff_from_another_model_is_refused_naming_what_differs(engine, raw: bytes) -> None:
    with pytest.raises(HandoffError, match="another model.*seed: handoff has 1234, this node has 99"):
        decode_handoff(raw, "cpu", GPTConfig(seed=99))
    with pytest.raises(HandoffError, match="n_layer: handoff has 4, this node has 2; n_embd"):
        decode_handoff(raw, "cpu", GPTConfig(n_layer=2, n_embd=64))
    other = Engine("cpu", GPTConfig(n_head=2))
    with pytest.raises(HandoffError, match="n_head: handoff has 4, this node has 2"):
        continue_from_handoff(other, decode_handoff(raw, "cpu"), engine.tokenizer.encode("héllo"), GREEDY)


def test_a_handoff_for_another_prompt_is_refused(engine, raw: bytes) -> None:
    with pytest.raises(HandoffError, match="another prompt"):
        continue_from_handoff(engine, decode_handoff(raw, "cpu"), engine.tokenizer.encode("hallo!"), GREEDY)


# --- Redis and the wire ---------------------------------------------------------------------------

def test_a_stored_handoff_expires_and_can_be_deleted(engine, kv_store, redis_conn) -> None:
    handoff = prefill_for_handoff(engine, engine.tokenizer.encode("ttl"), GREEDY)
    written = kv_store.put(TOPIC, "a#b/ç", handoff, ttl_s=30)
    key = keys.kv_handoff(TOPIC, "a#b/ç")
    assert key == "fd:{default}:kv:a#b/ç"
    assert written == redis_conn.strlen(key)
    assert 0 < redis_conn.pttl(key) <= 30_000
    assert kv_store.get(TOPIC, "a#b/ç", "cpu") is not None
    assert kv_store.delete(TOPIC, "a#b/ç") is True
    assert kv_store.get(TOPIC, "a#b/ç", "cpu") is None
    assert kv_store.get(TOPIC, "never-written", "cpu") is None

    kv_store.put(TOPIC, "brief", handoff, ttl_s=0.05)
    time.sleep(0.12)
    assert kv_store.get(TOPIC, "brief", "cpu") is None
    with pytest.raises(ValueError, match="must expire"):
        kv_store.put(TOPIC, "forever", handoff, ttl_s=0)


def test_the_wire_is_a_json_header_and_raw_tensor_bytes_not_pickle(engine, raw: bytes) -> None:
    (header_len,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "fdconsole.kv-handoff"
    assert all(isinstance(value, str) for value in header["__metadata__"].values())
    tensor_names = sorted(name for name in header if name != "__metadata__")
    assert tensor_names == sorted(f"{kind}.{layer}" for kind in "kv" for layer in range(4))
    assert {header[name]["dtype"] for name in tensor_names} == {"F32"}
    data_bytes = sum(4 * torch.Size(header[name]["shape"]).numel() for name in tensor_names)
    assert len(raw) == 8 + header_len + data_bytes  # nothing but the header and the tensors
    assert not raw.startswith(b"\x80")  # pickle's protocol marker


def test_a_half_precision_handoff_keeps_its_dtype(engine) -> None:
    handoff = prefill_for_handoff(engine, engine.tokenizer.encode("bf16"), GREEDY)
    half = KVHandoff(kv={name: t.to(torch.bfloat16) for name, t in handoff.kv.items()},
                     first_token=handoff.first_token, prompt_len=handoff.prompt_len,
                     prompt_digest=handoff.prompt_digest, config=handoff.config, dtype="bfloat16")
    received = decode_handoff(encode_handoff(half), "cpu", engine.config)
    assert received.dtype == "bfloat16"
    assert all(torch.equal(received.kv[name], half.kv[name]) for name in half.kv)
    assert cache_from_kv(received.kv, engine.config, "cpu", 20).k[0].dtype == torch.bfloat16
