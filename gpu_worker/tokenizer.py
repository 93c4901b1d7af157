"""Byte-level tokenizer: one token per UTF-8 byte, plus an end-of-text token.

Imported by the web tier to count and encode prompts, so it must not import torch.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

EOS_TOKEN_ID = 256  # end of text; never part of a prompt's UTF-8 bytes
VOCAB_SIZE = 257  # the 256 byte values plus end of text


def _check_token(token_id: int) -> None:
    if not 0 <= token_id < VOCAB_SIZE:
        raise ValueError(f"token id {token_id} is outside the byte vocabulary 0..{VOCAB_SIZE - 1}")


class StreamDecoder:
    """Turns a stream of byte tokens back into text, one token at a time.

    ``push`` returns only whole characters: "" while a multi-byte character is incomplete, then the
    whole character. Invalid bytes become U+FFFD instead of raising. End of text is skipped, as in
    ``ByteTokenizer.decode``, so concatenating every ``push`` and a final ``flush`` equals ``decode``.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        _check_token(token_id)
        if token_id == EOS_TOKEN_ID:
            return ""
        return self._decoder.decode(bytes((token_id,)))

    def flush(self) -> str:
        """Ends the stream: an unfinished character comes out as U+FFFD."""
        return self._decoder.decode(b"", final=True)


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes of the text; 256 is end of text."""

    vocab_size = VOCAB_SIZE
    eos_token_id = EOS_TOKEN_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; end-of-text tokens are skipped and invalid bytes become U+FFFD."""
        data = bytearray()
        for token_id in ids:
            _check_token(token_id)
            if token_id != EOS_TOKEN_ID:
                data.append(token_id)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder()


def streamed_text(token_ids: Iterable[int], finish_reason: str | None) -> str:
    """The text a client received token by token: every push, plus the decoder's flush only when the
    generation ended at max_tokens (the engine puts that flush on the last token; a stop or cancel
    ends with a marker whose flush is not streamed)."""
    decoder = StreamDecoder()
    text = "".join(decoder.push(token_id) for token_id in token_ids)
    return text + decoder.flush() if finish_reason == "length" else text
