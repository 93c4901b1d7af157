"""Stop strings: the text a generation streams when it must end at the first of a few given strings.

Design note. ``StopStringStream`` wraps a tokenizer's stream decoder and cuts its text at the first stop
string, as if the text arrived one character at a time: the generation stops as soon as the text holds
one (the match that ends first; of those ending at the same character, the one that starts first), and
neither it nor anything after it is streamed. Text that ends with a proper prefix of a stop string is
held back until the next tokens tell: pushed text either completes the stop string, or shows it was
none and is released. Only the unstreamed text can hold the start of a match: the held-back suffix is
the longest one that could still grow into a stop string, so a match that starts before it would have
had a longer prefix there.

The state (the decoder's window, the held-back text, whether it stopped) is a pure function of the
token ids pushed so far, so a run resumed elsewhere rebuilds it by pushing the ids already streamed,
and every run streams the same concatenated text. The web tier derives a request's output text with
it too (``gpu_worker.tokenizer.streamed_text``): it must not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_worker.tokenizer import TextStream


class StopStringStream:
    """A stream decoder whose text ends before the first of ``stop`` (no stop strings: the decoder's
    text, unchanged).

    ``push`` returns the text to stream for a token; once it has seen a stop string ``stopped`` is True
    and later pushes return "". ``flush`` ends the stream: the held-back text and the decoder's own
    flush (cut at a stop string they would form, though the generation did not end there).
    """

    def __init__(self, decoder: TextStream, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("a stop string must not be empty")
        self._decoder = decoder
        self._stop = tuple(stop)
        self._held = ""  # decoded, not streamed: it ends with the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.push(token_id))

    def flush(self) -> str:
        text = self._held + self._decoder.flush()
        self._held = ""
        if self.stopped:
            return ""
        cut = self._first_stop(text)
        return text if cut is None else text[:cut]

    def _release(self, text: str) -> str:
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = self._open_prefix_len(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def _first_stop(self, text: str) -> int | None:
        """Where the stop string that ends first in ``text`` starts (of those ending together, the
        longest), or None."""
        matches = [(at + len(s), at) for s in self._stop if (at := text.find(s)) >= 0]
        return min(matches)[1] if matches else None

    def _open_prefix_len(self, text: str) -> int:
        """The length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s[n - 1] == text[-1] and text.endswith(s[:n]):  # the cheap test first: per token
                    longest = n
                    break
        return longest
