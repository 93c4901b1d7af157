"""``manage.py fdbench``: each kind runs its workload to the end, prints one JSON object as its last
line, leaves no key behind, and refuses bad options by name. (The figures themselves are measured
by hand; here only that they are there and consistent.)"""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command


def fdbench(*args: str) -> dict:
    out, err = StringIO(), StringIO()
    call_command("fdbench", *args, stdout=out, stderr=err)
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [("scheduler", "--scheduler", "splitwise"), ("splitwise",),
                                  ("scheduler", "--scheduler", "global")])
def test_the_scheduler_workload_completes_every_request_and_cleans_up(redis_conn, argv):
    figures = fdbench(*argv, "--requests", "60")
    assert figures["bench"] == "scheduler"
    assert figures["scheduler"] == (argv[-1] if argv[0] == "scheduler" else "splitwise")
    assert figures["requests"] == figures["completed"] == 60
    assert figures["end_to_end_per_s"] > 0 and figures["seconds"] > 0
    assert [k for k in redis_conn.keys("*") if b"bench-" in k] == []


def test_the_handoff_takes_a_1024_token_prompt(redis_conn):
    figures = fdbench("handoff", "--prompt-tokens", "1024", "--repeats", "2")
    assert figures["bench"] == "handoff" and figures["prompt_tokens"] == 1024
    # keys and values of 4 layers, 4 heads of 32 dims, float32, for every prompt position
    assert figures["bytes"] >= 1024 * 4 * 2 * 4 * 32 * 4
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert [k for k in redis_conn.keys("*") if b"bench-handoff" in k] == []


def test_the_engine_bench_measures_each_concurrency_against_its_static_bound():
    figures = fdbench("engine", "--concurrency", "1,3", "--max-tokens", "6", "--prompt-tokens", "8",
                      "--requests-per-client", "2", "--repeats", "2", "--device", "cpu")
    assert figures["bench"] == "engine" and figures["device"] == "cpu" and figures["model"] == "tiny"
    assert [r["concurrency"] for r in figures["results"]] == [1, 3] and figures["repeats"] == 2
    for result in figures["results"]:
        # the fastest of the level's runs is the one reported
        assert len(result["engine_runs_tokens_per_s"]) == 2
        assert result["tokens_per_s"] == max(result["engine_runs_tokens_per_s"])
        assert result["requests"] == 2 * result["concurrency"] and result["generated_tokens"] > 0
        assert result["tokens_per_s"] > 0 and result["static_bound_tokens_per_s"] > 0
        assert result["fraction_of_bound"] == pytest.approx(
            result["tokens_per_s"] / result["static_bound_tokens_per_s"], rel=0.01)
        # the same static batch with its prefill counted
        assert result["static_batch_tokens_per_s"] > 0
        assert result["fraction_of_static_batch"] == pytest.approx(
            result["tokens_per_s"] / result["static_batch_tokens_per_s"], rel=0.01)
        assert 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"]
        assert 0 < result["itl_p50_ms"] <= result["itl_p99_ms"]


@pytest.mark.parametrize("argv, named", [
    (("engine", "--concurrency", "0"), "--concurrency"),
    (("engine", "--max-tokens", "0"), "--max-tokens"),
    (("engine", "--repeats", "0"), "--repeats"),
    (("engine", "--prompt-tokens", "2040", "--max-tokens", "64"), "--prompt-tokens"),
    (("scheduler", "--requests", "0"), "--requests"),
    (("splitwise", "--requests", "-3"), "--requests"),
    (("handoff", "--prompt-tokens", "2040"), "--prompt-tokens"),
    (("handoff", "--prompt-tokens", "0"), "--prompt-tokens"),
])
def test_bad_options_are_refused_by_name(argv, named):
    with pytest.raises(CommandError, match=named):
        fdbench(*argv)
