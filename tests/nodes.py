"""Real node processes for tests: ``manage.py fdnode`` against the test database and test Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from django.db import connection

from fdconsole.topics.services import topic_store

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60


def children_database_url() -> str:
    """The test database (SQLite's file, or PostgreSQL's test_ database) as a DATABASE_URL."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        credentials += ":" + quote(db["PASSWORD"], safe="")
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{credentials}@{host}:{port}/{quote(db['NAME'], safe='')}"


class NodeProcesses:
    """Starts, kills and restarts fdnode processes; stops every one it started at the end."""

    def __init__(self, redis_url: str) -> None:
        self.env = {**os.environ, "FD_REDIS_URL": redis_url, "FD_LOG_LEVEL": "WARNING", "FD_DEVICE": "cpu",
                    "DATABASE_URL": children_database_url()}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, topic: str = "default", *args: str, wait: bool = True,
              **env: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "fdnode", "--topic", topic, "--name", name, *args],
            cwd=ROOT, env={**self.env, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.processes[name] = process
        if wait:
            self.wait_alive(name, topic, process)
        return process

    def wait_alive(self, name: str, topic: str, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        started = time.time()
        while time.monotonic() < deadline:
            beat = topic_store(topic).read_heartbeats(topic, [name])[name]  # where the node beats
            if float(beat.get("ts", 0)) > started and beat.get("state") != "stopped":
                return
            if process.poll() is not None:
                raise AssertionError(f"fdnode {name} exited with {process.returncode}")
            time.sleep(0.1)
        raise AssertionError(f"fdnode {name} did not start within {START_TIMEOUT_S}s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        process = self.processes.pop(name)
        process.send_signal(sig)
        return process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def wait_final(api, request_id: str, timeout: float = 60) -> dict:
    """The request object of ``request_id`` once it is no longer queued or running (``api``: the tests'
    client of the native API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(f"/api/v1/requests/{quote(request_id, safe='')}").json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{request_id} is still {body['status']} after {timeout}s")


def wait_row_status(row, status: str, timeout: float = 5) -> None:
    """Refreshes ``row`` (a request row) until its status is ``status`` or ``timeout`` passes; the
    caller asserts what it expects of it."""
    deadline = time.monotonic() + timeout
    row.refresh_from_db()
    while row.status != status and time.monotonic() < deadline:
        time.sleep(0.05)
        row.refresh_from_db()
