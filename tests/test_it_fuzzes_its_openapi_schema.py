"""schemathesis fuzzes both APIs of the real console (on a real port, with a real node) from the schema
the console publishes: calls generated from each operation's schema (valid ones and, for bodies, invalid
ones) never get a server error, and every answer is what the schema says: a documented status, its
content type, a body valid against its response schema, and invalid input refused.

Bounded for the suite: ``EXAMPLES`` calls per operation and generation mode, generations kept short (a
few tokens). README's "API schema" says how to fuzz longer from the command line."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from redis.exceptions import RedisError
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("FD_FUZZ_EXAMPLES", "20"))  # per pass: operation, mode, objects
MAX_GENERATED_TOKENS = 4  # the most a generated body may ask for: the fuzz is about the API, not the model
CALL_TIMEOUT_S = 30


def not_a_server_error_but_a_refusal(ctx, response, case) -> None:
    """schemathesis's ``not_a_server_error``, except the 503s the contract gives for what the fuzzer set
    up itself: a topic it created has no node, or it pointed a topic at a Redis that is not there."""
    if response.status_code < 500:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {}
    message = str(error.get("message", ""))
    expected = response.status_code == 503 and (
        error.get("code") == "no_node_available" or message.startswith("the Redis of topic"))
    assert expected, f"{response.status_code} server error: {response.text[:500]}"


CHECKS = [not_a_server_error_but_a_refusal, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def keep_short(case) -> None:
    """Generated bodies ask for at most ``MAX_GENERATED_TOKENS`` tokens (still valid: at least 1)."""
    if not isinstance(case.body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if is_int(case.body.get(name)) and case.body[name] > MAX_GENERATED_TOKENS:
            case.body[name] = MAX_GENERATED_TOKENS


def on_known_objects(case) -> None:
    """A generated body aimed at topic ``default`` and its byte-level model: the model it names, and
    token ids within its vocabulary (so that calls get as far as the queue and the node)."""
    if not isinstance(case.body, dict):
        return
    if "model" in case.body:
        case.body["model"] = KNOWN["model"]
    for name in ("prompt_token_ids", "prompt"):
        ids = case.body.get(name)
        if isinstance(ids, list) and all(is_int(i) and i >= 0 for i in ids):
            case.body[name] = [i % 256 for i in ids]


def fuzz(operation, mode: GenerationMode, headers: dict[str, str], statuses: Counter, known: bool) -> None:
    """Runs ``EXAMPLES`` generated calls of ``operation`` (``known``: on known objects), counting their
    statuses. Raises the first failure."""
    names = [p["name"] for p in operation.definition.raw.get("parameters", ()) if p["in"] == "path"]
    path_parameters = {name: KNOWN[name] for name in names} if known else None

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        keep_short(case)
        if known and mode == GenerationMode.POSITIVE:
            on_known_objects(case)
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=CALL_TIMEOUT_S)
        statuses[response.status_code] += 1

    run()


def passes(operation) -> list[tuple[str, GenerationMode, bool]]:
    """How to fuzz ``operation``: valid calls, and invalid bodies where it takes one, on generated path
    parameters and models (mostly unknown objects); then again on known ones (``KNOWN``), where the work
    is: the path's objects, or the model an OpenAI-compatible body names (valid bodies only: an invalid
    one is refused before its model is looked up)."""
    raw = operation.definition.raw
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if raw.get("requestBody") else \
        [GenerationMode.POSITIVE]
    runs = [(mode, False) for mode in modes]
    if any(p["in"] == "path" for p in raw.get("parameters", ())):
        runs += [(mode, True) for mode in modes]
    elif raw.get("requestBody") and operation.path.startswith("/v1/"):
        runs.append((GenerationMode.POSITIVE, True))
    return [(f"{operation.label} ({mode.value}{', known' if known else ''})", mode, known)
            for mode, known in runs]


KNOWN = {"topic": "default", "model": "default", "name": "fuzz-a", "request_id": "fuzz-known"}


def reset_default_topic() -> None:
    """Topic ``default`` as it was before a pass changed it (a full queue, another scheduler...)."""
    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import change_topic
    from scheduler.config import SchedulerConfig

    change_topic(Topic.objects.get(name="default"), {"model": "tiny", **SchedulerConfig(
        scheduler_topic="default").as_dict()})


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_generated_calls_get_the_answers_the_schema_documents(console, api_token, node_processes):
    import httpx

    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import topic_store

    node_processes.start("fuzz-a", "default")
    headers = {"Authorization": f"Bearer {api_token}"}
    seeded = httpx.post(f"{console.url}/api/v1/topics/default/requests", headers=headers,
                        json={"prompt": "a", "max_tokens": 2, "request_id": KNOWN["request_id"]})
    assert seeded.status_code == 202, seeded.text
    schema = schemathesis.openapi.from_url(f"{console.url}/api/openapi.json")
    failures: dict[str, str] = {}
    statuses: dict[str, Counter] = {}
    started = time.monotonic()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for label, mode, known in passes(operation):
                statuses[label] = Counter()
                try:
                    fuzz(operation, mode, headers, statuses[label], known)
                except Exception as exc:  # the failure, with schemathesis's reproduction: reported below
                    failures[label] = str(exc)[:3000]
                reset_default_topic()
    finally:
        for name in Topic.objects.exclude(name="default").values_list("name", flat=True):
            with contextlib.suppress(RedisError):  # the fuzzer's topics, wherever it pointed them
                topic_store(name).forget_topic(name)
    calls = sum(sum(counts.values()) for counts in statuses.values())
    print(f"fuzzed {len(statuses)} passes, {calls} calls in {time.monotonic() - started:.1f}s")
    for label, counts in statuses.items():
        print(f"  {label}: {dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in failures.items())
