"""The output text is what a client received token by token, derived from the token ids (so that NUL
bytes, which PostgreSQL text cannot hold, never need storing)."""

from gpu_worker.tokenizer import streamed_text


def test_length_ends_with_the_decoders_flush():
    assert streamed_text([0x41, 0xE2, 0x9C], "length") == "A\ufffd"


def test_every_end_releases_the_dangling_bytes_but_a_running_request_holds_them():
    for reason in ("stop", "cancelled", "expired"):
        assert streamed_text([0x41, 0xE2, 0x9C], reason) == "A\ufffd", reason
    assert streamed_text([0x41, 0xE2, 0x9C], None) == streamed_text([0x41, 0xE2, 0x9C], "") == "A"


def test_nul_and_multibyte_characters_survive():
    assert streamed_text([0x00, *"✓é".encode()], "length") == "\x00✓é"
