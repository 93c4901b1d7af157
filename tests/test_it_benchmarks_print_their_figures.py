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


@pytest.mark.parametrize("argv, named", [
    (("scheduler", "--requests", "0"), "--requests"),
    (("splitwise", "--requests", "-3"), "--requests"),
    (("handoff", "--prompt-tokens", "2040"), "--prompt-tokens"),
    (("handoff", "--prompt-tokens", "0"), "--prompt-tokens"),
])
def test_bad_options_are_refused_by_name(argv, named):
    with pytest.raises(CommandError, match=named):
        fdbench(*argv)
