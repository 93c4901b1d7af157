"""KV handoff (Splitwise): a prefill node hands one request's KV cache to a decode node, which continues.

Design note: the prefill node runs the prompt, samples token 0 exactly as ``Engine.generate`` would and
ships the filled slots of its KV cache with that token, the prompt's length and digest, and its model
config: a ``KVHandoff``. On the wire it is a safetensors blob: an 8-byte little-endian header length, a
JSON header (each tensor's dtype, shape and offsets, and our scalar fields as strings in
``__metadata__``), then the raw tensor bytes. Never pickle: a blob is data, so a corrupt or hostile one
can fail to parse but cannot run code. Everything is checked on the way in, and the config travels
with the cache because the weights are a pure function of it (``gpu_worker.model``): a decode node with
other weights refuses the handoff, naming the field that differs, instead of continuing from garbage.

A node's batching engine builds and takes handoffs in its paged pool (``BatchEngine`` with
``prefill_only``, and with ``kv``: ``gpu_worker.serving`` moves them). The single-request path here
(``prefill_for_handoff``, ``continue_from_handoff``: the handoff benchmark's) copies the cache into a
``KVCache`` with room for the prompt and ``max_tokens``, skips the one random number token 0 drew from
the request's seeded generator, primes its text decoder with token 0, and continues with
``Engine.decode_step``. Either way the decode side yields, token and text, exactly what an
uninterrupted ``Engine.generate`` yields from index 1 on, greedy or seeded.

In Redis a handoff is one string under ``fd:{topic}:kv:<uid>`` with a mandatory TTL, so a handoff that
no decode node collects does not leak.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import safetensors.torch
import torch
from redis import Redis
from safetensors import SafetensorError

from gpu_worker.engine import Engine
from gpu_worker.model import GPTConfig, KVCache
from gpu_worker.sampling import advance_generator, make_generator
from gpu_worker.steps import GenerationStep
from scheduler import keys
from scheduler.messages import SamplingParams

FORMAT = "fdconsole.kv-handoff"  # metadata["format"]: tells a handoff from any other safetensors blob
FORMAT_VERSION = "1"  # bump when the tensors or fields change meaning
# GPTConfig fields that fix the weights (sizes and seed): two nodes agreeing on all of them agree bit
# for bit on the model, so one's KV cache is valid for the other. A node serving a checkpoint compares
# ``gpu_worker.loader``'s key instead: the cache's sizes, and a seed digesting its files and dtype.
CONFIG_FIELDS = ("block_size", "vocab_size", "vocab_multiple", "n_layer", "n_head", "n_embd", "seed")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HandoffError(ValueError):
    """A KV handoff that cannot be used: unreadable bytes, a missing or misshapen tensor, a model that
    differs from the receiving node's, or a prompt other than the one it was computed for."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to one bool
class KVHandoff:
    """What a prefill node hands a decode node for one request. Checked when built: a ``HandoffError``
    names the first field or tensor that does not fit the others."""

    kv: Mapping[str, torch.Tensor]  # "k.<layer>", "v.<layer>": each [1, n_head, prompt_len, head_dim]
    first_token: int  # token 0 of the output, sampled by the prefill node
    prompt_len: int  # prompt tokens, i.e. filled cache slots
    prompt_digest: str  # prompt_digest(prompt_ids): the decode node checks it got the same prompt
    config: GPTConfig  # the prefill node's model (sizes and seed, see CONFIG_FIELDS)
    dtype: str = "float32"  # of every tensor in kv: a key of DTYPES

    def __post_init__(self) -> None:
        _check_config(self.config)
        if not 1 <= self.prompt_len <= self.config.block_size:
            raise HandoffError(f"prompt_len {self.prompt_len} is outside 1..{self.config.block_size}")
        if not 0 <= self.first_token < self.config.vocab_size:
            raise HandoffError(f"first_token {self.first_token} is outside 0..{self.config.vocab_size - 1}")
        if self.dtype not in DTYPES:
            raise HandoffError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        _check_kv(self.kv, self.config, self.prompt_len, DTYPES[self.dtype])

    @property
    def num_bytes(self) -> int:
        """Bytes of tensor data (the encoded blob adds a header of a few hundred bytes)."""
        return sum(t.numel() * t.element_size() for t in self.kv.values())


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    """SHA-256 of the prompt's token ids, as hex."""
    return hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()


