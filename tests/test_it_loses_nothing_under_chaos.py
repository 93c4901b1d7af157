"""The short chaos run: under a steady load, nodes and the console SIGKILLed, Redis SIGKILLed (once with
its data removed), the database paused; not one accepted request lost, not one token index given twice."""

import json
import subprocess
import sys

import pytest

from tests.nodes import ROOT, children_database_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e, pytest.mark.postgresql]


def test_a_minute_of_chaos_loses_nothing_and_duplicates_no_token():
    # The test database as the cluster's (on PostgreSQL too when the suite runs there): fdcluster migrates
    # and fills it, the test's flush empties it after.
    run = subprocess.run(
        [sys.executable, "manage.py", "fdbench", "chaos", "--minutes", "0.75", "--rate", "2", "--fault-every",
         "5", "--database-url", children_database_url()],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "chaos" and figures["accepted"] >= 30
    assert figures["lost"] == 0, figures["not_finished"]
    assert figures["duplicated_tokens"] == 0
    assert figures["finished"] + figures["expired"] == figures["accepted"]
    assert set(figures["faults"]) == {"kill_node", "kill_console", "kill_redis", "pause_database",
                                      "restart_redis_empty"}
