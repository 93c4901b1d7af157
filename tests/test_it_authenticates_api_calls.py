"""Every /api/v1/ call needs a valid bearer token of an active user; /healthz needs none; tokens are
stored hashed and ``manage.py fdtoken`` issues working ones."""

from __future__ import annotations

from io import StringIO

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    "/api/v1/topics",
    "/api/v1/topics/default",
    "/api/v1/topics/nope",
    "/api/v1/topics/default/requests",
    "/api/v1/requests/known",
    "/api/v1/requests/unknown",
    "/api/v1/requests/known/stream",
    "/api/v1/nodes",
    "/api/v1/nodes/node-a",
    "/api/v1/nodes/nope",
]
METHODS = ["get", "post", "patch", "delete"]


@pytest.fixture
def known_request(api, node):
    answer = api.post("/api/v1/topics/default/requests",
                      {"prompt": "a", "max_tokens": 1, "request_id": "known"})
    assert answer.status_code == 202, answer.content
    return answer.json()


def call(client: Client, method: str, path: str, **headers):
    body = '{"prompt": "a", "name": "t2", "scheduler_ttl": 5}'
    if method in ("post", "patch"):
        return getattr(client, method)(path, data=body, content_type="application/json", headers=headers)
    return getattr(client, method)(path, headers=headers)