def check_compatible(handoff_config: GPTConfig, config: GPTConfig) -> None:
    """Raises HandoffError, naming every field that differs, unless a handoff computed by a model of
    ``handoff_config`` is valid for one of ``config`` (the same weights)."""
    differ = [f"{name}: handoff has {getattr(handoff_config, name)}, this node has {getattr(config, name)}"
              for name in CONFIG_FIELDS if getattr(handoff_config, name) != getattr(config, name)]
    if differ:
        raise HandoffError("KV handoff comes from another model (" + "; ".join(differ) + ")")


# --- the cache, as tensors --------------------------------------------------------------------------

def kv_from_cache(cache: KVCache, prompt_len: int) -> dict[str, torch.Tensor]:
    """Slots ``0..prompt_len-1`` of a one-row cache, per layer, as CPU contiguous copies for the wire."""
    if cache.batch_size != 1 or cache.padded:
        raise ValueError(f"a handoff carries one unpadded row; this cache has {cache.batch_size} row(s)"
                         + (", padded" if cache.padded else ""))
    if not 1 <= prompt_len <= cache.length:
        raise ValueError(f"prompt_len {prompt_len} is outside the cache's filled slots 1..{cache.length}")
    tensors = {}
    for layer in range(len(cache.k)):
        for kind, per_layer in (("k", cache.k), ("v", cache.v)):
            # copy=True: even on the CPU the wire must not alias a cache that goes on changing.
            tensors[f"{kind}.{layer}"] = per_layer[layer][:, :, :prompt_len].to(
                "cpu", memory_format=torch.contiguous_format, copy=True)  # [1, nh, P, hd]
    return tensors


def cache_from_kv(tensors: Mapping[str, torch.Tensor], config: GPTConfig, device: torch.device | str,
                  max_len: int) -> KVCache:
    """A new one-row KVCache of ``max_len`` slots on ``device`` holding ``tensors`` (from
    ``kv_from_cache``) in its first slots, ready for ``Engine.decode_step``."""
    first = tensors.get("k.0")
    if first is None:
        raise HandoffError("KV handoff is missing tensor k.0")
    prompt_len = first.size(2) if first.dim() == 4 else 0
    _check_kv(tensors, config, prompt_len, first.dtype)
    if prompt_len > max_len:
        raise ValueError(f"{prompt_len} cached positions do not fit a KV cache of {max_len} slots")
    with torch.inference_mode():  # as Engine.prefill: decode steps then write to inference tensors
        cache = KVCache(config, 1, max_len, device, dtype=first.dtype)
        for layer in range(config.n_layer):
            cache.append(layer, tensors[f"k.{layer}"], tensors[f"v.{layer}"])  # copies onto the device
        cache.advance(prompt_len)
    return cache


def _check_config(config: GPTConfig) -> None:
    sizes = {name: getattr(config, name) for name in CONFIG_FIELDS if name != "seed"}
    bad = [f"{name}={value}" for name, value in sizes.items() if value < 1]
    if bad or config.n_embd % config.n_head:
        raise HandoffError(f"KV handoff has an impossible model config: {bad or config}")


def _check_kv(tensors: Mapping[str, torch.Tensor], config: GPTConfig, prompt_len: int,
              dtype: torch.dtype) -> None:
    expected = [f"{kind}.{layer}" for layer in range(config.n_layer) for kind in ("k", "v")]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise HandoffError(f"KV handoff is missing tensor {', '.join(missing)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise HandoffError(f"KV handoff has unexpected tensor {', '.join(extra)} "
                           f"for n_layer={config.n_layer}")
    shape = [1, config.n_head, prompt_len, config.head_dim]
    for name in expected:
        tensor = tensors[name]
        if list(tensor.shape) != shape:
            raise HandoffError(f"KV handoff tensor {name} has shape {list(tensor.shape)}, expected {shape} "
                               "(batch, n_head, prompt_len, head_dim)")
        if tensor.dtype != dtype:
            raise HandoffError(f"KV handoff tensor {name} is {tensor.dtype}, expected {dtype}")


# --- the wire ---------------------------------------------------------------------------------------

