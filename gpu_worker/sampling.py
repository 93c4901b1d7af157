"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), per row of a batch.

Design note: a sampled row draws exactly one uniform number from its generator per step and picks
the token by inverse CDF over the kept probabilities (sorted, most likely first). Because every step
consumes the same amount of randomness whatever the distribution, a generator can be fast-forwarded
to step ``n`` with ``advance_generator(g, n)``: that is what makes a resumed seeded generation equal
to an uninterrupted one. Greedy rows (temperature 0) draw nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scheduler.messages import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed``, or None (torch's default RNG) when there is no seed.

    Engines keep it on the CPU, so a seeded request samples the same tokens on a CPU and a GPU node
    (as far as their logits agree): only one number per step comes from it.
    """
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % 2**64)  # manual_seed takes 0..2**64-1


def advance_generator(generator: torch.Generator | None, steps: int) -> None:
    """Skips the random numbers of ``steps`` sampled steps."""
    for _ in range(steps):
        _uniform(generator)


def check_sampling(params: SamplingParams) -> None:
    """Raises ValueError for parameters ``sample_next`` (or, for ``stop``, the engine) cannot honour."""
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(params.stop)}")
    for s in params.stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string must be a str of 1 to {MAX_STOP_CHARS} characters, "
                             f"got {s!r:.80}")


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token id per row of ``logits`` [B, V]: LongTensor [B] on the logits' device."""
    if not logits.size(0) == len(params) == len(generators):
        raise ValueError(
            f"{logits.size(0)} rows of logits, {len(params)} params and {len(generators)} generators"
        )
    next_ids = logits.argmax(dim=-1)  # [B]; greedy for every row, sampled rows are overwritten below
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if row_params.temperature > 0:
            next_ids[row] = _sample_row(logits[row], row_params, generator)
    return next_ids


def _sample_row(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id (0-d LongTensor) from ``logits`` [V]."""
    scaled = logits.float() / params.temperature  # [V]
    if 0 < params.top_k < scaled.size(0):
        kth = torch.topk(scaled, params.top_k).values[-1]  # the k-th largest logit
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))  # [V]
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True, stable=True)  # each [V]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [V]
    probs = torch.where(mass_before < params.top_p, probs, 0.0)  # [V]; the first token is always kept
    cdf = torch.cumsum(probs, dim=-1)  # [V]
    threshold = _uniform(generator) * cdf[-1]  # renormalises what top-p kept
    num_kept = int((probs > 0).sum())
    pick = int((cdf <= threshold).sum().clamp(max=num_kept - 1))  # rounding must not pick a dropped token
    return order[pick]


def _uniform(generator: torch.Generator | None) -> float:
    """One number in [0, 1) from ``generator`` (on its own device), or from torch's default RNG."""
    if generator is None:
        return float(torch.rand(()))
    return float(torch.rand((), generator=generator, device=generator.device))
