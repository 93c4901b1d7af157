"""``manage.py fdcluster``: the whole system in the foreground, what ``make run`` runs.

Redis (an embedded one when nothing answers at FD_REDIS_URL), migrations, an admin user and an API
token (kept in .run/, the token printed when it is made), the ASGI console (HTTP and WebSocket, via
daphne), ``--nodes`` node workers, and the TTL reaper and the live pages' pulse. It supervises them: the
console or a node that dies is started again after a backoff (``fdconsole.cluster.supervision``), the
embedded Redis too. Ctrl-C (or SIGTERM, SIGHUP) stops them in order, quietly: the nodes, the console, the
threads, then the embedded Redis; a second Ctrl-C hurries it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, InterfaceError, close_old_connections
from django.db.models import F
from django.utils import timezone
from redis import Redis

from fdconsole.api.models import ApiToken
from fdconsole.cluster.hooks import sync_many
from fdconsole.cluster.supervision import Child, Death, Recorder
from fdconsole.dashboard.pulse import PulseThread
from fdconsole.embedded_redis import EmbeddedRedis, eviction_risk, start_for_url
from fdconsole.env import write_private
from fdconsole.inference.reconcile import Reconciler
from fdconsole.nodes.models import Node
from fdconsole.redis_conn import get_topic_telemetry
from fdconsole.topics.models import Topic
from fdconsole.topics.services import ensure_node, ensure_topic, topic_stores
from scheduler.config import validate_name
from scheduler.connection import client_options, describe, redact, url_with_client_options
from scheduler.errors import ConfigError
from scheduler.reaper import Reaper

STOP_TIMEOUT_S = 15  # for the nodes to finish or hand back their work, then for the console
THREADS_STOP_S = 5  # for the recorder, the reaper, the reconciler and the pulse to end their pass
SUPERVISE_TICK_S = 0.5
REDIS_BACKOFF_S = 2.0  # between two starts of a dying embedded Redis


class Interrupted(Exception):
    """Ctrl-C during start-up: what started so far is stopped, quietly."""


class StoppableThread(Protocol):
    """The recorder, the reaper, the reconciler, the pulse: threads with a stop flag."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True)
class AdminCredentials:
    """Where ``make run`` keeps the admin's password and its API token (files of mode 0600)."""

    password_file: Path | None  # None: the admin's password is one set elsewhere, not kept here
    token_file: Path
    new_token: str | None  # the token, when this run made it: the one time it is printed


