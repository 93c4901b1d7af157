"""The authorization matrix: every route and WebSocket of the console, for each kind of caller (anonymous,
the request's owner, another user, a user allowed to view all requests, staff without any permission, a
superuser) and each method, answers the status it should. A route added without a row here fails
``test_every_route_is_in_the_matrix``. Forms refuse a POST without its CSRF token (checks on)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve

from fdconsole.api.models import ApiToken
from tests.test_it_serves_the_console_pages import with_permissions

pytestmark = pytest.mark.django_db(transaction=True)
ROLES = ("anonymous", "owner", "other", "viewer", "staff", "superuser")
OK = {200, 202}


def every(status, **exceptions):
    """{role: status} with ``status`` for every role but those named."""
    return {role: exceptions.get(role, status) for role in ROLES}


PAGE = every(200, anonymous=302)  # any logged-in user; the login page for the rest
OWNED = every(200, anonymous=302, other=404, staff=404)  # the owner and those who may view all
API = every(200, anonymous=401)
API_OWNED = every(200, anonymous=401, other=404, staff=404)
ADMIN_ONLY = every(403, anonymous=401, superuser=200)  # an API change needing topic permissions
STAFF_SITE = every(302, staff=200, superuser=200)  # the admin site and /rq/: staff only


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # {rid}: a request the owner submitted ({fresh}: a new one for each caller)
    expected: dict[str, int | set[int]]
    api: bool = False  # authenticated by the caller's API token, else by its browser session
    body: dict = field(default_factory=dict)


SUBMISSION = {"topic": "default", "prompt": "Hi", "max_tokens": "4", "temperature": "0", "top_p": "1",
              "top_k": "0", "seed": "", "node": "", "input": "prompt"}
MATRIX = [
    # pages (session)
    Row("GET", "/", PAGE), Row("GET", "/topics/default/", PAGE), Row("GET", "/topics/default/config/", PAGE),
    Row("POST", "/topics/default/config/", every(400, anonymous=302, superuser=302),
        body={"scheduler_ttl": "77"}),
    Row("GET", "/requests/", PAGE), Row("GET", "/requests/new/", PAGE),
    Row("POST", "/requests/new/", every(302), body=SUBMISSION),
    Row("GET", "/requests/{rid}/", OWNED), Row("GET", "/requests/{rid}/stream", OWNED),
    Row("POST", "/requests/{fresh}/cancel", every(302, other=404, viewer=403, staff=404)),
    Row("GET", "/requests/{rid}/cancel", every(405, anonymous=302)),
    Row("GET", "/login/", every(200)), Row("POST", "/logout/", every(302)),
    Row("GET", "/admin/", STAFF_SITE), Row("GET", "/admin/nodes/node/", every(302, staff=403, superuser=200)),
    Row("POST", "/admin/nodes/node/", every(302, staff=403),
        body={"action": "disable_nodes", "_selected_action": "{node}"}),
    Row("GET", "/admin/api/apitoken/", every(302, staff=403, superuser=200)),
    Row("GET", "/admin/inference/request/", every(302, staff=403, superuser=200)),
    Row("GET", "/rq/", every(302, staff=403, superuser=200)),  # staff who may view all requests
    Row("GET", "/healthz", every(200)), Row("GET", "/api/openapi.json", every(200)),
    Row("GET", "/api/docs", every(200)),
    # the native API (token)
    Row("GET", "/api/v1/topics", API, api=True), Row("GET", "/api/v1/topics/default", API, api=True),
    Row("POST", "/api/v1/topics", every(403, anonymous=401, superuser=201), api=True,
        body={"name": "t-{role}"}),
    Row("PATCH", "/api/v1/topics/default", ADMIN_ONLY, api=True, body={"scheduler_ttl": "{n}"}),
    Row("PUT", "/api/v1/topics/default", every(405, anonymous=401), api=True),
    Row("POST", "/api/v1/topics/default/requests", every(202, anonymous=401), api=True,
        body={"prompt": "Hi", "max_tokens": 4}),
    Row("GET", "/api/v1/requests/{rid}", API_OWNED, api=True),
    Row("GET", "/api/v1/requests/{rid}/stream", API_OWNED, api=True),
    Row("DELETE", "/api/v1/requests/{fresh}", every(OK, anonymous=401, other=404, viewer=403, staff=404),
        api=True),
    Row("GET", "/api/v1/nodes", API, api=True), Row("GET", "/api/v1/nodes/node-a", API, api=True),
    Row("GET", "/metrics", API, api=True),
    # the OpenAI API (token): a model that is no topic, so that nothing waits for a node
    Row("GET", "/v1/models", API, api=True), Row("GET", "/v1/models/default", API, api=True),
    Row("POST", "/v1/completions", every(404, anonymous=401), api=True,
        body={"model": "nope", "prompt": "x"}),
    Row("POST", "/v1/chat/completions", every(404, anonymous=401), api=True,
        body={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    Row("POST", "/v1/embeddings", every(404, anonymous=401), api=True, body={"model": "default"}),
]
SAMPLED_INCLUDES = ("admin/", "rq/")  # Django's admin and django-rq: covered by the rows under them


@pytest.fixture
def callers(db, store, node):
    """{role: (API client or None, browser or None)} and the owner's ``submit(request_id)``."""
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    made = {"owner": users.create_user("owner"), "other": users.create_user("other"),
            "viewer": with_permissions(users.create_user("viewer"), "inference.view_all_requests"),
            "staff": users.create_user("staff", is_staff=True),
            "superuser": users.create_superuser("root", "root@example.com", "pw-root-123")}
    tokens = {role: ApiToken.issue(user, "matrix")[1] for role, user in made.items()}
    return made, tokens


