"""Browser tests' harness: the real console (``manage.py fdcluster --nodes 0``) as a subprocess against
the test database and Redis, and Debian's headless Chromium driven by Playwright's sync API.

Playwright's own browser download is never used: the tests launch ``/usr/bin/chromium`` (``make
browser`` installs it). Without it (or without the ``playwright`` package) the browser tests skip, except
on CI (``CI=true``), where they fail: a CI run that silently skips them proves nothing about the pages.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote
from urllib.request import urlopen

import pytest

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # reported by require_browser(), not at collection
    Page = expect = sync_playwright = None

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1366, "height": 800}  # a laptop
TIMEOUT_MS = 15_000  # the longest any single Playwright action or expectation may wait
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


def require_browser() -> None:
    """Skip the calling test when Chromium or Playwright is missing; on CI, fail instead."""
    missing = []
    if sync_playwright is None:
        missing.append("the playwright package (pip install -r requirements-dev.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (make browser, or apt-get install chromium)")
    if not missing:
        return
    reason = "browser tests need " + " and ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + "; CI must run them", pytrace=False)
    pytest.skip(reason)


def console_password_hashers() -> list[str]:
    """The hashers of the console subprocess: the settings module's, not the tests' cheap override."""
    from django.conf import global_settings

    import fdconsole.settings

    return list(getattr(fdconsole.settings, "PASSWORD_HASHERS", global_settings.PASSWORD_HASHERS))


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, timeout=TIMEOUT_MS)


class Console:
    """The console on one fixed port: started, stopped and restarted like an operator would."""

    def __init__(self, run_dir: Path, redis_url: str, database_url: str, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = run_dir / "console.log"
        self.env = {**os.environ, "FD_REDIS_URL": redis_url, "DATABASE_URL": database_url,
                    "FD_RUN_DIR": str(run_dir / "run"), "FD_ALLOWED_HOSTS": "127.0.0.1,localhost",
                    "FD_LOG_LEVEL": "WARNING", "FD_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "fdcluster", "--nodes", "0", "--port", str(self.port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"fdcluster exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urlopen(self.url + "/login/", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:  # not listening yet (URLError), or an error page while it starts
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.url}/login/ did not answer 200 within {START_TIMEOUT_S}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


def log_in(page: Page, base_url: str, username: str, password: str, next_path: str = "/") -> None:
    """Log in through the real login form and wait to land on ``next_path``."""
    page.goto(f"{base_url}/login/?next={quote(next_path)}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(base_url + next_path)


def screenshot_path(test_name: str, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{test_name}-{name}")
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / f"{safe}.png"

