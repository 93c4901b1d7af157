"""The Llama family of decoders: Llama 2 and 3, SmolLM2, TinyLlama, Mistral, Qwen2/2.5 and Qwen3.

Design note. These are one architecture with switches: pre-norm blocks of RMSNorm, attention with
rotary position embeddings (RoPE) and grouped-query heads, and a SiLU-gated MLP. Qwen2 adds biases to
the q/k/v projections, Qwen3 an RMSNorm over each head's queries and keys before RoPE, Llama 3.1 a
stretch of RoPE's low frequencies (``rope_type: "llama3"``). ``LlamaConfig.from_checkpoint`` reads all
of it from config.json, in the spellings of transformers 4 (``rope_theta``, ``rope_scaling``) and 5
(``rope_parameters``), and refuses what this decoder would silently get wrong (a sliding window in
effect, another RoPE type, another activation).

At load q/k/v become one projection and gate/up another (their weights concatenated), so a layer
runs four matmuls. RoPE's cos/sin for every position up to ``max_model_len`` are computed once, in
float32, and indexed by each token's position; queries and keys are rotated in float32 too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpu_worker.attention import PagedAttention
from gpu_worker.checkpoint import Checkpoint, CheckpointError
from gpu_worker.kv_cache import CacheShape

ROPE_TYPES = ("default", "linear", "llama3")
QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class RopeConfig:
    theta: float  # base wavelength: frequency i of a head of size d is theta ** (-2i / d)
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear, llama3: how many times the trained context is stretched
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are fully stretched
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    original_max_position_embeddings: int = 8192  # llama3: the context trained on


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int  # logits width (and embedding rows)
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the gated MLP
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads, each shared by num_heads / num_kv_heads query heads
    head_dim: int  # may differ from hidden_size / num_heads (Qwen3)
    rms_norm_eps: float
    max_position_embeddings: int  # context: prompt plus generated tokens
    rope: RopeConfig
    qkv_bias: bool  # q/k/v projections have biases (Qwen2; attention_bias elsewhere)
    o_bias: bool  # the output projection has one (attention_bias; never Qwen2)
    mlp_bias: bool  # gate/up/down have biases (Llama's mlp_bias)
    qk_norm: bool  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    tie_word_embeddings: bool  # the LM head is the embedding matrix

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, architecture: str) -> LlamaConfig:
        """The config of ``checkpoint`` read as ``architecture``; ``CheckpointError`` naming the option
        this decoder does not support."""
        opt = checkpoint.option
        hidden, heads = opt("hidden_size", int), opt("num_attention_heads", int)
        kv_heads = opt("num_key_value_heads", int, heads)
        if heads % kv_heads:
            raise CheckpointError(f"{checkpoint.source}: num_attention_heads={heads} is not a multiple of "
                                  f"num_key_value_heads={kv_heads}")
        activation = opt("hidden_act", str, "silu")
        if activation != "silu":
            raise CheckpointError(f"{checkpoint.source}: hidden_act={activation!r} is not supported "
                                  "(only silu)")
        _check_sliding_window(checkpoint, architecture)
        attention_bias = opt("attention_bias", bool, False)
        lm_head_saved = "lm_head.weight" in checkpoint.tensors
        return cls(
            vocab_size=opt("vocab_size", int), hidden_size=hidden,
            intermediate_size=opt("intermediate_size", int), num_layers=opt("num_hidden_layers", int),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=opt("head_dim", int, hidden // heads),
            rms_norm_eps=opt("rms_norm_eps", float, 1e-6),
            max_position_embeddings=opt("max_position_embeddings", int), rope=_rope_config(checkpoint),
            qkv_bias=attention_bias or architecture == "Qwen2ForCausalLM",
            o_bias=attention_bias and architecture != "Qwen2ForCausalLM",
            mlp_bias=opt("mlp_bias", bool, False), qk_norm=architecture == "Qwen3ForCausalLM",
            # transformers ties when asked (ignoring a saved lm_head); a head never saved is the embedding
            tie_word_embeddings=opt("tie_word_embeddings", bool, False) or not lm_head_saved,
        )


def _check_sliding_window(checkpoint: Checkpoint, architecture: str) -> None:
    """Refuses a sliding window that would hide context this decoder attends to.

    Mistral slides whenever ``sliding_window`` is set; Qwen only with ``use_sliding_window``, and only
    in the layers ``layer_types`` (or ``max_window_layers``) marks. A window no shorter than the
    context changes nothing.
    """
    opt = checkpoint.option
    window = opt("sliding_window", int, None)
    if architecture in QWEN:
        layer_types = opt("layer_types", list, None)
        sliding_layers = ("sliding_attention" in layer_types if layer_types is not None
                          else opt("num_hidden_layers", int) > opt("max_window_layers", int, 0))
        in_effect = opt("use_sliding_window", bool, False) and sliding_layers
    else:
        in_effect = architecture == "MistralForCausalLM"
    max_len = opt("max_position_embeddings", int)
    if in_effect and window is not None and window < max_len:
        raise CheckpointError(f"{checkpoint.source}: sliding_window={window} is in effect (shorter than "
                              f"max_position_embeddings={max_len}); sliding-window attention is not "
                              "supported")


def _rope_config(checkpoint: Checkpoint) -> RopeConfig:
    """RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4)."""
    params = {**checkpoint.option("rope_scaling", dict, {}), **checkpoint.option("rope_parameters", dict, {})}
    source = checkpoint.source
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: rope_parameters differ per layer type; only one RoPE for "
                              "all layers is supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported; supported: "
                              f"{', '.join(ROPE_TYPES)}")

    def number(key: str, default: float | None = None) -> float:
        value = params.get(key, checkpoint.config.get(key, default))  # rope_theta may sit at the top
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{source}: RoPE {key} must be a positive number (rope_type "
                                  f"{rope_type!r}), got {value!r}")
        return float(value)

    if number("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor={params.get('partial_rotary_factor')} is not "
                              "supported (only 1.0)")
    theta = number("rope_theta", 10000.0)
    if rope_type == "default":
        return RopeConfig(theta)
    if rope_type == "linear":
        return RopeConfig(theta, rope_type, factor=number("factor"))
    rope = RopeConfig(theta, rope_type, factor=number("factor"), low_freq_factor=number("low_freq_factor"),
                      high_freq_factor=number("high_freq_factor"),
                      original_max_position_embeddings=int(number("original_max_position_embeddings")))
    if rope.high_freq_factor <= rope.low_freq_factor:
        raise CheckpointError(f"{source}: RoPE high_freq_factor={rope.high_freq_factor} must exceed "
                              f"low_freq_factor={rope.low_freq_factor}")
    return rope


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """RoPE's angular frequency of each pair of a head's dimensions: [head_dim / 2], float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [hd/2]
    inv_freq = 1.0 / (rope.theta ** exponents)  # [hd/2]
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the band
        # between blends the two by where the wavelength falls.
        original = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq  # [hd/2]
        blend = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
        stretched = torch.where(wavelen > original / rope.low_freq_factor, inv_freq / rope.factor, blended)
        return torch.where(wavelen < original / rope.high_freq_factor, inv_freq, stretched)
    return inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [N, heads, hd] with ``cos``/``sin`` [N, hd/2] of each row's position, in float32.
    Dimension i pairs with i + hd/2 (the Hugging Face layout, not interleaved pairs)."""
    cos, sin = cos[:, None], sin[:, None]  # [N, 1, hd/2]
    if x.dtype == torch.float32:  # written into one output: no temporaries, no cat (3x faster on a CPU)
        x1, x2 = x.chunk(2, dim=-1)  # each [N, heads, hd/2]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        out1, out2 = out.chunk(2, dim=-1)
        torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
        return out  # [N, heads, hd]
    x1, x2 = x.float().chunk(2, dim=-1)  # each [N, heads, hd/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)  # [N, heads, hd]


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension; the statistics in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        nh, kvh, hd = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, (nh + 2 * kvh) * hd, bias=config.qkv_bias)  # q, k, v fused
        self.o_proj = nn.Linear(nh * hd, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.sizes = (nh * hd, kvh * hd, kvh * hd)
        self.layer = layer
        self.config = config

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: PagedAttention) -> torch.Tensor:
        N = x.size(0)  # packed tokens of the step
        nh, kvh, hd = self.config.num_heads, self.config.num_kv_heads, self.config.head_dim
        q, k, v = self.qkv(x).split(self.sizes, dim=1)
        q, k, v = q.view(N, nh, hd), k.view(N, kvh, hd), v.view(N, kvh, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # [N, nh, hd], [N, kvh, hd]
        y = attention(self.layer, q, k, v)  # [N, nh, hd]
        return self.o_proj(y.reshape(N, nh * hd))  # [N, C]


class GatedMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        width = config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * width, bias=config.mlp_bias)  # gate, up fused
        self.down = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # each [N, I], views into one [N, 2I]
        # multiplied into silu's fresh output: about 3x faster on the CPU than ``silu(gate) * up``
        # over the two strided views, which made the MLP's elementwise work a tenth of a prefill
        return self.down(F.silu(gate).mul_(up))  # [N, C]


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: PagedAttention) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, attention)  # [N, C]
        return x + self.mlp(self.post_attention_norm(x))  # [N, C]


class Llama(nn.Module):
    """A Llama-family decoder behind the engine's packed, paged interface. Build it with ``load_llama``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        untied = not config.tie_word_embeddings
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if untied else None

    def set_rope_tables(self, device: torch.device | str, divisors: torch.Tensor | None = None) -> None:
        """cos/sin [max_model_len, hd/2] of every position, float32 (not weights: never saved).
        ``divisors`` [hd/2] divide the frequencies further (a GGUF file's ``rope_freqs``)."""
        inv_freq = inverse_frequencies(self.config.rope, self.config.head_dim)  # [hd/2]
        if divisors is not None:
            inv_freq = inv_freq / divisors.float()
        inv_freq = inv_freq.to(device)
        positions = torch.arange(self.max_model_len, device=device).float()  # [L]
        angles = torch.outer(positions, inv_freq)  # [L, hd/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward_packed(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: PagedAttention,
                       logits_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits [M, vocab_size] of the packed rows ``logits_rows`` [M]; ``token_ids`` and
        ``positions`` [N] are the step's new tokens (see ``gpu_worker.attention``)."""
        cos, sin = self.cos[positions], self.sin[positions]  # each [N, hd/2]
        x = self.embed(token_ids)  # [N, C]
        for layer in self.layers:
            x = layer(x, cos, sin, attention)  # [N, C]
        x = self.norm(x.index_select(0, logits_rows))  # [M, C]: only rows that sample
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight  # [V, C]
        return F.linear(x, head).float()  # [M, V]

    def cache_shape(self, dtype: torch.dtype = torch.float32) -> CacheShape:
        return CacheShape(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim, dtype)

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def load_llama(checkpoint: Checkpoint, architecture: str, device: torch.device | str,
               dtype: torch.dtype) -> Llama:
    """The decoder of ``checkpoint`` (read as ``architecture``), its weights in ``dtype`` on ``device``,
    in eval mode. ``CheckpointError`` for an unsupported option or a missing or misshapen tensor.

    A GGUF file gives Llama 3.1's RoPE rescaling as per-frequency divisors (``metadata["rope_freqs"]``,
    llama.cpp's ``rope_freqs.weight``) instead of config keys; they are applied on top of the config's.
    """
    config = LlamaConfig.from_checkpoint(checkpoint, architecture)
    divisors = checkpoint.metadata.get("rope_freqs")
    if divisors is not None and tuple(divisors.shape) != (config.head_dim // 2,):
        raise CheckpointError(f"{checkpoint.source}: rope_freqs has shape {list(divisors.shape)}, the config "
                              f"asks for [{config.head_dim // 2}]")
    with torch.device("meta"):
        model = Llama(config)  # shapes only: the weights come from the checkpoint
    state = {name: t.to(device=device, dtype=dtype) for name, t in _weights(checkpoint, config).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.set_rope_tables(device, divisors)
    return model.requires_grad_(False).eval()


def _weights(checkpoint: Checkpoint, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """``Llama``'s state dict from the checkpoint's Hugging Face names, q/k/v and gate/up concatenated."""
    C, inner, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    take = checkpoint.tensor
    state = {"embed.weight": take("model.embed_tokens.weight", (V, C)),
             "norm.weight": take("model.norm.weight", (C,))}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight", (V, C))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        state[ours + "input_norm.weight"] = take(hf + "input_layernorm.weight", (C,))
        state[ours + "post_attention_norm.weight"] = take(hf + "post_attention_layernorm.weight", (C,))
        state[ours + "attn.qkv.weight"] = torch.cat([take(attn + "q_proj.weight", (q_out, C)),
                                                     take(attn + "k_proj.weight", (kv_out, C)),
                                                     take(attn + "v_proj.weight", (kv_out, C))])
        if config.qkv_bias:
            state[ours + "attn.qkv.bias"] = torch.cat([take(attn + "q_proj.bias", (q_out,)),
                                                       take(attn + "k_proj.bias", (kv_out,)),
                                                       take(attn + "v_proj.bias", (kv_out,))])
        state[ours + "attn.o_proj.weight"] = take(attn + "o_proj.weight", (C, q_out))
        if config.o_bias:
            state[ours + "attn.o_proj.bias"] = take(attn + "o_proj.bias", (C,))
        if config.qk_norm:
            state[ours + "attn.q_norm.weight"] = take(attn + "q_norm.weight", (config.head_dim,))
            state[ours + "attn.k_norm.weight"] = take(attn + "k_norm.weight", (config.head_dim,))
        state[ours + "mlp.gate_up.weight"] = torch.cat([take(mlp + "gate_proj.weight", (inner, C)),
                                                        take(mlp + "up_proj.weight", (inner, C))])
        state[ours + "mlp.down.weight"] = take(mlp + "down_proj.weight", (C, inner))
        if config.mlp_bias:
            state[ours + "mlp.gate_up.bias"] = torch.cat([take(mlp + "gate_proj.bias", (inner,)),
                                                          take(mlp + "up_proj.bias", (inner,))])
            state[ours + "mlp.down.bias"] = take(mlp + "down_proj.bias", (C,))
    return state
