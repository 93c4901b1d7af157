"""The engine streams tokens and ends with length, stop or cancelled; it refuses what cannot fit."""

import pytest
import torch

from gpu_worker.engine import Engine, GenerationStep, resolve_device
from gpu_worker.model import GPT, GPTConfig, KVCache
from scheduler.messages import SamplingParams

EOS = 256


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu", GPTConfig(block_size=64))


class EosAfter(torch.nn.Module):
    """The real model, except that its ``calls``-th forward (1-based) makes end of text certain."""

    def __init__(self, model: GPT, calls: int) -> None:
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        logits = self.model(idx, kv_cache)
        self.calls -= 1
        if self.calls == 0:
            logits[..., EOS] = 1e9
        return logits


def generate(engine: Engine, max_tokens: int = 8, **kwargs) -> list[GenerationStep]:
    prompt = engine.tokenizer.encode("Hi there")
    return list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens), **kwargs))


def test_it_stops_at_max_tokens_with_finish_reason_length(engine: Engine) -> None:
    steps = generate(engine, max_tokens=8)
    assert [s.index for s in steps] == list(range(8))
    assert [s.finish_reason for s in steps] == [None] * 7 + ["length"]
    assert all(0 <= s.token_id < EOS for s in steps)
    assert "".join(s.text for s in steps) == engine.tokenizer.decode([s.token_id for s in steps])


def test_end_of_text_ends_with_a_stop_marker_and_is_not_yielded(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine("cpu", GPTConfig(block_size=64))
    monkeypatch.setattr(engine, "model", EosAfter(engine.model, calls=4))  # prefill + 3 decode steps
    steps = generate(engine, max_tokens=8)
    assert [s.token_id for s in steps[:3]] == [s.token_id for s in generate(Engine("cpu", engine.config), 3)]
    assert steps[-1] == GenerationStep(index=3, token_id=-1, text="", finish_reason="stop")
    assert len(steps) == 4 and all(s.finish_reason is None for s in steps[:3])


def test_should_stop_cancels_between_tokens(engine: Engine) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    steps = generate(engine, max_tokens=8, should_stop=should_stop)
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert steps[-1].token_id == -1 and steps[-1].finish_reason == "cancelled"
    assert all(s.token_id >= 0 and s.finish_reason is None for s in steps[:3])


def test_should_stop_before_the_first_token_yields_only_the_marker(engine: Engine) -> None:
    assert generate(engine, should_stop=lambda: True) == [GenerationStep(0, -1, "", "cancelled")]


def test_prompt_plus_max_tokens_must_fit_the_context(engine: Engine) -> None:
    assert len(list(engine.generate([65] * 60, SamplingParams(max_tokens=4)))) == 4  # exactly 64 fits
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate([65] * 61, SamplingParams(max_tokens=4))  # refused at the call, before iterating


@pytest.mark.parametrize(("prompt", "sampling", "resume"), [
    ([], SamplingParams(), ()),
    ([65, 300], SamplingParams(), ()),
    ([65], SamplingParams(max_tokens=0), ()),
    ([65], SamplingParams(temperature=-1), ()),
    ([65], SamplingParams(top_p=0), ()),
    ([65], SamplingParams(max_tokens=2), (66, 67, 68)),
    ([65], SamplingParams(max_tokens=4), (66, EOS)),
], ids=["empty", "bad-id", "no-tokens", "negative-temperature", "zero-top-p", "resume-too-long",
        "resume-eos"])
def test_bad_input_is_refused(engine: Engine, prompt: list[int], sampling: SamplingParams,
                              resume: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        engine.generate(prompt, sampling, resume_token_ids=resume)


def test_resuming_a_finished_generation_yields_only_the_length_marker(engine: Engine) -> None:
    steps = generate(engine, max_tokens=3)
    resumed = list(engine.generate(engine.tokenizer.encode("Hi there"), SamplingParams(max_tokens=3),
                                   resume_token_ids=[s.token_id for s in steps]))
    assert resumed == [GenerationStep(3, -1, "", "length")]


def test_devices_resolve_or_fail_clearly() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu-please")
    with pytest.raises(ValueError):
        resolve_device("cuda:99")
