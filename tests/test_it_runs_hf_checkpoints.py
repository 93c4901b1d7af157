"""Hugging Face checkpoints run through the engine's packed forward pass over a paged KV cache give
transformers' logits (within 1e-4) and transformers' greedy tokens: Llama (with Llama 3.1's and linear
RoPE scaling), Mistral, Qwen2, Qwen3 and GPT-2, saved as transformers saves them or as older tools
did (tied heads saved or not, sharded, RoPE spelled either way). A checkpoint that cannot be served
is refused with a message naming the file and what is wrong with it."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.attention import PagedAttention, SequenceChunk, order_for_step
from gpu_worker.checkpoint import INDEX_FILE, CheckpointError, read_hf_checkpoint
from gpu_worker.kv_cache import BlockManager, PagedKVCache
from gpu_worker.models import SUPPORTED_ARCHITECTURES, build_model
from gpu_worker.models.llama import RopeConfig, inverse_frequencies
from tests.checkpoints import MAX_POSITIONS, SPECS, load_hf_model, save_checkpoint

KINDS = list(SPECS)
PROMPTS = ([5, 17, 33, 2, 99, 101, 7, 250, 31, 64, 12, 200], [9, 140, 3, 77, 21, 180, 44])
NUM_GENERATED = 16
BLOCK_SIZE = 4  # small, so that every sequence spans several blocks, interleaved with the other's
ATOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The directory of a checkpoint of ``kind``, saved once for the module."""
    directories: dict[str, Path] = {}

    def directory(kind: str) -> Path:
        if kind not in directories:
            directories[kind] = tmp_path_factory.mktemp(kind)
            save_checkpoint(kind, directories[kind])
        return directories[kind]

    return directory


