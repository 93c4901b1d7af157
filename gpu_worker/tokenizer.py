"""Byte-level tokenizer: one token per UTF-8 byte, plus an end-of-text token.

Imported by the web tier to count and encode prompts, so it must not import torch.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from gpu_worker.stop import StopStringStream

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
    """Token ids 0..255 are the UTF-8 bytes of the text; 256 is end of text. No chat template: the
    seeded model was never taught one."""

    vocab_size = VOCAB_SIZE
    prompt_vocab_size = 256  # a prompt holds bytes only: end of text is never part of one
    eos_token_id = EOS_TOKEN_ID
    eos_token_ids = frozenset({EOS_TOKEN_ID})
    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of ``text`` (there are no special tokens to add)."""
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True) -> str:
        raise ValueError("the byte-level model 'tiny' has no chat template: write the prompt itself")

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


class TextStream(Protocol):
    """What ``streamed_text`` needs of a tokenizer's ``stream_decoder()``."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class StreamingTokenizer(Protocol):
    def stream_decoder(self) -> TextStream: ...


def text_stream(tokenizer: StreamingTokenizer | None = None, stop: Sequence[str] = ()) -> StopStringStream:
    """A fresh stream decoder of ``tokenizer`` (default: the byte tokenizer's) whose text ends before the
    first of ``stop``: what the engine streams a request's tokens with, so pushing the same ids gives
    the same pieces anywhere (``streamed_text``, a replay of an expired stream)."""
    return StopStringStream((tokenizer or ByteTokenizer()).stream_decoder(), stop)


def streamed_text(token_ids: Iterable[int], finish_reason: str | None,
                  tokenizer: StreamingTokenizer | None = None, stop: Sequence[str] = ()) -> str:
    """The text a client received from ``tokenizer``'s stream decoder (default: the byte tokenizer's),
    cut at the first of the request's ``stop`` strings as the engine cut it (``gpu_worker.stop``):
    every push, then, once the generation ended (any ``finish_reason``), the flush: the text the end
    released (what was held back as a possible start of a stop string, an unfinished character as
    U+FFFD). At max_tokens the engine puts the flush on the last token; at end of text or a cancel it
    is the end's own text (see ``fdconsole.api.stream``); after a stop string it is empty. A running
    request (``finish_reason`` None) has streamed only the pushes so far."""
    stream = text_stream(tokenizer, stop)
    text = "".join(stream.push(token_id) for token_id in token_ids)
    return text + stream.flush() if finish_reason else text
