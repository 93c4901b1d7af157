"""A live page's WebSocket lives only as long as the session that opened it: when its user logs out
(from another tab, or another browser), is deactivated in the admin or is deleted, every socket of that
user closes within moments with code 4401, and the page's reconnections are refused while its session is
gone. Other users' sockets stay open. A session that ends without a signal (expired, flushed, a changed
password) is caught by each socket's own check; a check that cannot be made (the database is down) closes
the socket with 1011.

The first tests drive the real console (``fdcluster``, daphne, the Redis channel layer) from headless
Chromium; the others speak to the real ASGI stack (origin check, session cookie, session store) in this
process with ``WebsocketCommunicator``.
"""

from __future__ import annotations

import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from tests.browser import expect, log_in
from tests.conftest import free_port

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "pw-carol-browser-1"
CLOSE_MS = 5_000  # a Redis message away, so within a second; the rest is room for a loaded 2-core machine
REFUSED_S = 3.0  # long enough for the page's feed to try again twice (its backoff starts at 0.5 s)
UNAUTHORIZED, SERVER_ERROR = 4401, 1011

# Opens a second socket on the page, beside its own feed's, and records how it closes.
OPEN_PROBE = """url => new Promise(resolve => {
  const probe = window.fdProbe = {code: null};
  const socket = new WebSocket(url);
  socket.onopen = () => resolve(true);
  socket.onclose = event => { probe.code = event.code; resolve(false); };
})"""


def make_user(name: str, **extra):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user(name, password=PASSWORD, **extra)


def watching(page, console, username: str):
    """``username`` logged in on the topic page, its feed live, and a probe socket open."""
    log_in(page, console.url, username, PASSWORD, "/topics/default/")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    assert page.evaluate(OPEN_PROBE, console.url.replace("http://", "ws://") + "/ws/cluster/")
    return page


def closed_with(page) -> int:
    """The probe's close code, once it has closed (seconds it took, measured from now, are printed)."""
    started = time.monotonic()
    page.wait_for_function("window.fdProbe.code !== null", timeout=CLOSE_MS)
    print(f"closed {time.monotonic() - started:.2f}s after the action returned")
    return page.evaluate("window.fdProbe.code")


def refused_from_now_on(page) -> None:
    """The page's own feed is closed too and cannot come back: its handshakes are refused."""
    expect(page.locator("#live")).to_have_attribute("data-state", "reconnecting")
    time.sleep(REFUSED_S)
    expect(page.locator("#live")).to_have_attribute("data-state", "reconnecting", timeout=1)


def log_out(page) -> None:
    page.click("form.logout input[type=submit]")
    page.wait_for_url("**/login/")


def still_open(page) -> bool:
    return page.evaluate("window.fdProbe.code") is None


@pytest.mark.browser
@pytest.mark.e2e
def test_logging_out_in_another_tab_closes_the_pages_sockets(console, browser_page):
    make_user("carol")
    make_user("bob")
    page = watching(browser_page, console, "carol")
    bystander = watching(page.context.browser.new_context().new_page(), console, "bob")

    other_tab = page.context.new_page()  # the same browser: the same session cookie
    other_tab.goto(console.url + "/requests/")
    log_out(other_tab)

    assert closed_with(page) == UNAUTHORIZED
    refused_from_now_on(page)
    assert still_open(bystander), "another user's socket is not touched"
    expect(bystander.locator("#live")).to_have_attribute("data-state", "live")


@pytest.mark.browser
@pytest.mark.e2e
def test_logging_out_in_another_browser_closes_every_socket_of_the_user(console, browser_page):
    make_user("carol")
    page = watching(browser_page, console, "carol")
    elsewhere = page.context.browser.new_context().new_page()  # its own session of the same user
    log_in(elsewhere, console.url, "carol", PASSWORD, "/requests/")
    log_out(elsewhere)

    assert closed_with(page) == UNAUTHORIZED
    # This page's own session was not the one that ended: its feed connects again.
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=CLOSE_MS)