def client_for(role: str, made, tokens, api: bool) -> Client:
    if role == "anonymous":
        return Client()
    if api:
        return Client(HTTP_AUTHORIZATION=f"Bearer {tokens[role]}")
    browser = Client()
    browser.force_login(made[role])
    return browser


def status_of(row: Row, role: str, made, tokens, node, counter: list[int]) -> int:
    owner = Client(HTTP_AUTHORIZATION=f"Bearer {tokens['owner']}")

    def submitted(request_id: str) -> str:
        answer = owner.post("/api/v1/topics/default/requests", data=json.dumps(
            {"prompt": "owner's prompt", "max_tokens": 4, "request_id": request_id}),
            content_type="application/json")
        assert answer.status_code == 202, answer.content
        return request_id

    path = row.path
    if "{rid}" in path:
        path = path.replace("{rid}", "shared")
    if "{fresh}" in path:
        counter[0] += 1
        path = path.replace("{fresh}", submitted(f"fresh-{counter[0]}"))
    counter[0] += 1  # "{n}": a value no earlier call set, so that every change is a change
    body = {k: (counter[0] + 100 if v == "{n}" else _filled(v, role, node)) for k, v in row.body.items()}
    client = client_for(role, made, tokens, row.api)
    if row.api:
        answer = client.generic(row.method, path, json.dumps(body) if body else "", "application/json")
    elif row.method == "POST":
        answer = client.post(path, body)
    else:
        answer = client.generic(row.method, path)
    return answer.status_code


def _filled(value, role: str, node):
    return value.replace("{role}", role).replace("{node}", str(node.pk)) if isinstance(value, str) else value


def test_the_matrix(callers, node):
    made, tokens = callers
    owner = Client(HTTP_AUTHORIZATION=f"Bearer {tokens['owner']}")
    assert owner.post("/api/v1/topics/default/requests", data=json.dumps(
        {"prompt": "owner's prompt", "max_tokens": 4, "request_id": "shared"}),
        content_type="application/json").status_code == 202
    counter, wrong = [0], []
    for row in MATRIX:
        for role in ROLES:
            expected = row.expected[role]
            got = status_of(row, role, made, tokens, node, counter)
            if got not in (expected if isinstance(expected, set) else {expected}):
                wrong.append(f"{row.method} {row.path} as {role}: {got}, expected {expected}")
            node.refresh_from_db()
            if node.admin_state != "enabled":  # the admin action of a row disabled it: enable it again
                type(node).objects.filter(pk=node.pk).update(admin_state="enabled")
    assert not wrong, "\n".join(wrong)


def test_websockets_take_logged_in_users_only(callers):
    from fdconsole.asgi import application

    made, _ = callers

    async def connects(path: str, cookie: str | None) -> bool:
        headers = [(b"origin", b"http://localhost")]
        if cookie:
            headers.append((b"cookie", f"sessionid={cookie}".encode()))
        talk = WebsocketCommunicator(application, path, headers=headers)
        connected, _ = await talk.connect()
        await talk.disconnect()
        return connected

    for path in ("/ws/cluster/", "/ws/topics/default/"):
        assert async_to_sync(connects)(path, None) is False
        for role in ROLES[1:]:
            browser = client_for(role, made, {}, api=False)
            assert async_to_sync(connects)(path, browser.cookies["sessionid"].value) is True, (path, role)


def _routes(patterns, prefix: str = "") -> list[str]:
    routes = []
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            if route in SAMPLED_INCLUDES:
                routes.append(route)
            else:
                routes += _routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            routes.append(route)
    return routes


def test_every_route_is_in_the_matrix():
    covered = set()
    for row in MATRIX:
        path = row.path.replace("{rid}", "shared").replace("{fresh}", "x")
        include = next((p for p in SAMPLED_INCLUDES if path.startswith("/" + p)), None)
        covered.add(include or resolve(path).route)
    routes = set(_routes(get_resolver().url_patterns))
    # a regex route (/v1/'s catch-all) resolves without its leading ^
    missing = sorted(r for r in routes if r not in covered and r.replace("^", "", 1) not in covered)
    assert not missing, f"routes without a row in the authorization matrix: {missing}"


def test_forms_refuse_a_post_without_its_csrf_token(callers, node):
    made, tokens = callers
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(made["superuser"])
    posts = [("/topics/default/config/", {"scheduler_ttl": "77"}), ("/requests/new/", SUBMISSION),
             ("/requests/shared/cancel", {}), ("/logout/", {}), ("/admin/api/apitoken/add/", {}),
             ("/admin/nodes/node/", {"action": "disable_nodes", "_selected_action": str(node.pk)})]
    for path, body in posts:
        assert browser.post(path, body).status_code == 403, path
    login = Client(enforce_csrf_checks=True)
    assert login.post("/login/", {"username": "root", "password": "pw-root-123"}).status_code == 403
    page = browser.get("/requests/new/")  # with the token its form carries, the same post goes through
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    assert browser.post("/requests/new/", {**SUBMISSION, "csrfmiddlewaretoken": token}).status_code == 302
