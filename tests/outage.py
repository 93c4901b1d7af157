"""A real database outage for tests, seen by this process and by the node processes it started.

SQLite: the database file (with its WAL) moves away, so that every new connection opens an empty file
and its queries fail ("no such table"); moving it back ends the outage. PostgreSQL: the test database
stops taking connections (``ALLOW_CONNECTIONS false``) and every session of it is ended; the server
answers, the database does not. Either way this process's own connections close first.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from django.db import connection, connections

SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


@contextmanager
def database_outage():
    connections.close_all()
    if connection.vendor == "sqlite":
        with _sqlite_outage(Path(connection.settings_dict["NAME"])):
            yield
    else:
        with _postgresql_outage(connection.settings_dict["NAME"]):
            yield
    connections.close_all()


@contextmanager
def _sqlite_outage(path: Path):
    import sqlite3

    with sqlite3.connect(path) as db:  # everything in the WAL into the file, so that the file is all of it
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    away = path.with_name(path.name + ".away")
    os.replace(path, away)
    try:
        yield
    finally:
        connections.close_all()
        for suffix in ("", *SQLITE_SIDE_FILES):  # what connections made meanwhile at the old path
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        shutil.move(away, path)


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
