"""The console in headless Chromium, as an operator uses it: the login gate, live node states over the
WebSocket with no reload, the topic configuration form, a request streamed from the submit form, a
node drained in the admin, and the live pages reconnecting when the console restarts.

One console runs for the module (starting one costs seconds); each test logs in afresh, and its rows
and Redis keys are gone after it (``transactional_db``, the ``store`` flush).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from urllib.parse import quote

import pytest

from tests.browser import ARTIFACTS, expect, log_in

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
PASSWORD = "pw-ops-browser-1"
LIVE_MS = 10_000  # the contract says within a second; this leaves room for a loaded 2-core machine
SAMPLE_MS = 5_000  # how long heartbeats are collected for the delay figures
MAX_TOKENS = 24
STREAM_TIMEOUT_S = 30


@pytest.fixture
def ops(console) -> str:
    """A non-staff operator (may change topics, see and cancel every request); returns its name. The
    password is PASSWORD."""
    from django.contrib.auth import get_user_model

    from tests.test_it_serves_the_console_pages import OPERATOR, with_permissions

    user = get_user_model().objects.create_user("ops", password=PASSWORD)
    return with_permissions(user, *OPERATOR).username


def open_topic_live(page, console, username: str) -> None:
    log_in(page, console.url, username, PASSWORD, "/topics/default/")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    page.evaluate("window.__marker = 1")  # gone if the page ever reloads or navigates


def fits_the_width(page) -> None:
    """Nothing sticks out sideways at the laptop width (no horizontal scroll bar)."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{page.url} is {overflow}px wider than the window"


def nav_links(page) -> set[str]:
    return set(page.locator("nav a").evaluate_all("links => links.map(a => a.getAttribute('href'))"))


def state_of(page, node: str):
    return page.locator(f'tr[data-node="{node}"] td[data-field="state"]')


# -- a. the login gate -----------------------------------------------------------------------------
def test_it_asks_anonymous_visitors_to_log_in_and_lands_on_the_page_asked_for(console, browser_page, shot,
                                                                              ops):
    page = browser_page
    for path in ("/", "/topics/default/", "/requests/"):
        page.goto(console.url + path)
        expect(page).to_have_url(f"{console.url}/login/?next={quote(path)}")
    shot(page, "login")

    page.fill("input[name=username]", ops)
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    expect(page.locator(".errorlist, .flash.error").first).to_be_visible()
    shot(page, "wrong-password")

    page.fill("input[name=username]", ops)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(console.url + "/requests/")
    assert nav_links(page) >= {"/", "/requests/", "/requests/new/", "/admin/"}
    assert "/rq/" not in nav_links(page), "the queues link is for staff only"
    fits_the_width(page)
    shot(page, "landed")


# -- b. live node states ------------------------------------------------------------------------------
def test_it_shows_a_node_started_after_the_page_loaded(console, browser_page, shot, node_processes, ops):
    page = browser_page
    open_topic_live(page, console, ops)
    expect(page.locator("#nodes-empty")).to_be_visible()
    shot(page, "empty")

    node_processes.start("node-7", "default")
    expect(state_of(page, "node-7")).to_have_text("idle", timeout=LIVE_MS)
    for field in ("role", "load_score", "heartbeat_age", "queue_length", "running", "steals", "batch_size",
                  "waiting", "kv_blocks", "prefix_cache_hit_rate", "preemptions", "tokens_per_s"):
        expect(page.locator(f'tr[data-node="node-7"] td[data-field="{field}"]')).to_have_count(1)
    for chart in ("#chart-rps", "#chart-tps", "#chart-queue", "#chart-load", "#chart-kv", "#chart-batch"):
        expect(page.locator(chart)).to_be_visible()
    page.wait_for_timeout(SAMPLE_MS)
    assert page.evaluate("window.__marker") == 1, "the page reloaded"
    fits_the_width(page)
    shot(page, "node-live")
    report_heartbeat_delays(page.evaluate("window.fdLive.heartbeatDelaysMs"))

    page.goto(console.url + "/")  # the cluster at a glance lists it too
    expect(state_of(page, "node-7")).to_have_text("idle", timeout=LIVE_MS)
    fits_the_width(page)
    shot(page, "cluster")


def report_heartbeat_delays(delays_ms: list[float]) -> None:
    """Browser receipt time minus the heartbeat's own timestamp: min/median/max, printed and saved."""
    assert delays_ms and all(isinstance(d, int | float) for d in delays_ms), delays_ms
    figures = {"samples": len(delays_ms), "min_ms": min(delays_ms),
               "median_ms": statistics.median(delays_ms), "max_ms": max(delays_ms)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "heartbeat_delay.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nheartbeat -> browser delay: {json.dumps(figures)}")


# -- c. the topic configuration form ---------------------------------------------------------------
def saved_ttl() -> tuple[int, int]:
    """scheduler_ttl as the database holds it and as the topic's Redis publishes it to the nodes."""
    from fdconsole.redis_conn import get_topic_store
    from fdconsole.topics.models import Topic

    topic = Topic.objects.get(name="default")
    published = get_topic_store(topic).config_of("default")
    return topic.scheduler_ttl, published.scheduler_ttl if published else None


