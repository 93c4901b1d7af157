"""A database outage: the console answers 503 for what needs the database (each API in its own error
shape, with Retry-After), nodes keep generating, and afterwards every request's row is right."""

import time

import pytest
from django.test import Client

from fdconsole.inference.models import Request
from tests.outage import children_url, database_outage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgresql]


def submit(api, **body) -> Request:
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "outage", **body})
    assert answer.status_code == 202, answer.content
    return Request.objects.get(request_id=answer.json()["request_id"])


def test_what_needs_the_database_answers_503_while_it_is_down(api, node, admin):
    row = submit(api)
    with database_outage():
        answers = {
            "get": api.get(f"/api/v1/requests/{row.request_id}"),
            "submit": api.post("/api/v1/topics/default/requests", {"prompt": "x"}),
            "openai": api.client.get("/v1/models"),
        }
        home = admin.get("/")
        rq = admin.get("/rq/")  # its middleware asks the database before any view does
        health = Client().get("/healthz")
    for name, answer in answers.items():
        assert answer.status_code == 503, name
        assert answer["Retry-After"] == "5"
    assert answers["get"].json()["error"]["code"] == "database_unavailable"
    assert answers["openai"].json()["error"]["type"] == "server_error"
    assert answers["openai"].json()["error"]["code"] == "database_unavailable"
    assert home.status_code == 503 and b"database is unavailable" in home.content
    assert rq.status_code == 503 and b"database is unavailable" in rq.content
    assert health.status_code == 503 and "database" in health.json()["failed"]
    assert api.get(f"/api/v1/requests/{row.request_id}").status_code == 200  # and back


@pytest.mark.e2e
def test_nodes_keep_generating_through_an_outage_and_every_row_ends_right(api, node, store, node_processes,
                                                                        tmp_path):
    rows = [submit(api, max_tokens=24) for _ in range(4)]
    # about a second of generation each
    node_processes.start("node-a", FD_TOKEN_DELAY_MS="40", DATABASE_URL=children_url(tmp_path))
    with database_outage(tmp_path):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [store.state("default", row.uid) for row in rows]
            if all(state is not None and state.is_final for state in states):
                break
            time.sleep(0.1)
        assert [state.status for state in states] == ["finished"] * 4  # generated while the database was down
        assert api.get(f"/api/v1/requests/{rows[0].request_id}").status_code == 503
    # No node could tell the database: the reconciler (the node's own, as no console runs) writes the rows.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Request.objects.filter(status__in=["queued", "running"]).exists():
        time.sleep(0.2)
    for row, state in zip(rows, states, strict=True):
        row.refresh_from_db()
        assert (row.status, row.output_token_ids) == ("finished", state.output_token_ids)
        assert len(row.output_token_ids) == 24 and row.finished_at is not None
