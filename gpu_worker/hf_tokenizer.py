"""The tokenizer of a real model: encode, decode, stream text token by token, and render chats.

Design note. Encoding and decoding run in the Rust ``tokenizers.Tokenizer``; this module adds what a
server needs around it. ``HFTokenizer.from_dir`` reads a Hugging Face checkpoint's ``tokenizer.json``
as it stands (its post-processor decides whether a BOS is added, as transformers does when that file
exists), ``tokenizer_config.json`` for the chat template and the special tokens, and
``generation_config.json`` for every id that ends a generation. ``gpu_worker.gguf_checkpoint`` builds
one from a GGUF file's metadata instead.

Streaming cannot decode one token at a time: a byte-level token may hold half a UTF-8 character, and a
SentencePiece token's leading space depends on what comes before it. ``StreamDecoder`` therefore keeps
a short window of tokens: ``prefix`` (already emitted, there for context) and the tokens after it. On
each push it decodes the window with and without the new tail and emits the difference once it no
longer ends in an unfinished character (U+FFFD). Then the window slides: what was just emitted becomes
the next prefix. The state is only the ids in the window, so replaying the same ids rebuilds it.

Imported by the web tier to count and encode prompts: it must not import torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from gpu_worker.checkpoint_errors import CheckpointError
from gpu_worker.checkpoint_files import read_json_object

CHAT_ROLES = ("system", "user", "assistant")
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class StreamDecoder:
    """Turns generated token ids into text as they arrive.

    ``push`` returns only whole characters ("" while a character or a word's spacing is still open) and
    skips special tokens; the pushes plus a final ``flush`` concatenate to ``HFTokenizer.decode`` of all
    the ids. (One exception, for ids that stop inside a character: byte fallback decodes the whole run
    of byte tokens as U+FFFD then, while the stream has already sent the run's complete characters.)
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []  # the window: emitted context, then tokens not yet emitted
        self._read_offset = 0  # ids[:read_offset] are emitted; ids[read_offset:] are pending

    def push(self, token_id: int) -> str:
        self._tokenizer.check_ids((token_id,))
        if token_id >= self._tokenizer.vocab_size:
            return ""  # a row of the model's embedding past the tokenizer's vocabulary: no text
        self._ids.append(token_id)
        emitted = self._tokenizer.decode(self._ids[: self._read_offset])
        text = self._tokenizer.decode(self._ids)
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT):
            return ""  # an unfinished character, or a special token: wait for more
        # the new prefix is what was pending until now; older ids no longer change the text
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Ends the stream: whatever is pending, an unfinished character as U+FFFD."""
        emitted = self._tokenizer.decode(self._ids[: self._read_offset])
        text = self._tokenizer.decode(self._ids)
        self._ids.clear()
        self._read_offset = 0
        return text[len(emitted):]


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which some chat templates use to mark the assistant's
    part for training masks: rendered as its plain body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which has no place in a prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates are written for (the settings transformers renders them with)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a chat: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class HFTokenizer:
    """A model's tokenizer with its end-of-text ids and chat template.

    ``vocab_size`` counts every id the tokenizer knows, added tokens included; ``eos_token_ids`` are
    all the ids that end a generation, ``eos_token_id`` the primary one.
    """

    def __init__(self, tokenizer: Tokenizer, *, eos_token_ids: Sequence[int], bos_token_id: int | None = None,
                 chat_template: str | None = None, source: str = "") -> None:
        if not eos_token_ids:
            raise CheckpointError(f"{source or 'the tokenizer'}: no end-of-text token is defined")
        self._tokenizer = tokenizer
        self.source = source
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id: int = eos_token_ids[0]
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self._template: Any = None  # compiled on first use

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self._tokenizer.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._tokenizer.id_to_token(self.eos_token_id)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def check_ids(self, ids: Sequence[int]) -> None:
        """A negative id is refused. Ids from ``vocab_size`` on are not: models often have more embedding
        rows than their tokenizer has tokens (padding), and such a row, if generated, has no text."""
        if ids and min(ids) < 0:
            raise ValueError(f"token id {min(ids)} is outside the vocabulary 0..{self.vocab_size - 1}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; ``add_special_tokens`` adds what the tokenizer's post-processor adds (a BOS
        for models that want one). Special tokens written in the text become their ids."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens skipped; bytes that are not whole characters become U+FFFD."""
        ids = list(ids)
        self.check_ids(ids)
        return self._tokenizer.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=True)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat, rendered with the model's own template. ``ValueError`` when the model
        has none, the messages are malformed, or the template refuses them."""
        chat = check_messages(messages)
        if not self.chat_template:
            raise ValueError(f"{self.source or 'this model'} has no chat template: send a plain prompt "
                             "instead")
        try:
            if self._template is None:
                self._template = _chat_environment().from_string(self.chat_template)
            return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         tools=None, documents=None)
        except TemplateError as exc:
            raise ValueError(f"the chat template of {self.source or 'this model'} refused the messages: "
                             f"{exc}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """The tokenizer of a Hugging Face checkpoint directory. ``CheckpointError`` names the file that is
        missing or invalid."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json (the model's tokenizer)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a plain Exception for any parse error
            raise CheckpointError(f"{file} is not a valid tokenizer.json: {exc}") from None
        config = read_json_object(folder / "tokenizer_config.json", missing=None)
        generation = read_json_object(folder / "generation_config.json", missing=None)

        def token_id(value: Any) -> int | None:
            content = value.get("content") if isinstance(value, dict) else value
            return tokenizer.token_to_id(content) if isinstance(content, str) else None

        eos_ids = [token_id(config.get("eos_token"))]
        listed = generation.get("eos_token_id")
        eos_ids += listed if isinstance(listed, list) else [listed]
        eos_ids = list(dict.fromkeys(i for i in eos_ids if isinstance(i, int)))  # ordered, unique
        bos_id = token_id(config.get("bos_token"))
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        return cls(tokenizer, eos_token_ids=eos_ids, bos_token_id=bos_id,
                   chat_template=_chat_template_of(folder, config), source=str(folder))


def _chat_template_of(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja`` (newer checkpoints), else the config's entry (a
    string, or a list of named templates), else ``chat_template.json``."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = read_json_object(folder / "chat_template.json", missing=None).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None