@dataclass
class Seq:
    """What the block manager needs of a sequence, and how far it is computed."""

    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedRunner:
    """The engine's steps in small: every sequence's uncomputed tokens packed into one forward pass
    over a real paged cache, whose blocks a ``BlockManager`` lends as the sequences grow."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 32) -> None:
        self.model = model
        self.cache = PagedKVCache(model.cache_shape(torch.float32), num_blocks, BLOCK_SIZE)
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False)

    @torch.inference_mode()
    def step(self, seqs: list[Seq]) -> list[torch.Tensor]:
        """Logits [T, V] of the T tokens each sequence computes in this step."""
        for seq in seqs:
            assert self.blocks.grow(seq, len(seq.token_ids))
        chunks = [SequenceChunk(s.block_table, s.num_computed, len(s.token_ids) - s.num_computed)
                  for s in seqs]
        order = order_for_step(chunks)
        token_ids: list[int] = []
        positions: list[int] = []
        starts: dict[int, int] = {}
        for i in order:
            starts[i] = len(token_ids)
            token_ids.extend(seqs[i].token_ids[seqs[i].num_computed:])
            positions.extend(range(seqs[i].num_computed, len(seqs[i].token_ids)))
        attention = PagedAttention.build(self.cache, [chunks[i] for i in order], "cpu")
        logits = self.model.forward_packed(torch.tensor(token_ids), torch.tensor(positions), attention,
                                           torch.arange(len(token_ids)))  # [N, V]: every row, to check all
        for seq in seqs:
            seq.num_computed = len(seq.token_ids)
        return [logits[starts[i]:starts[i] + chunks[i].num_new] for i in range(len(seqs))]


def load(directory: Path, dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    return build_model(read_hf_checkpoint(directory), "cpu", dtype)


def prompt_logits(model: torch.nn.Module) -> torch.Tensor:
    return PagedRunner(model).step([Seq(list(PROMPTS[0]))])[0]  # [T, V]


def assert_matches_transformers(directory: Path, **hf_overrides: Any) -> None:
    with torch.no_grad():
        expected = load_hf_model(directory, **hf_overrides)(torch.tensor([PROMPTS[0]])).logits[0]  # [T, V]
    torch.testing.assert_close(prompt_logits(load(directory)), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def transformers_greedy(reference: torch.nn.Module, prompt: tuple[int, ...], num_tokens: int) -> list[int]:
    """Greedy tokens by full recompute: no cache, no padding, no end-of-text stop."""
    row = list(prompt)
    for _ in range(num_tokens):
        row.append(int(reference(torch.tensor([row])).logits[0, -1].argmax()))
    return row[len(prompt):]


def copy(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / "copy"))


def edit_config(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# -- the same numbers as transformers ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logits_match_transformers(saved: Callable[[str], Path], kind: str) -> None:
    assert_matches_transformers(saved(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_decoding_of_a_batch_matches_transformers(saved: Callable[[str], Path], kind: str) -> None:
    runner = PagedRunner(load(saved(kind)))
    seqs = [Seq(list(prompt)) for prompt in PROMPTS]

    def append_greedy(logits: list[torch.Tensor]) -> None:
        for seq, rows in zip(seqs, logits, strict=True):
            seq.token_ids.append(int(rows[-1].argmax()))

    append_greedy(runner.step(seqs))  # step 1: both prompts prefilled in one packed pass
    for _ in range(NUM_GENERATED - 1):  # steps 2..16: one token of each sequence per step
        append_greedy(runner.step(seqs))
    tables = [s.block_table for s in seqs]
    assert any(b != a + 1 for t in tables for a, b in zip(t, t[1:], strict=False))  # blocks interleaved
    reference = load_hf_model(saved(kind))
    for seq, prompt in zip(seqs, PROMPTS, strict=True):
        expected = transformers_greedy(reference, prompt, NUM_GENERATED)
        assert seq.token_ids[len(prompt):] == expected
        assert len(set(expected)) >= 6, f"greedy output collapsed ({expected}): draw the weights wider"


@pytest.mark.parametrize("option", [{"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}])
def test_gpt2_attention_scale_options_match_transformers(tmp_path: Path, option: dict[str, bool]) -> None:
    save_checkpoint("gpt2", tmp_path, **option)  # the paged attention's own scale is 1/sqrt(head_dim)
    assert_matches_transformers(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_tells_the_engine_its_sizes(saved: Callable[[str], Path], kind: str) -> None:
    config = json.loads((saved(kind) / "config.json").read_text())
    model = load(saved(kind), dtype=None)  # the checkpoint's own dtype
    assert model.vocab_size == config["vocab_size"]
    assert model.max_model_len == MAX_POSITIONS
    shape = model.cache_shape(torch.bfloat16)
    assert shape.num_layers == config.get("num_hidden_layers", config.get("n_layer"))
    assert shape.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not model.training


def test_a_model_loads_in_the_dtype_asked_and_gives_float32_logits(saved: Callable[[str], Path]) -> None:
    model = load(saved("qwen3"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    runner = PagedRunner(model)
    runner.cache = PagedKVCache(model.cache_shape(torch.bfloat16), 8, BLOCK_SIZE)
    logits = runner.step([Seq(list(PROMPTS[0]))])[0]
    assert logits.dtype == torch.float32 and logits.isfinite().all()
    in_float32 = prompt_logits(load(saved("qwen3")))
    assert torch.nn.functional.cosine_similarity(logits, in_float32, dim=-1).min() > 0.95


# -- the ways checkpoints are saved ---------------------------------------------------------------------


def test_a_tied_head_is_read_whether_or_not_the_checkpoint_saved_it(saved: Callable[[str], Path],
                                                                     tmp_path: Path) -> None:
    # Qwen2 ties its head (transformers does not save it); older tools saved it anyway.
    with_head = copy(saved("qwen2"), tmp_path / "qwen2")
    assert "lm_head.weight" not in load_file(with_head / "model.safetensors")
    edit_tensors(with_head, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert_matches_transformers(with_head)
    # A head never saved, with no tie_word_embeddings in the config: the embedding is the head.
    headless = copy(saved("llama"), tmp_path / "llama")
    edit_tensors(headless, lambda t: t.pop("lm_head.weight"))
    edit_config(headless, lambda c: c.pop("tie_word_embeddings"))
    assert_matches_transformers(headless, tie_word_embeddings=True)


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    save_checkpoint("llama", tmp_path, max_shard_size="40KB")
    assert (tmp_path / INDEX_FILE).is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_matches_transformers(tmp_path)


def test_gpt2_tensors_named_without_the_transformer_prefix_are_read(saved: Callable[[str], Path],
                                                                    tmp_path: Path) -> None:
    openai_names = copy(saved("gpt2"), tmp_path)  # as OpenAI's original checkpoints name them

    def strip_prefix(tensors: dict[str, torch.Tensor]) -> None:
        tensors.update({name.removeprefix("transformer."): tensors.pop(name) for name in list(tensors)})

    edit_tensors(openai_names, strip_prefix)
    assert "h.0.attn.c_attn.weight" in load_file(openai_names / "model.safetensors")
    torch.testing.assert_close(prompt_logits(load(openai_names)), prompt_logits(load(saved("gpt2"))),
                               atol=0, rtol=0)


def test_rope_theta_and_rope_scaling_spell_the_same_rope_as_rope_parameters(saved: Callable[[str], Path],
                                                                            tmp_path: Path) -> None:
    def transformers_4_spelling(config: dict[str, Any]) -> None:
        scaling = config.pop("rope_parameters")
        config["rope_theta"] = scaling.pop("rope_theta")
        scaling["type"] = scaling.pop("rope_type")
        config["rope_scaling"] = scaling
        config["torch_dtype"] = config.pop("dtype")

    for kind in ("llama3", "llama_linear"):
        old = copy(saved(kind), tmp_path / kind)
        edit_config(old, transformers_4_spelling)
        torch.testing.assert_close(prompt_logits(load(old, dtype=None)), prompt_logits(load(saved(kind))),
                                   atol=0, rtol=0)


def test_gguf_rope_divisors_give_the_rope_llama3_scaling_gives(saved: Callable[[str], Path]) -> None:
    """llama.cpp stores Llama 3.1's rescaled RoPE as divisors of the plain frequencies (rope_freqs)."""
    checkpoint = read_hf_checkpoint(saved("llama3"))
    rope = checkpoint.config.pop("rope_parameters")
    checkpoint.config["rope_theta"] = rope["rope_theta"]
    llama3 = RopeConfig(rope["rope_theta"], "llama3", rope["factor"], rope["low_freq_factor"],
                        rope["high_freq_factor"], rope["original_max_position_embeddings"])
    plain = inverse_frequencies(RopeConfig(rope["rope_theta"]), checkpoint.config["head_dim"])  # [hd/2]
    scaled = inverse_frequencies(llama3, checkpoint.config["head_dim"])  # [hd/2]
    assert not torch.equal(plain, scaled)
    checkpoint.metadata["rope_freqs"] = plain / scaled
    as_gguf = build_model(checkpoint, "cpu", torch.float32)
    torch.testing.assert_close(prompt_logits(as_gguf), prompt_logits(load(saved("llama3"))), atol=ATOL,
                               rtol=0)


