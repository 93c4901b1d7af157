"""GPT-2 from a Hugging Face checkpoint, behind the engine's packed, paged interface.

Design note. GPT-2 is nanoGPT's model (``gpu_worker.model``) with learned positions, LayerNorm, a
4x GELU MLP and the LM head tied to the token embedding. Hugging Face stores its projections as
``Conv1D`` weights, [in, out], the transpose of ``nn.Linear``'s; they are transposed once at load.
Checkpoints name tensors ``transformer.h.0.attn.c_attn.weight`` or, as OpenAI's originals do,
``h.0.attn.c_attn.weight``; both are read. The attention scale options (``scale_attn_weights``,
``scale_attn_by_inverse_layer_idx``) are folded into the queries, since the paged attention always
scales by 1/sqrt(head_dim).
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

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int  # logits width (and embedding rows)
    n_positions: int  # context: learned positions
    n_embd: int  # width of the residual stream
    n_layer: int
    n_head: int
    n_inner: int  # width of the MLP
    activation: str  # a key of ACTIVATIONS
    layer_norm_epsilon: float
    scale_attn_weights: bool  # scores divided by sqrt(head_dim) (else not at all)
    scale_attn_by_inverse_layer_idx: bool  # and by layer + 1
    tie_word_embeddings: bool  # the LM head is wte

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> GPT2Config:
        opt = checkpoint.option
        n_embd, n_head = opt("n_embd", int), opt("n_head", int)
        if n_embd % n_head:
            raise CheckpointError(f"{checkpoint.source}: n_embd={n_embd} is not a multiple of "
                                  f"n_head={n_head}")
        activation = opt("activation_function", str, "gelu_new")
        if activation not in ACTIVATIONS:
            raise CheckpointError(f"{checkpoint.source}: activation_function={activation!r} is not "
                                  f"supported; supported: {', '.join(ACTIVATIONS)}")
        if opt("add_cross_attention", bool, False):
            raise CheckpointError(f"{checkpoint.source}: add_cross_attention is not supported "
                                  "(decoders only)")
        return cls(vocab_size=opt("vocab_size", int), n_positions=opt("n_positions", int), n_embd=n_embd,
                   n_layer=opt("n_layer", int), n_head=n_head, n_inner=opt("n_inner", int, 4 * n_embd),
                   activation=activation, layer_norm_epsilon=opt("layer_norm_epsilon", float, 1e-5),
                   scale_attn_weights=opt("scale_attn_weights", bool, True),
                   scale_attn_by_inverse_layer_idx=opt("scale_attn_by_inverse_layer_idx", bool, False),
                   tie_word_embeddings=opt("tie_word_embeddings", bool, True)
                   or "lm_head.weight" not in checkpoint.tensors)

    def query_scale(self, layer: int) -> float:
        """What queries are multiplied by so that 1/sqrt(head_dim) scaling gives the configured one."""
        scale = 1.0 if self.scale_attn_weights else math.sqrt(self.head_dim)
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.query_scale = config.query_scale(layer)
        self.shape = (config.n_head, config.head_dim)
        self.layer = layer

    def forward(self, x: torch.Tensor, attention: PagedAttention) -> torch.Tensor:
        N, C = x.size()  # packed tokens of the step, n_embd
        q, k, v = self.c_attn(x).split(C, dim=1)  # each [N, C]
        if self.query_scale != 1.0:
            q = q * self.query_scale
        y = attention(self.layer, q.view(N, *self.shape), k.view(N, *self.shape), v.view(N, *self.shape))
        return self.c_proj(y.reshape(N, C))  # [N, C]


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))  # [N, C]


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attention: PagedAttention) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attention)  # [N, C]
        return x + self.mlp(self.ln_2(x))  # [N, C]


class GPT2(nn.Module):
    """GPT-2 behind the engine's packed, paged interface. Build it with ``load_gpt2``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        untied = not config.tie_word_embeddings
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False) if untied else None

    def forward_packed(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: PagedAttention,
                       logits_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits [M, vocab_size] of the packed rows ``logits_rows`` [M]; ``token_ids`` and
        ``positions`` [N] are the step's new tokens (see ``gpu_worker.attention``)."""
        x = self.wte(token_ids) + self.wpe(positions)  # [N, C]
        for block in self.h:
            x = block(x, attention)  # [N, C]
        x = self.ln_f(x.index_select(0, logits_rows))  # [M, C]: only rows that sample
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight  # [V, C]
        return F.linear(x, head).float()  # [M, V]

    def cache_shape(self, dtype: torch.dtype = torch.float32) -> CacheShape:
        return CacheShape(self.config.n_layer, self.config.n_head, self.config.head_dim, dtype)

    @property
    def max_model_len(self) -> int:
        return self.config.n_positions

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def load_gpt2(checkpoint: Checkpoint, device: torch.device | str, dtype: torch.dtype) -> GPT2:
    """GPT-2 from ``checkpoint``, its weights in ``dtype`` on ``device``, in eval mode.
    ``CheckpointError`` for an unsupported option or a missing or misshapen tensor."""
    config = GPT2Config.from_checkpoint(checkpoint)
    with torch.device("meta"):
        model = GPT2(config)  # shapes only: the weights come from the checkpoint
    state = {name: t.to(device=device, dtype=dtype) for name, t in _weights(checkpoint, config).items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def _weights(checkpoint: Checkpoint, config: GPT2Config) -> dict[str, torch.Tensor]:
    """``GPT2``'s state dict from the checkpoint's names, Conv1D weights transposed to [out, in]."""
    prefix = "transformer." if "transformer.wte.weight" in checkpoint.tensors else ""
    C, inner, V = config.n_embd, config.n_inner, config.vocab_size

    def take(name: str, *shape: int) -> torch.Tensor:
        return checkpoint.tensor(prefix + name, shape)

    def conv1d(name: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": take(f"{name}.weight", n_in, n_out).t().contiguous(),  # [out, in]
                f"{name}.bias": take(f"{name}.bias", n_out)}

    state = {"wte.weight": take("wte.weight", V, C), "wpe.weight": take("wpe.weight", config.n_positions, C),
             "ln_f.weight": take("ln_f.weight", C), "ln_f.bias": take("ln_f.bias", C)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = checkpoint.tensor("lm_head.weight", (V, C))
    for i in range(config.n_layer):
        h = f"h.{i}."
        for part in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            state[h + part] = take(h + part, C)
        state.update(conv1d(h + "attn.c_attn", C, 3 * C))
        state.update(conv1d(h + "attn.c_proj", C, C))
        state.update(conv1d(h + "mlp.c_fc", C, inner))
        state.update(conv1d(h + "mlp.c_proj", inner, C))
    return state
