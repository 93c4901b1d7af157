"""GGUF files read into a ``Checkpoint``, and their tokenizer.

Design note. A GGUF file is llama.cpp's single-file checkpoint: metadata under llama.cpp's key names
(``llama.embedding_length``, ``tokenizer.ggml.tokens``...) and tensors under its own names, most of
them quantised in blocks along each row. Reading one means three translations:

1. metadata -> a Hugging Face ``config.json`` dict, so one model builder serves both formats;
2. tensor names -> Hugging Face parameter names, and each tensor dequantised to float with
   ``gguf.quants.dequantize`` and its shape reversed (GGUF lists dimensions innermost first);
3. for the ``llama`` architecture only, Q and K rows put back in Hugging Face's order. llama.cpp's
   converter regroups each head's rows so the two halves that rotary embedding rotates together sit
   next to each other (row ``i`` of the first half, then row ``i`` of the second, interleaved), which
   its rotation kernel expects; Hugging Face rotates the first half of a head against the second.
   qwen2 and qwen3 use the split-halves rotation in llama.cpp too, so their rows are left as stored.

The tokenizer is rebuilt from the metadata as a ``tokenizers.Tokenizer`` shaped like the model's own
``tokenizer.json``: byte-level BPE (``tokenizer.ggml.model`` "gpt2") with the vocabulary, merges and
special tokens the file lists and the pre-tokenizer ``tokenizer.ggml.pre`` names, or SentencePiece BPE
("llama") with merges recovered from the pieces' scores.

``inspect_gguf`` and ``gguf_tokenizer`` are torch-free (the web tier calls them); torch is imported
only by ``read_gguf_checkpoint``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.hf_tokenizer import HFTokenizer

if TYPE_CHECKING:
    import torch

    from gpu_worker.checkpoint import Checkpoint

# general.architecture -> config.json ``architectures``
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TENSOR_TYPES = frozenset(GGMLQuantizationType[name] for name in
                         ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"))
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency rope divisors: kept in Checkpoint.metadata

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
SPECIAL = (UNKNOWN, CONTROL)  # added as special tokens: matched whole in text, skipped when decoding
TOKENIZER_MODELS = ("gpt2", "llama")  # tokenizer.ggml.model: byte-level BPE, SentencePiece BPE
# Token texts that end a turn in the chat formats llama.cpp knows; a file names only one eos id.
END_OF_TURN_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                               "<end_of_turn>", "<|end_of_text|>"})

# Pre-tokenizer splits of the models' own tokenizer.json files. All match words, numbers, punctuation
# runs and whitespace; they differ in how many digits make a number and where newlines go.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_WORDS_AND_LINES = r"[^\r\n\p{L}\p{N}]?\p{L}+|{digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _CONTRACTIONS + "|" + _WORDS_AND_LINES.replace("{digits}", r"\p{N}{1,3}")
QWEN2_SPLIT = _CONTRACTIONS + "|" + _WORDS_AND_LINES.replace("{digits}", r"\p{N}")
# tokenizer.ggml.pre -> how _byte_level_bpe splits: GPT-2's split ("default" is what transformers reads
# a file with no better name as), digits one by one then GPT-2's (SmolLM2, StarCoder), Llama 3's, Qwen2's
PRE_TOKENIZERS = {
    "gpt-2": "gpt2", "default": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


def open_gguf(path: str | Path) -> GGUFReader:
    """The file's reader (metadata parsed, tensors memory-mapped, nothing dequantised). ``CheckpointError``
    for a missing, foreign or truncated file."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"GGUF file {file} does not exist")
    try:
        with file.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read: {exc}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(file)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt: the GGUF reader failed with: {exc}") from None
    size = file.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"{file} is truncated: its tensors need {end} bytes, the file has {size}")
    return reader


def metadata_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def inspect_gguf(path: str | Path, reader: GGUFReader | None = None) -> dict[str, Any]:
    """The checkpoint's config in ``config.json`` spelling, after checking that its architecture, tensor
    names and types are ones ``read_gguf_checkpoint`` reads and that its tokenizer can be built. Reads
    metadata only (``reader``: the file already open, as parsing a large vocabulary takes seconds)."""
    reader = reader or open_gguf(path)
    config = config_of(reader, path)
    check_tensors(reader, path)
    check_tokenizer(reader, path)
    return config


def check_tensors(reader: GGUFReader, path: str | Path) -> None:
    for tensor in reader.tensors:
        check_tensor_type(tensor.name, tensor.tensor_type, path)
        if tensor.name != ROPE_FREQS:
            hf_name(tensor.name, path)


