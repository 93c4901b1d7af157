"""A real database outage for tests, seen by this process and by the node processes it started.

SQLite: no new connection can open the database while it lasts ("unable to open database file"), and
its files are never touched, so that no connection open meanwhile can corrupt them: this process opens
it at a path that does not exist, and child processes open it through a symbolic link
(``children_url``, which SQLite resolves to the real file, WAL included) that points nowhere meanwhile.
PostgreSQL: the test database stops taking connections (``ALLOW_CONNECTIONS false``) and every session
of it is ended; the server answers, the database does not. Either way this process's connections close
first.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from django.db import connection, connections

from tests.nodes import children_database_url

NOWHERE = "/nonexistent-fd-outage/db.sqlite3"


def children_url(tmp_path: Path) -> str:
    """The DATABASE_URL to give child processes whose database ``database_outage`` is to take away."""
    if connection.vendor != "sqlite":
        return children_database_url()
    link = tmp_path / "db.sqlite3"
    link.symlink_to(connection.settings_dict["NAME"])
    return f"sqlite:///{link}"


@contextmanager
def database_outage(tmp_path: Path | None = None):
    """The outage, for this process and (given the ``tmp_path`` of ``children_url``) its children."""
    connections.close_all()
    if connection.vendor == "sqlite":
        with _sqlite_outage(tmp_path / "db.sqlite3" if tmp_path is not None else None):
            yield
    else:
        with _postgresql_outage(connection.settings_dict["NAME"]):
            yield
    connections.close_all()


@contextmanager
def _sqlite_outage(link: Path | None):
    settings = connection.settings_dict  # shared by every thread's connection of this process
    real = settings["NAME"]
    settings["NAME"] = NOWHERE
    if link is not None:
        _point(link, NOWHERE)
    try:
        yield
    finally:
        connections.close_all()
        settings["NAME"] = real
        if link is not None:
            _point(link, real)


def _point(link: Path, target: str) -> None:
    """Makes ``link`` point at ``target`` in one step (a process opening it sees one or the other)."""
    new = link.with_name(link.name + ".new")
    new.unlink(missing_ok=True)
    new.symlink_to(target)
    os.replace(new, link)


@contextmanager
def _postgresql_outage(name: str):
    import psycopg

    settings = connection.settings_dict
    admin = psycopg.connect(host=settings["HOST"] or "127.0.0.1", port=settings["PORT"] or 5432,
                            user=settings["USER"] or None, password=settings["PASSWORD"] or None,
                            dbname="postgres", autocommit=True)
    with admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