def assert_unauthorized(answer) -> None:
    assert answer.status_code == 401, answer.content
    assert answer["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["code"] == "unauthorized" and error["message"]
    assert "field" not in error


def assert_nothing_changed(store) -> None:
    from fdconsole.inference.models import Request
    from fdconsole.topics.models import Topic

    assert list(Request.objects.values_list("request_id", flat=True)) == ["known"]
    assert Request.objects.get().status == "queued"
    assert list(Topic.objects.values_list("name", flat=True)) == ["default"]
    assert Topic.objects.get().scheduler_ttl == 900
    assert store.queue_length("default", "node-a") == 1


BAD_HEADERS = [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": ""}, id="empty-header"),
    pytest.param({"Authorization": "Bearer"}, id="scheme-only"),
    pytest.param({"Authorization": "Bearer "}, id="empty-token"),
    pytest.param({"Authorization": "Bearer    "}, id="blank-token"),
    pytest.param({"Authorization": "Token {token}"}, id="wrong-scheme"),
    pytest.param({"Authorization": "Basic YWxpY2U6cHctYWxpY2UtMTIz"}, id="basic-auth"),
    pytest.param({"Authorization": "{token}"}, id="token-without-scheme"),
    pytest.param({"Authorization": "Bearer fd_not-a-real-token"}, id="unknown-token"),
    pytest.param({"Authorization": "Bearer {token}x"}, id="token-with-extra-char"),
    pytest.param({"Authorization": "Bearer {prefix}"}, id="token-prefix-only"),
    pytest.param({"Authorization": "Bearer {hash}"}, id="stored-hash-as-token"),
    pytest.param({"X-Api-Key": "{token}"}, id="token-in-another-header"),
]


@pytest.fixture(scope="module")
def client() -> Client:
    """One client for the module: building a client's handler (middleware, static files) is slow."""
    return Client()


def assert_every_call_unauthorized(client: Client, **headers) -> None:
    for method in METHODS:
        for path in ENDPOINTS:
            if path.endswith("/stream") and method != "get":
                continue  # see test_the_stream_checks_the_token_before_the_method
            answer = call(client, method, path, **headers)
            assert answer.status_code == 401, (method, path, answer.content)
            assert_unauthorized(answer)


@pytest.mark.parametrize("headers", BAD_HEADERS)
def test_a_call_without_a_valid_token_is_unauthorized(client, known_request, api_token, store, headers):
    from fdconsole.api.models import ApiToken

    row = ApiToken.objects.get()
    values = {"token": api_token, "prefix": row.prefix, "hash": row.token_hash}
    assert_every_call_unauthorized(client, **{k: v.format(**values) for k, v in headers.items()})
    assert_nothing_changed(store)


def test_a_revoked_token_is_unauthorized(client, known_request, api_token, store):
    from fdconsole.api.models import ApiToken

    ApiToken.objects.update(revoked=True)
    assert_every_call_unauthorized(client, Authorization=f"Bearer {api_token}")
    assert_nothing_changed(store)


def test_the_token_of_an_inactive_user_is_unauthorized(client, known_request, api_user, api_token, store):
    api_user.is_active = False
    api_user.save()
    assert_every_call_unauthorized(client, Authorization=f"Bearer {api_token}")
    assert_nothing_changed(store)


@pytest.mark.parametrize("method", ["post", "patch", "delete"])
def test_the_stream_checks_the_token_before_the_method(client, known_request, method):
    assert_unauthorized(call(client, method, "/api/v1/requests/known/stream"))


def test_a_logged_in_session_is_no_substitute_for_a_token(known_request, api_user, store):
    session = Client()
    session.force_login(api_user)
    assert_every_call_unauthorized(session)
    assert_nothing_changed(store)


@pytest.mark.parametrize(
    "header",
    ["Bearer {token}", "bearer {token}", "BEARER {token}", "Bearer   {token}  "],
)
def test_a_valid_token_is_accepted(client, known_request, api_token, header):
    for path in ("/api/v1/topics", "/api/v1/topics/default", "/api/v1/requests/known", "/api/v1/nodes",
                 "/api/v1/nodes/node-a"):
        answer = client.get(path, headers={"Authorization": header.format(token=api_token)})
        assert answer.status_code == 200, (path, answer.content)


def test_a_valid_token_records_when_it_was_last_used(api, api_token):
    from fdconsole.api.models import ApiToken

    assert ApiToken.objects.get().last_used_at is None
    assert api.get("/api/v1/nodes").status_code == 200
    assert ApiToken.objects.get().last_used_at is not None


def test_revoking_one_token_leaves_the_users_other_tokens_working(client, api_user, api_token):
    from fdconsole.api.models import ApiToken

    _, other = ApiToken.issue(api_user, "other")
    ApiToken.objects.filter(name="tests").update(revoked=True)
    assert client.get("/api/v1/nodes", headers={"Authorization": f"Bearer {api_token}"}).status_code == 401
    assert client.get("/api/v1/nodes", headers={"Authorization": f"Bearer {other}"}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nonsense"}])
def test_healthz_needs_no_token(client, store, headers):
    answer = client.get("/healthz", headers=headers)
    assert answer.status_code == 200, answer.content
    assert answer.json()["status"] == "ok"


def test_tokens_are_stored_hashed(api_user):
    from django.db import connection

    from fdconsole.api.models import ApiToken, hash_token

    plains = [ApiToken.issue(api_user, f"t{i}")[1] for i in range(3)]
    assert len(set(plains)) == 3
    for plain in plains:
        assert plain.startswith("fd_") and len(plain) >= 40
        row = ApiToken.objects.get(token_hash=hash_token(plain))
        assert row.token_hash != plain and plain.startswith(row.prefix) and len(row.prefix) < len(plain) // 2
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiToken._meta.db_table}")
        stored = " ".join(str(value) for row in cursor.fetchall() for value in row)
    for plain in plains:
        assert plain not in stored
        assert plain[10:] not in stored


def run_fdtoken(*args: str) -> tuple[str, str]:
    from django.core.management import call_command

    out, err = StringIO(), StringIO()
    call_command("fdtoken", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def token_works(token: str) -> bool:
    return Client().get("/api/v1/topics", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_fdtoken_creates_the_user_and_prints_a_working_token_last(store):
    from django.contrib.auth import get_user_model

    from fdconsole.api.models import ApiToken

    users = get_user_model().objects
    assert not users.filter(username="bob").exists()
    out, _ = run_fdtoken("--user", "bob")
    first = out.strip().splitlines()[-1].strip()
    bob = users.get(username="bob")
    assert bob.is_active and not bob.has_usable_password()
    assert token_works(first)

    out, _ = run_fdtoken("--user", "bob", "--name", "second")
    second = out.strip().splitlines()[-1].strip()
    assert second != first
    assert token_works(second) and token_works(first)
    assert users.filter(username="bob").count() == 1
    assert ApiToken.objects.filter(user=bob).count() == 2
    assert set(ApiToken.objects.filter(user=bob).values_list("name", flat=True)) == {"fdtoken", "second"}


def test_fdtoken_keeps_an_existing_user_as_it_is(api_user, store):
    out, _ = run_fdtoken("--user", "alice")
    api_user.refresh_from_db()
    assert api_user.check_password("pw-alice-123")
    assert token_works(out.strip().splitlines()[-1])


def test_fdtoken_requires_a_user():
    from django.core.management import CommandError

    with pytest.raises(CommandError):
        run_fdtoken()