def test_it_refuses_a_bad_config_value_by_name_and_applies_a_good_one(console, browser_page, shot, ops):
    page = browser_page
    log_in(page, console.url, ops, PASSWORD, "/topics/default/config/")
    before = saved_ttl()
    fits_the_width(page)
    shot(page, "form")

    form = page.locator("form#config")
    form.locator("[name=scheduler_ttl]").fill("-5")
    form.locator("button[type=submit]").click()
    error = page.locator('.field-error[data-for="scheduler_ttl"]')
    expect(error).to_be_visible()
    expect(error).to_contain_text("scheduler_ttl")
    shot(page, "refused")
    assert saved_ttl() == before

    form.locator("[name=scheduler_ttl]").fill("60")
    form.locator("button[type=submit]").click()
    expect(page.locator(".flash.success")).to_be_visible()
    expect(page.locator('.field-error[data-for="scheduler_ttl"]')).to_have_count(0)
    shot(page, "saved")
    assert saved_ttl() == (60, 60)


# -- d. a request streamed from the submit form ------------------------------------------------------
def test_it_streams_the_tokens_of_a_request_submitted_in_the_browser(console, browser_page, shot,
                                                                     node_processes, ops):
    # 50 ms a token: ~1.2 s of visible streaming. It loads its model while the browser logs in.
    node = node_processes.start("node-1", "default", wait=False, FD_TOKEN_DELAY_MS="50")
    page = browser_page
    log_in(page, console.url, ops, PASSWORD, "/requests/new/")
    form = page.locator("form#submit")
    form.locator("textarea[name=prompt]").fill("Hello")
    form.locator("input[name=max_tokens]").fill(str(MAX_TOKENS))
    form.locator("select[name=topic]").select_option("default")
    shot(page, "form")
    node_processes.wait_alive("node-1", "default", node)  # the form refuses a topic with no live node
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(re.escape(console.url) + r"/requests/(?!new/).+/$"))

    seen = watch_token_count(page)
    assert seen == sorted(seen) and len(seen) > 2, f"#token-count went {seen}: not a stream"
    expect(page.locator("[data-field=status]")).to_have_text("finished")
    expect(page.locator("#output")).not_to_be_empty()
    expect(page.locator("button#cancel")).to_have_count(1)
    fits_the_width(page)
    shot(page, "finished")


def watch_token_count(page) -> list[int]:
    """Every distinct value #token-count shows until it reaches MAX_TOKENS (bounded)."""
    seen: list[int] = []
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    while time.monotonic() < deadline:
        digits = re.search(r"\d+", page.locator("#token-count").inner_text())
        count = int(digits.group()) if digits else 0
        if not seen or seen[-1] != count:
            seen.append(count)
        if count >= MAX_TOKENS:
            return seen
        page.wait_for_timeout(20)
    raise AssertionError(f"#token-count went {seen} in {STREAM_TIMEOUT_S}s, never {MAX_TOKENS}")


# -- e. a node drained in the admin ------------------------------------------------------------------
def test_it_shows_a_node_drained_in_the_admin_as_draining(console, browser_page, shot, node_processes):
    from django.contrib.auth import get_user_model

    from fdconsole.nodes.models import Node
    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import ensure_node

    get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD)
    pk = ensure_node("node-9", Topic.objects.get(name="default")).pk
    node = node_processes.start("node-9", "default", wait=False)  # loads its model while we log in
    page = browser_page
    log_in(page, console.url, "root", PASSWORD, "/admin/nodes/node/")
    page.check(f'input[name=_selected_action][value="{pk}"]')
    page.select_option("select[name=action]", "drain_nodes")
    shot(page, "admin-action")
    page.click("button[name=index]")
    expect(page.locator(".messagelist")).to_contain_text("draining")
    assert Node.objects.get(pk=pk).admin_state == "draining"

    node_processes.wait_alive("node-9", "default", node)  # a dead node shows as dead, drained or not
    page.goto(console.url + "/topics/default/")
    assert "/rq/" in nav_links(page), "staff see the queues link"
    expect(state_of(page, "node-9")).to_have_text("draining", timeout=LIVE_MS)
    shot(page, "draining")


# -- f. reconnecting after a console restart ---------------------------------------------------------
def test_it_reconnects_after_the_console_restarts(console, browser_page, shot, node_processes, ops):
    page = browser_page
    open_topic_live(page, console, ops)

    console.stop()
    expect(page.locator("#live")).to_have_attribute("data-state", "reconnecting")
    shot(page, "reconnecting")
    # A node the page can only learn of after the restart (it hears nothing while disconnected).
    node = node_processes.start("node-8", "default", wait=False)
    console.start()
    expect(page.locator("#live")).to_have_attribute("data-state", "live")

    node_processes.wait_alive("node-8", "default", node)
    expect(state_of(page, "node-8")).to_have_text("idle", timeout=LIVE_MS)
    assert page.evaluate("window.__marker") == 1, "the page reloaded"
    shot(page, "live-again")
