"""Sampling follows temperature, top-k and top-p; a seed makes it reproducible, resumed or not."""

import pytest
import torch

from gpu_worker.engine import Engine, GenerationStep
from gpu_worker.sampling import make_generator, sample_next
from scheduler.messages import SamplingParams

PROMPT = "Sampling test: "


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


def run(engine: Engine, sampling: SamplingParams, resume: tuple[int, ...] = ()) -> list[GenerationStep]:
    return list(engine.generate(engine.tokenizer.encode(PROMPT), sampling, resume_token_ids=resume))


def tokens(steps: list[GenerationStep]) -> list[int]:
    return [s.token_id for s in steps]


def random_logits(rows: int = 8, vocab: int = 257) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(7)) * 3


def test_top_k_1_and_a_tiny_top_p_are_greedy() -> None:
    logits = random_logits()
    greedy = logits.argmax(dim=-1)
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        generators = [make_generator(seed) for seed in range(len(logits))]
        assert torch.equal(sample_next(logits, [params] * len(logits), generators), greedy)


def test_top_k_and_top_p_only_pick_kept_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = make_generator(1)

    def picks(params: SamplingParams) -> set[int]:
        return {int(sample_next(logits, [params], [generator])) for _ in range(200)}

    assert picks(SamplingParams(temperature=1, top_k=2)) == {0, 1}
    assert picks(SamplingParams(temperature=1, top_p=0.6)) == {0, 1}  # 0.5 alone is short of 0.6


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    generator = make_generator(3)
    picks = [int(sample_next(logits, [SamplingParams(temperature=1)], [generator])) for _ in range(2000)]
    assert abs(picks.count(0) / 2000 - 0.7) < 0.05


def test_top_k_1_generation_equals_greedy(engine: Engine) -> None:
    greedy = run(engine, SamplingParams(max_tokens=16))
    top_k_1 = run(engine, SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=5))
    assert tokens(top_k_1) == tokens(greedy)


def test_same_seed_same_tokens_different_seeds_differ(engine: Engine) -> None:
    sampling = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    assert run(engine, sampling) == run(engine, sampling)
    outputs = {tuple(tokens(run(engine, SamplingParams(max_tokens=16, temperature=1.0, seed=seed))))
               for seed in range(4)}
    assert len(outputs) >= 3


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=20),
    SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=1234),
], ids=["greedy", "seeded"])
def test_a_resumed_generation_equals_an_uninterrupted_one(engine: Engine, sampling: SamplingParams) -> None:
    full = run(engine, sampling)
    assert full[-1].finish_reason == "length"
    for cut in (1, 9, 19):
        assert run(engine, sampling, resume=tuple(tokens(full[:cut]))) == full[cut:]
