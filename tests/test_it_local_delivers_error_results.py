"""Error results (a code and a message, no token) travel like any other result.

The regression: FastDeploy could not deserialise an error result, and the exception dropped the whole
batch of other requests' results with it.
"""

import logging

import pytest

from scheduler.config import SchedulerConfig
from scheduler.interface.in_process import InProcessScheduler
from scheduler.messages import Request, Result


def running(*request_ids: str) -> InProcessScheduler:
    s = InProcessScheduler(SchedulerConfig())
    s.put_requests([Request(request_id, [1, 2]) for request_id in request_ids])
    assert len(s.get_requests(1000, 16, 0, 1000, batch=len(request_ids))) == len(request_ids)
    return s


def token(request_id: str, index: int, *, finished: bool = False) -> Result:
    return Result(request_id, index=index, token_id=100 + index, text=chr(97 + index), finished=finished,
                  finish_reason="length" if finished else None)


def test_error_results_among_token_results_are_all_delivered() -> None:
    s = running("a", "b", "c")
    failure = Result.failure("b", "oom", "out of KV blocks")
    s.put_results([token("a", 0), failure, token("c", 0), token("a", 1, finished=True), token("c", 1)])
    results = s.get_results()
    assert results["a"] == [token("a", 0), token("a", 1, finished=True)]
    assert results["b"] == [failure]
    assert results["c"] == [token("c", 0), token("c", 1)]


def test_an_error_result_finishes_only_its_own_request() -> None:
    s = running("a", "b")
    s.put_results([Result.failure("a", "oom", "out of KV blocks")])
    s.get_results()
    assert s.stats()["running"] == 1
    s.put_results([token("b", 0, finished=True)])
    assert s.get_results() == {"b": [token("b", 0, finished=True)]}


def test_a_request_is_forgotten_after_its_error_result_was_taken() -> None:
    s = running("a")
    s.put_results([Result.failure("a", "internal", "boom")])
    assert s.get_results()["a"][0].error == {"code": "internal", "message": "boom"}
    assert s.stats()["running"] == 0
    assert s.put_requests([Request("a", [1])]) == [("a", None)]


def test_results_for_unknown_requests_are_dropped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    s = running("a")
    with caplog.at_level(logging.WARNING, logger="scheduler.interface.in_process"):
        s.put_results([Result.failure("ghost", "oom", "x"), token("a", 0)])
    assert s.get_results() == {"a": [token("a", 0)]}
    assert any("ghost" in record.getMessage() for record in caplog.records)


def test_results_after_the_final_one_are_dropped() -> None:
    s = running("a")
    s.put_results([token("a", 0, finished=True), token("a", 1)])
    assert s.get_results() == {"a": [token("a", 0, finished=True)]}


def test_an_error_result_survives_the_json_round_trip() -> None:
    failure = Result.failure("a#1", "oom", "out of KV blocks")
    parsed = Result.from_json(failure.to_json())
    assert parsed == failure
    assert parsed.is_error and parsed.finished and parsed.token_id is None


def test_results_from_json_are_delivered_in_order() -> None:
    s = running("a", "b")
    wire = [token("a", 0), Result.failure("b", "oom", "x"), token("a", 1, finished=True)]
    s.put_results([Result.from_json(result.to_json()) for result in wire])
    assert s.get_results() == {"a": [wire[0], wire[2]], "b": [wire[1]]}
