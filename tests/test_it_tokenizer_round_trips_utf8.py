"""The byte tokenizer round-trips any text and streams whole characters only."""

import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, ByteTokenizer

TEXTS = ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 👍🏽 and 🇫🇷 flags",
         "mixed: ü€𝄞\n\ttabs", ""]


def test_the_vocabulary_is_bytes_plus_end_of_text() -> None:
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_token_id) == (VOCAB_SIZE, EOS_TOKEN_ID) == (257, 256)


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_the_stream_decoder_yields_whole_characters_only(text: str) -> None:
    decoder = ByteTokenizer().stream_decoder()
    pieces = [decoder.push(token) for token in text.encode("utf-8")]
    assert "".join(pieces) + decoder.flush() == text
    for piece in pieces:  # each piece re-encodes to complete characters, nothing half-done
        assert "\ufffd" not in piece


def test_a_four_byte_emoji_arrives_in_one_piece() -> None:
    decoder = ByteTokenizer().stream_decoder()
    assert [decoder.push(b) for b in "👍".encode()] == ["", "", "", "👍"]


def test_invalid_bytes_decode_with_replacement() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0xFF, 0x41]) == "\ufffdA"
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"  # a character cut short
    decoder = tokenizer.stream_decoder()
    assert decoder.push(0xE2) == ""
    assert decoder.push(0x41) == "\ufffdA"
    assert decoder.push(0xF0) == ""
    assert decoder.flush() == "\ufffd"


def test_end_of_text_is_skipped() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0x68, EOS_TOKEN_ID, 0x69]) == "hi"
    assert tokenizer.stream_decoder().push(EOS_TOKEN_ID) == ""


def test_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError):
        ByteTokenizer().decode([300])
    with pytest.raises(ValueError):
        ByteTokenizer().stream_decoder().push(-1)


def test_the_tokenizer_does_not_import_torch() -> None:
    code = "import sys, gpu_worker.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True,
                   timeout=60)
