"""Database connections as Django advises: the console, served over ASGI (daphne loads fdconsole.asgi),
keeps none between requests (CONN_MAX_AGE 0) and takes PostgreSQL connections from psycopg's pool;
every other process (manage.py fdnode, fdcluster's supervisor: long-lived and synchronous) keeps its
connection between uses. Each case loads the real settings in a process of its own, the way that
process kind does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = "postgres://fd@db.example.com:5432/fd"  # never connected to: the pool opens on first use

REPORT = """
import json
from django.db import connection
db = connection.settings_dict
pool = connection.pool if connection.vendor == "postgresql" else None  # built, not opened
print(json.dumps({"vendor": connection.vendor, "conn_max_age": db["CONN_MAX_AGE"],
                  "health_checks": db["CONN_HEALTH_CHECKS"], "pool_option": db["OPTIONS"].get("pool"),
                  "pool": type(pool).__module__ + "." + type(pool).__name__ if pool is not None else None}))
"""


def environment(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FD_", "DJANGO_", "DATABASE_URL"))}
    return {**env, "DATABASE_URL": database_url, "FD_SECRET_KEY": "x" * 50, "FD_LOG_LEVEL": "WARNING"}


def as_the_asgi_console(database_url: str) -> dict:
    """What daphne does: import fdconsole.asgi, which sets Django up."""
    code = "import fdconsole.asgi\n" + REPORT
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment(database_url),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def as_a_management_command(database_url: str) -> dict:
    """What fdnode and fdcluster do: manage.py loads the settings before the command runs."""
    done = subprocess.run([sys.executable, "manage.py", "shell", "-c", REPORT], cwd=ROOT,
                          env=environment(database_url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_asgi_console_takes_postgresql_connections_from_psycopgs_pool():
    seen = as_the_asgi_console(POSTGRES)
    assert seen == {"vendor": "postgresql", "conn_max_age": 0, "health_checks": True,
                    "pool_option": {"min_size": 2, "max_size": 40, "timeout": 10},
                    "pool": "psycopg_pool.pool.ConnectionPool"}


def test_the_asgi_console_keeps_no_sqlite_connection_between_requests(tmp_path):
    seen = as_the_asgi_console(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert (seen["vendor"], seen["conn_max_age"], seen["pool_option"]) == ("sqlite", 0, None)


@pytest.mark.parametrize("vendor", ["postgresql", "sqlite"])
def test_nodes_and_the_supervisor_keep_their_connection(tmp_path, vendor):
    url = POSTGRES if vendor == "postgresql" else f"sqlite:///{tmp_path / 'db.sqlite3'}"
    seen = as_a_management_command(url)
    assert seen["vendor"] == vendor
    assert seen["conn_max_age"] >= 60 and seen["health_checks"] is True  # checked before each reuse
    assert seen["pool_option"] is None and seen["pool"] is None
