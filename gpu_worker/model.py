"""A small GPT (nanoGPT's layout) with a preallocated KV cache.

Design note: with no checkpoint every node builds its weights from ``GPTConfig.seed``, so all nodes
run the same model. The weights are drawn as integers from a local CPU ``torch.Generator`` and scaled
with exact float arithmetic, which makes them bit-identical in every process and on every CPU (torch's
``normal_`` uses vectorised transcendentals whose last bits differ between AVX2 and plain builds). They
are uniform with nanoGPT's standard deviations instead of normal: for a random model that is no loss.

Batches of different lengths are left-padded: every row shares one write position in the cache, and
a row's first ``pad`` slots are padding that no real query attends to.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpu_worker.attention import PagedAttention
from gpu_worker.kv_cache import CacheShape


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 2048  # context length: prompt plus generated tokens
    vocab_size: int = 257  # 256 UTF-8 bytes plus end of text; logits are exactly this wide
    vocab_multiple: int = 64  # the embedding is padded up to a multiple of this, for faster matmuls
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream; a multiple of n_head
    seed: int = 1234  # weights are a pure function of this seed (and the sizes above)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer for a batch, preallocated to ``max_len`` positions.

    ``k[layer]`` and ``v[layer]`` are [batch, n_head, max_len, head_dim]; slots ``0..length-1`` are
    filled. Row ``b`` is left-padded by ``pad[b]`` slots, so its token positions are ``slot - pad[b]``.
    ``GPT.forward`` appends to it; nothing else should.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 pad: list[int] | None = None, dtype: torch.dtype = torch.float32) -> None:
        if not 0 < max_len <= config.block_size:
            raise ValueError(f"max_len must be between 1 and block_size={config.block_size}, got {max_len}")
        shape = (batch, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pad = torch.tensor(pad or [0] * batch, dtype=torch.long, device=device)  # [B]
        self.padded = bool(pad) and any(pad)  # without padding, decode needs no mask at all
        self.length = 0  # slots filled, the same for every row

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def positions(self, num_new: int) -> torch.Tensor:
        """Token positions of the next ``num_new`` slots, per row: [B, num_new]."""
        if self.length + num_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {num_new} slots exceed max_len={self.max_len}")
        slots = torch.arange(self.length, self.length + num_new, device=self.pad.device)  # [T]
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)  # [B, T]; padding slots read position 0

    def attn_mask(self, num_new: int) -> torch.Tensor | None:
        """Which cached slots each new query may attend to: [B, 1, T, length+T], or None for all."""
        if num_new == 1 and not self.padded:
            return None  # one new token at the end of every row sees everything cached
        q_slots = torch.arange(self.length, self.length + num_new, device=self.pad.device)  # [T]
        k_slots = torch.arange(self.length + num_new, device=self.pad.device)  # [S]
        causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
        real = k_slots[None, :] >= self.pad[:, None]  # [B, S]
        # A padding query would see no key at all (NaN); let it see itself. Its output is never used.
        itself = k_slots[None, :] == q_slots[:, None]  # [T, S]
        return (causal[None] & (real[:, None, :] | itself[None]))[:, None]  # [B, 1, T, S]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new keys/values [B, nh, T, hd] of ``layer``; returns all of them so far."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # each [B, nh, length+T, hd]

    def advance(self, num_new: int) -> None:
        """Called once all layers have appended, so that every layer wrote to the same slots."""
        self.length += num_new


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.size()  # batch, new positions, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each [B, T, C]
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, nh, T, hd]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, nh, T, hd]
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, nh, T, hd]
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, nh, T, hd]
        else:
            k, v = kv_cache.append(self.layer, k, v)  # each [B, nh, S, hd], S = cached + T
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, nh, T, hd]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        return self.c_proj(y)

    def forward_packed(self, x: torch.Tensor, attention: PagedAttention) -> torch.Tensor:
        N, C = x.size()  # packed tokens of every sequence in the step, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=1)  # each [N, C]
        shape = (N, self.n_head, C // self.n_head)
        y = attention(self.layer, q.view(shape), k.view(shape), v.view(shape))  # [N, nh, hd]
        return self.c_proj(y.reshape(N, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # [B, T, C]


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, mask)  # [B, T, C]
        return x + self.mlp(self.ln_2(x))  # [B, T, C]

    def forward_packed(self, x: torch.Tensor, attention: PagedAttention) -> torch.Tensor:
        x = x + self.attn.forward_packed(self.ln_1(x), attention)  # [N, C]
        return x + self.mlp(self.ln_2(x))  # [N, C]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        # Not tied to wte, unlike GPT-2: with random weights a tied head mostly repeats the last token
        # (its logit is that embedding's dot product with itself). Untied, greedy output depends on
        # the whole context, so comparing runs across devices and processes actually tests something.
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab_size] for token ids ``idx`` [B, T].

        Without a cache ``idx`` is a whole sequence from position 0. With one, ``idx`` holds the next
        T tokens of every row: they are appended to the cache and attend causally to all of it.
        """
        B, T = idx.size()
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
            pos = torch.arange(T, device=idx.device)[None, :]  # [1, T]
            mask = None
        else:
            pos = kv_cache.positions(T)  # [B, T]
            mask = kv_cache.attn_mask(T)  # [B, 1, T, S] or None
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # [B, T, C]
        for block in self.transformer.h:
            x = block(x, kv_cache, mask)  # [B, T, C]
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.transformer.ln_f(x)  # [B, T, C]
        return self.lm_head(x)[..., : self.config.vocab_size]  # [B, T, V], padding columns dropped

    def forward_packed(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: PagedAttention,
                       logits_rows: torch.Tensor) -> torch.Tensor:
        """The engine's interface: logits [M, vocab_size] of the packed rows ``logits_rows`` [M].

        ``token_ids`` and ``positions`` [N] are the step's new tokens of every sequence, packed
        (see ``gpu_worker.attention``); their keys and values go to the paged cache on the way.
        """
        x = self.transformer.wte(token_ids) + self.transformer.wpe(positions)  # [N, C]
        for block in self.transformer.h:
            x = block.forward_packed(x, attention)  # [N, C]
        x = self.transformer.ln_f(x.index_select(0, logits_rows))  # [M, C]: only rows that sample
        return self.lm_head(x)[:, : self.config.vocab_size]  # [M, V]

    def cache_shape(self, dtype: torch.dtype = torch.float32) -> CacheShape:
        """What one token's keys and values take, for sizing a ``PagedKVCache``."""
        return CacheShape(self.config.n_layer, self.config.n_head, self.config.head_dim, dtype)

    @property
    def max_model_len(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def _uniform_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fills ``param`` uniformly with standard deviation ``std``, the same bits on every machine.

    Integers from the generator are exact; one subtraction and one multiplication in float64, each
    rounded by IEEE rules, then a single rounding to float32 leave nothing platform-dependent.
    """
    half = 2**23
    ints = torch.randint(0, 2 * half, param.shape, generator=generator, dtype=torch.int64)
    bound = std * math.sqrt(3.0)  # U(-b, b) has standard deviation b / sqrt(3)
    values = (ints.to(torch.float64) - (half - 0.5)) * (bound / half)  # in (-bound, bound)
    param.copy_(values.to(torch.float32))


def _init_weights(model: GPT, generator: torch.Generator) -> None:
    """nanoGPT's scheme: std 0.02, residual projections scaled down by sqrt(2 * n_layer)."""
    proj_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, param in model.named_parameters():  # a fixed order: the generator's draws follow it
        if name.endswith("c_proj.weight"):
            _uniform_(param, proj_std, generator)
        elif param.dim() >= 2:
            _uniform_(param, 0.02, generator)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
        else:
            nn.init.ones_(param)  # LayerNorm gains


def build_model(config: GPTConfig | None = None, device: torch.device | str = "cpu") -> GPT:
    """The GPT for ``config`` with weights drawn from ``config.seed``, in eval mode on ``device``.

    Every call, in any process, gives bit-identical weights for the same config.
    """
    config = config or GPTConfig()
    # Building runs PyTorch's default initialisers on the global RNG; keep that RNG untouched so
    # that loading a model does not shift anyone else's random numbers.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = GPT(config)
        _init_weights(model, torch.Generator(device="cpu").manual_seed(config.seed))
    return model.to(device).eval()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters, in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
