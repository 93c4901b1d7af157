"""What an engine yields per generated token; torch-free, so stand-in engines can share it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationStep:
    """One step of ``Engine.generate``: a token, or (``token_id`` -1) a final marker with no token."""

    index: int  # position in the output: 0 for the first generated token
    token_id: int  # the generated token, or -1 for a final marker
    text: str  # text this step completes (whole characters only; may be "")
    finish_reason: str | None = None  # "length", "stop" or "cancelled" on the last step, else None