def test_a_sliding_window_no_shorter_than_the_context_is_served(saved: Callable[[str], Path],
                                                                tmp_path: Path) -> None:
    mistral = copy(saved("mistral"), tmp_path / "mistral")
    edit_config(mistral, lambda c: c.update(sliding_window=MAX_POSITIONS))
    qwen2 = copy(saved("qwen2"), tmp_path / "qwen2")  # Qwen2.5's configs: a window given, switched off
    edit_config(qwen2, lambda c: c.update(sliding_window=16, use_sliding_window=False, max_window_layers=0))
    for directory in (mistral, qwen2):
        load(directory)


def test_the_console_and_the_nodes_agree_on_the_supported_architectures() -> None:
    from gpu_worker.model_source import SUPPORTED_ARCHITECTURES as CHECKED_BY_THE_CONSOLE

    assert set(SUPPORTED_ARCHITECTURES) == set(CHECKED_BY_THE_CONSOLE)


# -- what cannot be served ------------------------------------------------------------------------------


def truncate(directory: Path) -> None:
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def pickle_only(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"never unpickled")


def shard_lost(directory: Path) -> None:
    for file in directory.glob("*.safetensors"):
        file.unlink()
    save_checkpoint("llama", directory, max_shard_size="40KB")
    sorted(directory.glob("model-*.safetensors"))[1].unlink()


