"""The error a checkpoint that cannot be served raises, kept free of torch so the web tier can catch it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: the message names the file and what is wrong with it."""