def encode_handoff(handoff: KVHandoff) -> bytes:
    """The handoff as safetensors bytes: tensors raw, scalar fields as string metadata."""
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "first_token": str(handoff.first_token),
        "prompt_len": str(handoff.prompt_len),
        "prompt_digest": handoff.prompt_digest,
        "dtype": handoff.dtype,
        **{f"config.{name}": str(getattr(handoff.config, name)) for name in CONFIG_FIELDS},
    }
    tensors = {name: t.to("cpu").contiguous() for name, t in handoff.kv.items()}  # no-ops from kv_from_cache
    return safetensors.torch.save(tensors, metadata=metadata)


def decode_handoff(raw: bytes, device: torch.device | str, config: GPTConfig | None = None) -> KVHandoff:
    """The handoff in ``raw`` with its tensors on ``device``; with ``config``, also checks that it comes
    from that model. Raises HandoffError, naming the problem, for anything else."""
    metadata = _read_metadata(raw)
    handoff_config = GPTConfig(**{name: _int_field(metadata, f"config.{name}") for name in CONFIG_FIELDS})
    if config is not None:
        check_compatible(handoff_config, config)  # before the tensors: the config is enough to refuse
    try:
        tensors = safetensors.torch.load(bytes(raw))
    except SafetensorError as exc:
        raise HandoffError(f"KV handoff is truncated or corrupt: {exc}") from exc
    handoff = KVHandoff(
        kv=tensors,  # checked on the CPU, moved below: a bad blob costs no device copies
        first_token=_int_field(metadata, "first_token"),
        prompt_len=_int_field(metadata, "prompt_len"),
        prompt_digest=_str_field(metadata, "prompt_digest"),
        config=handoff_config,
        dtype=_str_field(metadata, "dtype"),
    )
    if torch.device(device).type == "cpu":
        return handoff
    return replace(handoff, kv={name: t.to(device) for name, t in tensors.items()})


