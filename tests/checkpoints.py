"""Tiny random Hugging Face checkpoints, built at test time with ``transformers`` (a dev dependency).

Design note. A random model only tests something if its outputs depend on every weight: with
transformers' default initialisation (std 0.02) the residual stream barely moves, logits are nearly
flat and greedy decoding repeats one token whatever the model does. So every matrix is drawn with
std 0.3, norm weights are 1 + 0.1 * noise, and biases (Qwen2's q/k/v, GPT-2's) are noise too: a
loader that drops or misplaces any of them gives different logits. Weights come from a fixed seed,
so a failing comparison fails the same way every run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # every checkpoint here is built locally: never download

WEIGHT_STD = 0.3  # std of every matrix (embeddings included)
SEED = 1234
MAX_POSITIONS = 256

_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
# kind -> (transformers config class, its arguments)
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _LLAMA),
    # Llama 3.1's RoPE: with head_dim 16 and theta 5e5 the wavelengths (6, 32, 167, ...) fall on both
    # sides of original/high (16) and original/low (64), so all three branches of the rescaling run.
    "llama3": ("LlamaConfig", {**_LLAMA, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama_linear": ("LlamaConfig", {**_LLAMA, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "mistral": ("MistralConfig", {**_LLAMA, "sliding_window": None, "num_hidden_layers": 3}),
    "qwen2": ("Qwen2Config", {**_LLAMA, "vocab_size": 300, "tie_word_embeddings": True,
                              "use_sliding_window": False}),
    # head_dim 32 is not hidden_size / heads (16): q/k/v are wider than the residual stream
    "qwen3": ("Qwen3Config", {**_LLAMA, "head_dim": 32, "vocab_size": 1000, "attention_bias": True,
                              "use_sliding_window": False}),
    "gpt2": ("GPT2Config", dict(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                            bos_token_id=399, eos_token_id=399)),
}


def build_hf_model(kind: str, **overrides: Any) -> torch.nn.Module:
    """A random transformers model of ``kind`` (a key of SPECS), wide weights, float32, eval mode."""
    import transformers

    class_name, arguments = SPECS[kind]
    config = getattr(transformers, class_name)(**{**arguments, **overrides}, initializer_range=WEIGHT_STD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _draw_wide(model)
    return model.eval()


def _draw_wide(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            is_norm = "norm" in name or ".ln_" in name or name.startswith(("ln_", "transformer.ln_"))
            if param.dim() >= 2:
                param.normal_(0.0, WEIGHT_STD)
                assert 0.2 < param.std() < 0.4, (name, param.std())
            elif is_norm and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:  # a bias: a norm's or a projection's
                param.copy_((0.1 if is_norm else WEIGHT_STD) * torch.randn_like(param))


def save_checkpoint(kind: str, directory: Path, max_shard_size: str | None = None,
                    **overrides: Any) -> torch.nn.Module:
    """Saves a random ``kind`` checkpoint (safetensors) into ``directory``; returns the model saved."""
    import transformers

    model = build_hf_model(kind, **overrides)
    transformers.utils.logging.disable_progress_bar()
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **extra)
    return model


def load_hf_model(directory: Path, **overrides: Any) -> torch.nn.Module:
    """transformers' own reading of the checkpoint in ``directory``: the reference, float32, eval."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             **overrides).eval()


TOKENIZER_TEXT = (
    "Hello world! The year 2024 had 365 days. Grüße aus München: Äpfel, Öl und Übermut, 12 €.\n"
    "中文文本：你好，世界！日本語のテキストです。مرحبا بالعالم 👍🏽 🤖\n"
    "the quick brown fox jumps over the lazy dog. def add(x, y):\n\treturn x + y\n"
)
END_OF_TEXT = "<|endoftext|>"


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE (like GPT-2's) of at most ``vocab_size`` ids, trained in a moment on multilingual
    text, saved beside a checkpoint: ``tokenizer.json``, ``tokenizer_config.json`` (a ChatML template)
    and ``generation_config.json`` (end of text is id 0)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TOKENIZER_TEXT] * 20, trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "eos_token": END_OF_TEXT, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))


def reference_greedy(model: torch.nn.Module, prompt_ids: list[int], max_tokens: int,
                     eos_token_ids: frozenset[int]) -> list[int]:
    """``transformers``' greedy continuation of ``prompt_ids``: up to ``max_tokens`` ids, end of text
    excluded (the engine yields it as a marker, not a token)."""
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos_token_ids:
                break
            out.append(token)
            ids.append(token)
    return out
