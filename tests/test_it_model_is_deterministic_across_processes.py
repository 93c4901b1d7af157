"""Every process that builds the model gets the same weights, hence the same greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gpu_worker.engine import Engine
from gpu_worker.model import GPTConfig, build_model, weights_digest
from scheduler.messages import SamplingParams

PROMPT = "Once upon a time"
CHILD = """
import json, torch
torch.set_num_threads(1)  # a different thread count must not change anything either
from gpu_worker.engine import Engine
from gpu_worker.model import weights_digest
from scheduler.messages import SamplingParams
engine = Engine("cpu")
steps = engine.generate(engine.tokenizer.encode(PROMPT), SamplingParams(max_tokens=24))
print(json.dumps({"digest": weights_digest(engine.model), "tokens": [s.token_id for s in steps]}))
""".replace("PROMPT", repr(PROMPT))


def test_two_builds_have_identical_weights() -> None:
    first, second = build_model().state_dict(), build_model().state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_a_different_seed_gives_different_weights() -> None:
    assert weights_digest(build_model()) != weights_digest(build_model(GPTConfig(seed=99)))


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model()
    assert torch.equal(torch.rand(3), expected)


def test_another_process_gets_the_same_weights_and_greedy_tokens() -> None:
    engine = Engine("cpu")
    steps = engine.generate(engine.tokenizer.encode(PROMPT), SamplingParams(max_tokens=24))
    tokens = [s.token_id for s in steps]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["digest"] == weights_digest(engine.model)
    assert child["tokens"] == tokens
    assert len(set(tokens)) > 3  # the random model does not just repeat one byte