def config(**changes: Any) -> Callable[[Path], None]:
    return lambda directory: edit_config(directory, lambda c: c.update(changes))


SUPPORTED = ", ".join(SUPPORTED_ARCHITECTURES)
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
QWEN2_SLIDING = dict(use_sliding_window=True, sliding_window=32, max_window_layers=1, layer_types=None)
# case: (checkpoint, what is done to its copy, what the message says)
REFUSALS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "missing path": ("llama", shutil.rmtree, r"checkpoint path .*/copy does not exist"),
    "no config.json": (
        "llama", lambda d: (d / "config.json").unlink(),
        r".*/copy has no config.json: not a Hugging Face checkpoint directory"),
    "config.json not JSON": (
        "llama", lambda d: (d / "config.json").write_text("{"), r".*/copy/config.json is not valid JSON"),
    "truncated safetensors": (
        "llama", truncate,
        r".*/copy/model.safetensors is not a readable safetensors file: truncated: its tensors need \d+ "
        r"bytes, the file has \d+"),
    "pickle only": (
        "llama", pickle_only,
        r".*/copy holds pytorch_model.bin: only safetensors checkpoints are supported \(pytorch_model.bin "
        r"is a pickle"),
    "shard missing": (
        "llama", shard_lost,
        rf".*/copy/{INDEX_FILE} names shard model-00002-of-\d+.safetensors, which is not in .*/copy"),
    "unknown architecture": (
        "llama", config(architectures=["FooForCausalLM"]),
        rf"architecture FooForCausalLM is not supported; supported: {SUPPORTED}$"),
    "unknown rope type": (
        "llama", config(rope_parameters=YARN),
        r"rope_type 'yarn' is not supported; supported: default, linear, llama3"),
    "llama3 rope without its factors": (
        "llama", config(rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        r"RoPE low_freq_factor must be a positive number \(rope_type 'llama3'\), got None"),
    "mistral sliding window": (
        "mistral", config(sliding_window=16),
        r"sliding_window=16 is in effect \(shorter than max_position_embeddings=256\)"),
    "qwen2 sliding window": ("qwen2", config(**QWEN2_SLIDING), r"sliding_window=32 is in effect"),
    "missing tensor": (
        "llama", lambda d: edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        r"tensor model.layers.1.mlp.up_proj.weight is missing"),
    "misshapen tensor": (
        "llama", config(intermediate_size=96),
        r"tensor model.layers.0.mlp.gate_proj.weight has shape \[128, 64\], the config asks for \[96, 64\]"),
    "missing config key": (
        "gpt2", lambda d: edit_config(d, lambda c: c.pop("n_embd")), r"the config lacks 'n_embd'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_checkpoint_that_cannot_be_served_is_refused_clearly(saved: Callable[[str], Path], tmp_path: Path,
                                                               case: str) -> None:
    kind, damage, message = REFUSALS[case]
    directory = copy(saved(kind), tmp_path)
    damage(directory)
    with pytest.raises(CheckpointError) as refused:
        load(directory)
    assert re.search(message, str(refused.value)), str(refused.value)