def check_tensor_type(name: str, tensor_type: GGMLQuantizationType, path: str | Path) -> None:
    if tensor_type not in TENSOR_TYPES:
        supported = ", ".join(t.name for t in sorted(TENSOR_TYPES))
        raise CheckpointError(f"{path}: tensor {name} has type {tensor_type.name}, which is not supported; "
                              f"supported types: {supported}")


def hf_name(name: str, path: str | Path = "") -> str:
    """The Hugging Face parameter name of GGUF tensor ``name``."""
    stem, _, kind = name.rpartition(".")
    if stem in TOP_TENSORS and kind in ("weight", "bias"):
        return f"{TOP_TENSORS[stem]}.{kind}"
    match = BLOCK_TENSOR.fullmatch(name)
    if match and match[2] in BLOCK_TENSORS:
        return f"model.layers.{match[1]}.{BLOCK_TENSORS[match[2]]}.{match[3]}"
    raise CheckpointError(f"{path}: tensor {name} is not one of a llama/qwen2/qwen3 model's tensors")


def config_of(reader: GGUFReader, path: str | Path) -> dict[str, Any]:
    """The metadata translated into a Hugging Face ``config.json`` dict."""
    arch = metadata_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)} (llama covers Llama 2/3, Mistral, TinyLlama, "
                              "SmolLM2)")

    def required(key: str) -> Any:
        value = metadata_value(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return value

    def rounded(value: float) -> float:
        return float(str(np.float32(value)))  # GGUF stores float32: 1e-05, not 9.999999747378752e-06

    tensors = {t.name: t for t in reader.tensors}
    num_heads = required("attention.head_count")
    num_kv_heads = _one_per_model(metadata_value(reader, f"{arch}.attention.head_count_kv", num_heads),
                                  f"{arch}.attention.head_count_kv", path)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": required("embedding_length"),
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": _one_per_model(num_heads, f"{arch}.attention.head_count", path),
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": rounded(required("attention.layer_norm_rms_epsilon")),
        "rope_theta": rounded(metadata_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": required("context_length"),
        "vocab_size": _vocab_size(tensors, path),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    head_dim = metadata_value(reader, f"{arch}.attention.key_length")
    if head_dim is not None:
        config["head_dim"] = head_dim
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    for name in ("bos", "eos"):
        token_id = metadata_value(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = token_id
    return config


def _one_per_model(value: Any, key: str, path: str | Path) -> int:
    """A per-model count; files for models that vary it per layer list one per layer."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} varies across layers ({value}); only uniform layers "
                                  "are supported")
        value = value[0]
    return int(value)


def _vocab_size(tensors: dict[str, Any], path: str | Path) -> int:
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor token_embd.weight (the token embedding) is missing")
    return int(tensors["token_embd.weight"].shape[-1])  # rows: the outermost dimension comes last


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = metadata_value(reader, f"{arch}.rope.scaling.type")
    factor = metadata_value(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "type": kind, "factor": float(factor)}
    original = metadata_value(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def read_gguf_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """The checkpoint in ``path``, every tensor dequantised to float32 (or ``dtype``, cast one tensor at a
    time so only one float32 copy is alive at once) under its Hugging Face name."""
    import torch

    from gpu_worker.checkpoint import Checkpoint

    reader = open_gguf(path)
    check_tensors(reader, path)
    config = config_of(reader, path)
    dtype = dtype or torch.float32
    tensors: dict[str, torch.Tensor] = {}
    types = Counter(t.tensor_type.name for t in reader.tensors)
    metadata: dict[str, Any] = {"gguf_tensor_types": dict(types),
                                "gguf_name": metadata_value(reader, "general.name")}
    for tensor in reader.tensors:
        weight = _dequantized(tensor)
        if tensor.name == ROPE_FREQS:
            metadata["rope_freqs"] = weight  # [head_dim // 2] divisors of the rotary frequencies
            continue
        name = hf_name(tensor.name, path)
        if config["model_type"] == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
            weight = unpermute_rotary_rows(weight, heads)
        tensors[name] = weight.to(dtype)
    return Checkpoint(config=config, tensors=tensors, source=str(path), metadata=metadata)


def _dequantized(tensor: ReaderTensor) -> torch.Tensor:
    """The tensor as float32 in PyTorch's dimension order ([out, in] for a matrix)."""
    import torch

    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
        values = values.copy()
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the innermost dimension first
    return torch.from_numpy(values.reshape(shape))


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Q or K rows from llama.cpp's interleaved order back to Hugging Face's: within each head, stored row
    ``2i + r`` is Hugging Face row ``r * head_dim / 2 + i`` (r = 0 for the first half, 1 for the second)."""
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *rest)  # [head, i, r, ...]
    return pairs.transpose(1, 2).reshape(weight.shape)  # [head, r, i, ...] -> [out, ...]


def check_tokenizer(reader: GGUFReader, path: Any) -> str:
    """The file's tokenizer model ("gpt2" or "llama"), after checking that ``gguf_tokenizer`` can build it."""
    model = metadata_value(reader, "tokenizer.ggml.model")
    if model is None:
        raise CheckpointError(f"{path} has no tokenizer (GGUF metadata key tokenizer.ggml.model is missing)")
    if model not in TOKENIZER_MODELS:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r} is not supported; supported: "
                              f"{', '.join(TOKENIZER_MODELS)} (byte-level BPE, and SentencePiece BPE)")
    pre = metadata_value(reader, "tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                              f"{', '.join(sorted(PRE_TOKENIZERS))}")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type") + (
            ("tokenizer.ggml.scores",) if model == "llama" else ()):
        if key not in reader.fields:
            raise CheckpointError(f"{path}: GGUF metadata key {key} (part of the tokenizer) is missing")
    return model


def gguf_tokenizer(source: str | Path | GGUFReader) -> HFTokenizer:
    """The tokenizer a GGUF file describes (``source`` is its path or an open reader)."""
    reader = source if isinstance(source, GGUFReader) else open_gguf(source)
    path = source if not isinstance(source, GGUFReader) else getattr(reader.data, "filename", "GGUF file")
    model = check_tokenizer(reader, path)
    tokens: list[str] = metadata_value(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = metadata_value(reader, "tokenizer.ggml.token_type")
    if len(token_types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for "
                              f"{len(tokens)} tokens")
    if model == "gpt2":
        tokenizer = _byte_level_bpe(tokens, metadata_value(reader, "tokenizer.ggml.merges") or [],
                                    metadata_value(reader, "tokenizer.ggml.pre", "default"))
    else:
        unknown = metadata_value(reader, "tokenizer.ggml.unknown_token_id")
        tokenizer = _sentencepiece_bpe(tokens, metadata_value(reader, "tokenizer.ggml.scores"), token_types,
                                       None if unknown is None else tokens[unknown],
                                       metadata_value(reader, "tokenizer.ggml.add_space_prefix", True))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, token_types, strict=True) if kind in SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, token_types, strict=True) if kind == USER_DEFINED])

    bos_id = metadata_value(reader, "tokenizer.ggml.bos_token_id")
    # SentencePiece models add a BOS unless the file says not to (llama.cpp's and transformers' default)
    if metadata_value(reader, "tokenizer.ggml.add_bos_token", model == "llama") and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
    return HFTokenizer(tokenizer, eos_token_ids=_end_of_text_ids(reader, tokens, token_types),
                       bos_token_id=bos_id, chat_template=metadata_value(reader, "tokenizer.chat_template"),
                       source=str(path))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
    kind = PRE_TOKENIZERS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    # Llama 3's tokenizer.json looks a whole word up before merging it ("ignore_merges")
    tokenizer = Tokenizer(BPE(vocab, pairs, ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "digits"))
    if kind == "gpt2":
        tokenizer.pre_tokenizer = byte_level
    elif kind == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           byte_level])
    else:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT), "isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    if kind == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int], unknown: str | None,
                       add_space_prefix: bool) -> Tokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama) as Llama 2's tokenizer.json has it:
    spaces become "▁", a "▁" is put before the text and after each special token, characters the
    vocabulary lacks fall back to their byte tokens ("<0x0A>").

    SentencePiece merges the adjacent pair whose joined piece scores highest; a GGUF file keeps the
    scores, not merges, so the merges are recovered: every way to split a piece into two pieces of the
    vocabulary is a merge, ranked by the joined piece's score."""
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for i, (token, score, kind) in enumerate(zip(tokens, scores, token_types, strict=True)):
        if kind not in (NORMAL, USER_DEFINED):
            continue
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                ranked.append((-score, i, cut))
    ranked.sort()
    merges = [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unknown, fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))  # the space put before the text
    else:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _end_of_text_ids(reader: GGUFReader, tokens: list[str], token_types: list[int]) -> list[int]:
    """The eos id first, then end-of-turn and end-of-message ids, then control tokens that end a turn in
    a known chat format (a file names one eos, a chat model stops at any of them)."""
    ids = [metadata_value(reader, f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    ids += [i for i, (text, kind) in enumerate(zip(tokens, token_types, strict=True))
            if kind == CONTROL and text in END_OF_TURN_TEXTS]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))