def _read_metadata(raw: bytes) -> dict[str, object]:
    """The ``__metadata__`` of a safetensors blob, read by hand (``safetensors.torch.load`` drops it)."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise HandoffError(f"KV handoff must be bytes, got {type(raw).__name__}")
    if len(raw) < 8:
        raise HandoffError(f"KV handoff is truncated: {len(raw)} bytes, less than the 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", raw)
    if header_len > len(raw) - 8:
        raise HandoffError(f"KV handoff is truncated or not safetensors: its header length says {header_len} "
                           f"bytes but {len(raw) - 8} follow")
    try:
        header = json.loads(bytes(raw[8:8 + header_len]))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise HandoffError(f"KV handoff is garbage: its header is not JSON ({exc})") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise HandoffError(f"not a KV handoff: the safetensors metadata lacks format={FORMAT}")
    if metadata.get("version") != FORMAT_VERSION:
        raise HandoffError(f"KV handoff version {metadata.get('version')!r}; "
                           f"this node reads {FORMAT_VERSION}")
    return metadata


def _str_field(metadata: Mapping[str, object], name: str) -> str:
    value = metadata.get(name)
    if not isinstance(value, str):
        raise HandoffError(f"KV handoff metadata lacks the field {name}")
    return value


def _int_field(metadata: Mapping[str, object], name: str) -> int:
    value = _str_field(metadata, name)
    try:
        return int(value)
    except ValueError:
        raise HandoffError(f"KV handoff metadata field {name} is {value!r}, not an integer") from None


# --- Redis ------------------------------------------------------------------------------------------

class RedisKVStore:
    """Handoffs in Redis (the default transport): one binary string per request, always with a TTL."""

    def __init__(self, redis: Redis) -> None:
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisKVStore needs a client with decode_responses=False: handoffs are bytes")
        self.redis = redis

    def put(self, topic: str, uid: str, handoff: KVHandoff, ttl_s: float) -> int:
        """Stores the handoff for ``ttl_s`` seconds (fractions allowed); returns the bytes written."""
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}: an abandoned handoff must expire")
        raw = encode_handoff(handoff)
        self.redis.set(keys.kv_handoff(topic, uid), raw, px=max(1, math.ceil(ttl_s * 1000)))
        return len(raw)

    def get(self, topic: str, uid: str, device: torch.device | str,
            config: GPTConfig | None = None) -> KVHandoff | None:
        """The stored handoff on ``device`` (checked against ``config`` if given), or None when missing
        or expired. Leaves it in place: the request survives a decode node that dies after reading."""
        raw = self.redis.get(keys.kv_handoff(topic, uid))
        return None if raw is None else decode_handoff(raw, device, config)

    def delete(self, topic: str, uid: str) -> bool:
        """Drops the handoff once the request is done; True if there was one."""
        return bool(self.redis.delete(keys.kv_handoff(topic, uid)))


# --- the engine on each side ------------------------------------------------------------------------

def prefill_for_handoff(engine: Engine, prompt_ids: Sequence[int], sampling: SamplingParams) -> KVHandoff:
    """Prefill node: step 1 (prefill) and token 0, sampled exactly as ``engine.generate`` samples it."""
    prompt_ids = list(prompt_ids)
    engine.check_request(prompt_ids, sampling)
    generator = make_generator(sampling.seed) if sampling.temperature > 0 else None
    # The same cache size as Engine.generate, so that attention runs over identically strided views
    # and the prefill is bit-identical to the one of an uninterrupted run.
    max_len = len(prompt_ids) + sampling.max_tokens
    kv_cache, logits = engine.prefill([prompt_ids], max_len)  # step 1: prefill, logits [1, V]
    kv = kv_from_cache(kv_cache, len(prompt_ids))
    first_token = Engine.sample(logits, sampling, generator)
    return KVHandoff(kv=kv, first_token=first_token, prompt_len=len(prompt_ids),
                     prompt_digest=prompt_digest(prompt_ids), config=engine.config,
                     dtype=str(kv["k.0"].dtype).removeprefix("torch."))


def first_step(engine: Engine, handoff: KVHandoff, sampling: SamplingParams) -> GenerationStep:
    """Prefill node: what ``engine.generate`` yields at index 0 for the handoff's token 0. When it
    carries a finish reason the request is complete and needs no decode node."""
    return engine.step(0, handoff.first_token, sampling, engine.primed_text_stream(sampling))


def continue_from_handoff(engine: Engine, handoff: KVHandoff, prompt_ids: Sequence[int],
                          sampling: SamplingParams,
                          should_stop: Callable[[], bool] | None = None) -> Iterator[GenerationStep]:
    """Decode node: yields what ``engine.generate(prompt_ids, sampling, should_stop)`` yields from index
    1 on (nothing when ``first_step`` already finished the request), same tokens, text and finish.

    Raises at the call, not at the first ``next``: HandoffError when the handoff comes from another
    model or another prompt, ValueError for sampling parameters ``engine.generate`` would refuse.
    """
    prompt_ids = list(prompt_ids)
    check_compatible(handoff.config, engine.config)
    if len(prompt_ids) != handoff.prompt_len or prompt_digest(prompt_ids) != handoff.prompt_digest:
        raise HandoffError(f"KV handoff is for another prompt ({handoff.prompt_len} tokens, digest "
                           f"{handoff.prompt_digest[:12]}), not this one of {len(prompt_ids)} tokens")
    engine.check_request(prompt_ids, sampling)
    return _continue(engine, handoff, sampling, should_stop)


def _continue(engine: Engine, handoff: KVHandoff, sampling: SamplingParams,
              should_stop: Callable[[], bool] | None) -> Iterator[GenerationStep]:
    token_id = handoff.first_token
    # already sent: primes a character split across the handoff, and text held back for a stop string
    decoder = engine.primed_text_stream(sampling, [token_id])
    if token_id in engine.eos_token_ids or sampling.max_tokens == 1 or decoder.stopped:
        return  # token 0 ended it: first_step carried the finish reason
    generator = make_generator(sampling.seed) if sampling.temperature > 0 else None
    if generator is not None:
        advance_generator(generator, 1)  # the one number token 0 drew on the prefill node
    max_len = handoff.prompt_len + sampling.max_tokens  # as Engine.generate's cache
    kv_cache = cache_from_kv(handoff.kv, engine.config, engine.device, max_len)
    yield from engine.continue_decoding(kv_cache, token_id, 1, sampling, generator, decoder, should_stop)
