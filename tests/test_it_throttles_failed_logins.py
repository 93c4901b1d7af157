"""Login is throttled (django-axes): after FD_LOGIN_FAILURE_LIMIT (5) failed logins for one user name from
one address, that pair is refused, the right password included, with a 429 and the login page saying
why and for how long, until FD_LOGIN_LOCKOUT_MINUTES (15) have passed. Other addresses and other user
names go on as before, a success clears the count, and the same holds through the console's real ASGI
application (fdconsole.asgi, what daphne serves) with CSRF checks on."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.test import Client
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "ops-password-1"
LIMIT = 5
HERE, ELSEWHERE = "203.0.113.5", "198.51.100.7"


@pytest.fixture
def ops(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("ops", password=PASSWORD)


def log_in(username: str, password: str, address: str = HERE):
    return Client(REMOTE_ADDR=address).post("/login/", {"username": username, "password": password})


def fail(times: int, username: str = "ops", address: str = HERE) -> list[int]:
    return [log_in(username, "wrong-password", address).status_code for _ in range(times)]


def assert_locked_out(answer) -> None:
    assert answer.status_code == 429
    page = answer.content.decode()
    assert "Too many failed logins for ops from your" in page
    assert f"({LIMIT} in a row)" in page and "refused for 15" in page and "minutes" in page
    assert "sessionid" not in answer.cookies  # not logged in


def test_the_limit_th_failure_locks_the_pair_out_even_with_the_right_password(ops):
    assert fail(LIMIT - 1) == [200] * (LIMIT - 1)  # the form again, "didn't match"
    assert_locked_out(log_in("ops", "wrong-password"))
    assert_locked_out(log_in("ops", PASSWORD))


def test_another_address_and_another_user_name_are_not_locked_out(ops, django_user_model):
    django_user_model.objects.create_user("dev", password=PASSWORD)
    fail(LIMIT)
    assert log_in("ops", PASSWORD, ELSEWHERE).status_code == 302
    assert log_in("dev", PASSWORD, HERE).status_code == 302


def test_a_success_before_the_limit_starts_the_count_again(ops):
    fail(LIMIT - 1)
    assert log_in("ops", PASSWORD).status_code == 302
    assert fail(LIMIT - 1) == [200] * (LIMIT - 1)
    assert log_in("ops", PASSWORD).status_code == 302


def test_the_lockout_ends_after_the_cool_off(ops):
    from axes.models import AccessAttempt

    fail(LIMIT)
    assert_locked_out(log_in("ops", PASSWORD))
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=15, seconds=1))
    assert log_in("ops", PASSWORD).status_code == 302


def test_the_failed_password_is_never_stored(ops):
    from axes.models import AccessAttempt

    log_in("ops", "my-secret-guess")
    attempts = list(AccessAttempt.objects.values_list("post_data", "get_data"))
    assert attempts and not any("my-secret-guess" in text for row in attempts for text in row)


# -- the real ASGI application ------------------------------------------------------------------------
def asgi_post_login(username: str, password: str, address: str) -> dict:
    """A browser's login through fdconsole.asgi.application: GET the form (CSRF cookie and token), POST
    it back."""
    from fdconsole.asgi import application

    async def request(method: str, body: bytes = b"", cookie: str = "") -> dict:
        headers = [(b"host", b"localhost")]
        if cookie:
            headers += [(b"cookie", cookie.encode()), (b"content-type", b"application/x-www-form-urlencoded")]
        talk = HttpCommunicator(application, method, "/login/", body=body, headers=headers)
        talk.scope["client"] = (address, 50000)  # what daphne puts there: the connection's address
        return await talk.get_response(timeout=10)

    async def run() -> dict:
        form = await request("GET")
        cookies = [v.decode() for k, v in form["headers"] if k == b"Set-Cookie"]
        cookie = next(c for c in cookies if c.startswith("csrftoken=")).split(";", 1)[0]
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', form["body"]).group(1).decode()
        body = urlencode({"csrfmiddlewaretoken": token, "username": username, "password": password})
        return await request("POST", body.encode(), cookie)

    return async_to_sync(run)()


def test_the_asgi_application_locks_out_the_same_way(ops):
    statuses = [asgi_post_login("ops", "wrong-password", HERE)["status"] for _ in range(LIMIT)]
    assert statuses == [200] * (LIMIT - 1) + [429]
    locked = asgi_post_login("ops", PASSWORD, HERE)
    assert locked["status"] == 429
    assert b"Too many failed logins for ops" in locked["body"]
    assert asgi_post_login("ops", PASSWORD, ELSEWHERE)["status"] == 302
