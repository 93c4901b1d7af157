"""Splitwise with batching engines: a prefill engine batches prefills and exports each prompt's keys
and values after the first token; a decode engine writes them into its paged pool without computing
the prompt again and decodes in its batch, ending exactly as the request run alone would."""

import pytest

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from tests.batching import alone, assert_drained, computed_tokens, mixed_jobs


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


def prefill_all(engine: Engine, jobs) -> tuple[dict, dict]:
    """The prefill side: every job's first step, and the exported KV of those that go on."""
    prefill = BatchEngine(engine, EngineCapacity(num_kv_blocks=64, block_size=4))
    for job in jobs:
        prefill.add_request(job.request_id, engine.tokenizer.encode(job.prompt), job.sampling,
                            prefill_only=True)
    first: dict = {}
    while prefill.has_work:
        for request_id, step in prefill.step():
            first[request_id] = step
    assert_drained(prefill)
    return first, dict(prefill.exported)


def test_decoding_from_handed_over_caches_equals_each_request_alone(engine):
    jobs = mixed_jobs(8, max_tokens=7)
    first, exported = prefill_all(engine, jobs)
    assert len(exported) == sum(1 for job in jobs if first[job.request_id].finish_reason is None)
    decode = BatchEngine(engine, EngineCapacity(num_kv_blocks=64, block_size=4))
    steps = {job.request_id: [first[job.request_id]] for job in jobs}
    with computed_tokens(engine) as counts:
        for job in jobs:
            if job.request_id in exported:
                decode.add_request(job.request_id, engine.tokenizer.encode(job.prompt), job.sampling,
                                   resume_token_ids=[first[job.request_id].token_id],
                                   kv=exported[job.request_id])
        while decode.has_work:
            for request_id, step in decode.step():
                steps[request_id].append(step)
    for job in jobs:
        assert steps[job.request_id] == alone(engine, job), job.request_id
    # No prompt was computed again: a forward pass computed one token per request it decoded, and
    # every step after the first (a token, or the end of text it sampled) cost exactly one.
    assert max(counts) <= len(exported)
    assert sum(counts) == sum(len(s) - 1 for s in steps.values())
    assert_drained(decode)