class Command(BaseCommand):
    help = "Run Redis (embedded when none answers), the console and N node workers until Ctrl-C."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "2")),
                            help="node workers to start (default NODES or 2; 0 = console only)")
        parser.add_argument("--topic", default="default", help="topic of the nodes (default: default)")
        parser.add_argument("--host", default="127.0.0.1", help="console address (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000, help="console port (default 8000)")

    def handle(self, *args, **options) -> None:
        if options["nodes"] < 0:
            raise CommandError("--nodes must be 0 or more")
        try:
            self.topic = validate_name(options["topic"], "--topic")
        except ConfigError as exc:
            raise CommandError(exc.message) from None
        self.console: Child | None = None
        self.nodes: list[Child] = []
        self.threads: list[StoppableThread] = []
        self.redis: EmbeddedRedis | None = None
        self.topic_record: Topic | None = None  # as it was at start-up: for when the database is down
        self.recorder = Recorder(tidy=close_old_connections)  # the nodes' deaths, on their rows and feed
        self.stopping, self.hurry = threading.Event(), threading.Event()
        self.interruptible = False  # while True, a second Ctrl-C cuts the start-up step under way short
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed
            signal.signal(sig, self.on_signal)
        try:
            self.start_cluster(options)
            self.supervise()
        except Interrupted:
            pass
        finally:
            self.stop_cluster()
            # Stopped: a late Ctrl-C, one landing while Python exits, must not end it by SIGINT (exit -2).
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)

    def on_signal(self, signum: int, frame: object) -> None:
        """Ctrl-C or SIGTERM: the first stops the cluster in order; a second hurries the stop (what is
        left is killed) and cuts a start-up step such as migrate short. Nothing is printed here: the
        main thread may be inside a write to stdout."""
        if self.stopping.is_set():
            self.hurry.set()
            if self.interruptible:
                self.interruptible = False
                raise Interrupted
        self.stopping.set()

    @contextmanager
    def interruptible_steps(self) -> Iterator[None]:
        """Steps that a second Ctrl-C may cut short: they leave no process or thread behind."""
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def step(self) -> None:
        """Between two start-up steps: a Ctrl-C during the last one stops the start here."""
        if self.stopping.is_set():
            raise Interrupted

    # -- starting -----------------------------------------------------------------------------
    def start_cluster(self, options: dict[str, Any]) -> None:
        """Redis, the database, the threads, the console and the nodes, in that order."""
        check_port(options["host"], options["port"])  # else the console would start and fail, again and again
        self.start_redis()
        self.step()
        with self.interruptible_steps():
            call_command("migrate", interactive=False, verbosity=0)
            call_command("collectstatic", interactive=False, verbosity=0)
            credentials = self.admin_credentials()
            self.topic_record = topic = ensure_topic(options["topic"])
            names = [f"node-{i}" for i in range(1, options["nodes"] + 1)]
            for name in names:
                ensure_node(name, topic)
        self.step()
        self.start_thread(self.recorder)
        self.start_thread(Reaper(current_topic_stores, sync_many))  # every topic's Redis, as they come and go
        self.start_thread(Reconciler())  # the database's unfinished rows against Redis (one process at once)
        self.start_thread(PulseThread())  # the live pages' feed (one per console Redis holds the lease)
        self.console = Child("console", [
            sys.executable, "-m", "daphne", "-b", options["host"], "-p", str(options["port"]),
            "fdconsole.asgi:application"], settings.BASE_DIR).start()
        for name in names:
            self.nodes.append(Child(name, [
                sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "fdnode", "--topic", topic.name,
                "--name", name], settings.BASE_DIR).start())
        self.step()
        self.banner(options["host"], options["port"], topic.name, credentials, names)

    def start_redis(self) -> None:
        """The embedded Redis when nothing answers at FD_REDIS_URL; its URL (with the password it asks
        for) becomes every process's FD_REDIS_URL."""
        asked = settings.FD_REDIS_URL
        try:
            self.redis, url = start_for_url(asked, run_dir() / "redis_password", data_dir=run_dir() / "redis",
                                            maxmemory=settings.FD_EMBEDDED_REDIS_MAXMEMORY)
        except RuntimeError as exc:  # its message may quote FD_REDIS_URL, password and all
            raise CommandError(redact(str(exc), asked)) from None
        if url != asked:  # the embedded Redis asks for a password: every process of this run gives it
            use_redis_url(url)
        if self.redis:
            kept = f"; it asks for the password in {run_dir() / 'redis_password'}" if url != asked else ""
            self.say(f"Started an embedded Redis at {describe(url)} (nothing answered there), its data in "
                     f"{run_dir() / 'redis'}{kept}.")
        self.redis_started = time.monotonic()
        with Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as probe:
            risk = eviction_risk(probe)
        if risk:
            self.say(f"Warning: the Redis at {describe(url)}: {risk}.")

    def start_thread(self, thread: StoppableThread) -> None:
        self.threads.append(thread)
        thread.start()

    # -- supervising --------------------------------------------------------------------------
    @property
    def children(self) -> list[Child]:
        return ([self.console] if self.console else []) + self.nodes

    def supervise(self) -> None:
        """Until Ctrl-C: starts again, after a backoff, the embedded Redis, the console or a node that
        died; a node's record and its topic's events say how it ended."""
        while not self.stopping.wait(SUPERVISE_TICK_S):
            self.keep_redis_alive()
            now = time.monotonic()
            for child in self.children:
                death = child.check(now)
                if death is not None:
                    self.say(str(death))
                    if child is not self.console:
                        self.record_exit(death)
                elif child.due(now):
                    self.restart(child, now)

    def restart(self, child: Child, now: float) -> None:
        try:
            child.start()
        except OSError as exc:  # out of processes or memory: the next try waits its backoff
            child.postpone(now)
            self.say(f"{child.label} did not start again: {exc}; trying again in {child.backoff_s:g} s.")
            return
        if child is not self.console and child.death is not None:
            self.record_restart(child.label, child.death.status)

    def record_exit(self, death: Death) -> None:
        """How the node's process ended, on its record (its row on the pages, the API, the admin)."""
        name, status, at = death.label, death.status, timezone.now()
        self.recorder.record(f"record how {name} ended", lambda: Node.objects.filter(name=name).update(
            last_exit_status=status, last_exit_at=at))

    def record_restart(self, name: str, status: str) -> None:
        """The node's restart count, and a ``node_restarted`` event in its topic's feed."""
        self.recorder.record(f"count the restart of {name}", lambda: Node.objects.filter(name=name).update(
            restarts=F("restarts") + 1))
        self.recorder.record(
            f"add the restart of {name} to the events of topic {self.topic}",
            lambda: get_topic_telemetry(self.current_topic()).add_event(
                self.topic, "node_restarted", node=name, status=status))

    def current_topic(self) -> Topic:
        """The nodes' topic as the database has it now, or as it was at start-up while it is down."""
        try:
            return Topic.objects.get(name=self.topic)
        except (DatabaseError, InterfaceError):
            assert self.topic_record is not None  # the nodes run: start-up got this far
            return self.topic_record

    def keep_redis_alive(self) -> None:
        """Starts the embedded Redis again when it died (its data comes back from its append-only file),
        no sooner than REDIS_BACKOFF_S after the last start."""
        redis = self.redis
        if redis is None or redis.alive or time.monotonic() - self.redis_started < REDIS_BACKOFF_S:
            return
        self.redis_started = time.monotonic()
        self.say(f"The embedded Redis exited with code {redis.process.returncode}; starting it again.")
        try:
            redis.restart()
        except (RuntimeError, OSError) as exc:
            self.say(f"The embedded Redis did not start again: {redact(str(exc), redis.url)}; trying again "
                     f"in {REDIS_BACKOFF_S:g} s.")

    # -- stopping -----------------------------------------------------------------------------
    def stop_cluster(self) -> None:
        """Nodes first (they finish or hand back their work, through Redis), then the console, then the
        threads, then the embedded Redis: nothing is left talking to a Redis that is gone. A second
        Ctrl-C kills what is left instead of waiting for it."""
        if not (self.children or self.threads or self.redis):
            return  # nothing was started
        self.say("Stopping (Ctrl-C again to hurry)…")
        self.stop_processes(self.nodes, STOP_TIMEOUT_S)
        self.stop_processes([self.console] if self.console else [], STOP_TIMEOUT_S)
        for thread in self.threads:
            thread.stop()
        deadline = time.monotonic() + THREADS_STOP_S
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.redis:
            self.redis.stop()
        self.say("Stopped.")

    def stop_processes(self, children: list[Child], grace_s: float) -> None:
        """SIGTERM to each, then up to ``grace_s`` for them to exit (less after a second Ctrl-C); then
        SIGKILL to what is left, process groups and all."""
        for child in children:
            child.terminate()
        deadline = time.monotonic() + grace_s
        while any(child.running for child in children) and time.monotonic() < deadline:
            if self.hurry.wait(0.05):
                break
        for child in children:
            if child.running:
                why = "Ctrl-C again" if self.hurry.is_set() else f"it did not stop within {grace_s:g} s"
                self.say(f"Killing {child.label} ({why}).")
            child.kill_group()

    # -- credentials ----------------------------------------------------------------------------
    def admin_credentials(self) -> AdminCredentials:
        """The admin user and an API token, kept in .run/ (git-ignored) so that reruns reuse them."""
        password_file, token_file = run_dir() / "admin_password", run_dir() / "api_token"
        password = os.environ.get("FD_ADMIN_PASSWORD") or (
            password_file.read_text().strip() if password_file.exists() else secrets.token_urlsafe(12))
        admin, created = get_user_model().objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True})
        if created or os.environ.get("FD_ADMIN_PASSWORD"):
            admin.set_password(password)
            admin.save()
            write_private(password_file, password)
        kept = password_file if admin.check_password(password) else None
        token = token_file.read_text().strip() if token_file.exists() else ""
        if token and ApiToken.authenticate(token) is not None:
            return AdminCredentials(kept, token_file, None)
        _, token = ApiToken.issue(admin, "make run")
        write_private(token_file, token)
        return AdminCredentials(kept, token_file, token)

    def banner(self, host: str, port: int, topic: str, credentials: AdminCredentials,
               names: list[str]) -> None:
        """Where the admin's password and the API token are kept; the token itself only when this run
        made it (stdout is often a log file: a secret printed on every start ends up in many)."""
        url = f"http://{host}:{port}"
        token_file = shlex.quote(str(credentials.token_file))
        self.say("")
        self.say(f"  fdconsole is up: {url}/  (admin: {url}/admin/)")
        if credentials.password_file is not None:
            self.say(f"  login:      admin, password in {credentials.password_file}")
        else:
            self.say("  login:      admin, with the password set for it (FD_ADMIN_PASSWORD sets one)")
        if credentials.new_token is not None:
            self.say(f"  API token:  {credentials.new_token}")
            self.say(f"              (new: printed this once, kept in {credentials.token_file})")
        else:
            self.say(f"  API token   kept in {credentials.token_file} (printed once, when it was made)")
        self.say(f"  nodes:      {', '.join(names) or 'none'} (topic {topic})")
        self.say("  try:")
        self.say(f"    TOKEN=$(cat {token_file})")
        self.say("    curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\")
        body = ('{"messages": [{"role": "user", "content": "What is the capital of France?"}], '
                '"max_tokens": 32}')
        self.say(f"         -d '{body}' {url}/api/v1/topics/{topic}/requests")
        self.say(f"    curl -N -H \"Authorization: Bearer $TOKEN\" {url}/api/v1/requests/<request_id>/stream")
        self.say('    (tiny has no chat template: send {"prompt": "Hello"} to a topic serving it)')
        self.say("  Ctrl-C stops everything.")
        self.say("")

    def say(self, line: str) -> None:
        try:
            self.stdout.write(line)
            self.stdout.flush()
        except OSError:  # its terminal is gone (SIGHUP): the stop goes on without a word
            pass


def run_dir() -> Path:
    """Where ``make run`` keeps its secrets (FD_RUN_DIR, default .run/): owner-only."""
    path = Path(os.environ.get("FD_RUN_DIR") or Path(settings.BASE_DIR) / ".run")
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def check_port(host: str, port: int) -> None:
    """Refuses to start when the console's address is taken (by another console, most likely)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as daphne listens: TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CommandError(f"the console cannot listen on {host}:{port}: {exc.strerror}") from None


def current_topic_stores() -> list:
    """``topic_stores`` from a thread that keeps a database connection: one an outage broke is dropped
    first, so that the next query reconnects instead of failing for ever."""
    close_old_connections()
    return topic_stores()


def use_redis_url(url: str) -> None:
    """Makes ``url`` the console's Redis here and in every process started from now on (the console,
    the nodes): the settings that name it, and FD_REDIS_URL."""
    os.environ["FD_REDIS_URL"] = url
    settings.FD_REDIS_URL = url
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [
        {"address": url, **client_options(url, settings.CHANNEL_LAYER_READ_TIMEOUT_S)}]
    settings.RQ_QUEUES["default"]["URL"] = url_with_client_options(url)  # the timeouts, as settings.py has