@pytest.mark.browser
@pytest.mark.e2e
def test_deactivating_a_user_in_the_admin_closes_their_sockets(console, browser_page):
    from django.contrib.auth import get_user_model

    carol = make_user("carol")
    get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD)
    page = watching(browser_page, console, "carol")
    admin = page.context.browser.new_context().new_page()
    log_in(admin, console.url, "root", PASSWORD, f"/admin/auth/user/{carol.pk}/change/")
    admin.uncheck("#id_is_active")
    admin.click("input[name=_save]")
    expect(admin.locator(".messagelist")).to_contain_text("was changed successfully")

    assert closed_with(page) == UNAUTHORIZED
    refused_from_now_on(page)


@pytest.mark.browser
@pytest.mark.e2e
def test_deleting_a_user_from_another_process_closes_their_sockets(console, browser_page):
    carol = make_user("carol")
    page = watching(browser_page, console, "carol")
    carol.delete()  # here, in the tests' process: the message goes through the shared channel layer

    assert closed_with(page) == UNAUTHORIZED
    refused_from_now_on(page)


# -- the real ASGI stack in this process ------------------------------------------------------------
@pytest.fixture
def carol_session(db, store, client) -> str:
    """carol's session key, from logging in through the login view."""
    make_user("carol")
    assert client.post("/login/", {"username": "carol", "password": PASSWORD}).status_code == 302
    return client.session.session_key


def connect(session_key: str):
    """A communicator on the real application with the session cookie, connected, its hello read."""
    from django.conf import settings

    from fdconsole.asgi import application

    async def run():
        cookie = f"{settings.SESSION_COOKIE_NAME}={session_key}".encode()
        talk = WebsocketCommunicator(application, "/ws/cluster/",
                                     headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)])
        assert (await talk.connect(timeout=5))[0]
        assert (await talk.receive_json_from(timeout=5))["type"] == "cluster"  # the hello
        return talk

    return run()


async def close_code(talk: WebsocketCommunicator, seconds: float = 5.0) -> int | None:
    """The code the server closed with, skipping the live updates before it; None if it stays open."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await talk.receive_nothing(timeout=0.05):
            continue
        message = await talk.receive_output()
        if message["type"] == "websocket.close":
            return message.get("code")
    return None


def test_a_changed_password_closes_the_sockets_of_the_users_sessions(carol_session):
    from django.contrib.auth import get_user_model

    def change_password():
        carol = get_user_model().objects.get(username="carol")
        carol.set_password("a-new-password-2")
        carol.save()  # as `manage.py changepassword` does: every session of carol's ends

    async def run():
        talk = await connect(carol_session)
        assert await close_code(talk, 0.5) is None
        await sync_to_async(change_password)()
        return await close_code(talk)

    assert async_to_sync(run)() == UNAUTHORIZED


def test_a_session_that_ends_without_a_signal_is_caught_by_the_sockets_own_check(carol_session, monkeypatch):
    from django.contrib.sessions.models import Session

    from fdconsole.dashboard import consumers

    monkeypatch.setattr(consumers, "SESSION_CHECK_S", 0.3)

    async def run():
        talk = await connect(carol_session)
        assert await close_code(talk, 1.0) is None, "a valid session passes its checks"
        await sync_to_async(Session.objects.filter(session_key=carol_session).delete)()  # no logout signal
        return await close_code(talk)

    assert async_to_sync(run)() == UNAUTHORIZED


def test_a_check_the_database_cannot_answer_closes_the_socket(carol_session, monkeypatch, tmp_path):
    from django.db import connection

    from fdconsole.dashboard import consumers

    monkeypatch.setattr(consumers, "SESSION_CHECK_S", 0.3)
    # Connections close after each use (Django's default CONN_MAX_AGE), so each check connects afresh.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    connection.close()

    async def run():
        talk = await connect(carol_session)
        db = connection.settings_dict
        saved = dict(db)
        if connection.vendor == "sqlite":  # new connections fail for real from here on
            db["NAME"] = str(tmp_path / "no-such-directory" / "db.sqlite3")
        else:
            db["HOST"], db["PORT"] = "127.0.0.1", free_port()
        try:
            return await close_code(talk)
        finally:
            db.update(saved)

    assert async_to_sync(run)() == SERVER_ERROR
