"""``manage.py fdcluster``: the whole system in the foreground, what ``make run`` runs.

Redis (an embedded one when nothing answers at FD_REDIS_URL), migrations, an admin user and an API
token (kept in .run/, the token printed when it is made), the ASGI console (HTTP and WebSocket, via
daphne), ``--nodes`` node workers, and the TTL reaper and the live pages' pulse. Ctrl-C (or SIGTERM)
stops every process it started.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from redis import Redis

from fdconsole.api.models import ApiToken
from fdconsole.cluster.hooks import sync_many
from fdconsole.dashboard.pulse import PulseThread
from fdconsole.embedded_redis import eviction_risk, start_for_url
from fdconsole.env import write_private
from fdconsole.topics.services import ensure_node, ensure_topic, topic_stores
from scheduler.config import validate_name
from scheduler.connection import describe, redact
from scheduler.errors import ConfigError
from scheduler.reaper import Reaper

STOP_TIMEOUT_S = 15
REDIS_BACKOFF_S = 2.0  # between two starts of a dying embedded Redis


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
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stopping = threading.Event()
        asked = settings.FD_REDIS_URL
        try:
            redis, url = start_for_url(asked, run_dir() / "redis_password", data_dir=run_dir() / "redis",
                                       maxmemory=settings.FD_EMBEDDED_REDIS_MAXMEMORY)
        except RuntimeError as exc:  # its message may quote FD_REDIS_URL, password and all
            raise CommandError(redact(str(exc), asked)) from None
        if url != asked:  # the embedded Redis asks for a password: every process of this run gives it
            use_redis_url(url)
        if redis:
            kept = f"; it asks for the password in {run_dir() / 'redis_password'}" if url != asked else ""
            self.say(f"Started an embedded Redis at {describe(url)} (nothing answered there), its data in "
                     f"{run_dir() / 'redis'}{kept}.")
        self.redis, self.redis_started = redis, time.monotonic()
        with Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as probe:
            risk = eviction_risk(probe)
        if risk:
            self.say(f"Warning: the Redis at {describe(url)}: {risk}.")
        reaper = pulse = None
        try:
            call_command("migrate", interactive=False, verbosity=0)
            call_command("collectstatic", interactive=False, verbosity=0)
            credentials = self.admin_credentials()
            topic = ensure_topic(options["topic"])
            names = [f"node-{i}" for i in range(1, options["nodes"] + 1)]
            for name in names:
                ensure_node(name, topic)
            reaper = Reaper(topic_stores, sync_many)  # every topic's Redis, as topics come and go
            reaper.start()
            pulse = PulseThread()  # the live pages' feed (one per console Redis holds the lease)
            pulse.start()
            self.start_console(options["host"], options["port"])
            for name in names:
                self.start_node(topic.name, name)
            self.banner(options["host"], options["port"], topic.name, credentials, names)
            self.supervise()
        finally:
            self.stop_children()
            if reaper:
                reaper.stop()
            if pulse:
                pulse.stop()
                pulse.join(timeout=2)
            if redis:
                redis.stop()
            self.say("Stopped.")

    # -- processes ----------------------------------------------------------------------------
    def spawn(self, label: str, argv: list[str]) -> None:
        # A session of its own: Ctrl-C reaches only this supervisor, which stops children in order.
        process = subprocess.Popen(argv, cwd=settings.BASE_DIR, start_new_session=True, env=os.environ.copy())
        self.children.append((label, process))

    def start_console(self, host: str, port: int) -> None:
        self.spawn("console", [sys.executable, "-m", "daphne", "-b", host, "-p", str(port),
                               "fdconsole.asgi:application"])

    def start_node(self, topic: str, name: str) -> None:
        self.spawn(name, [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "fdnode",
                          "--topic", topic, "--name", name])

    def supervise(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        reported: set[str] = set()
        while not self.stopping.wait(0.5):
            self.keep_redis_alive()
            for label, process in self.children:
                code = process.poll()
                if code is None or label in reported:
                    continue
                reported.add(label)
                if label == "console":
                    self.say(f"The console exited with code {code}; stopping everything.")
                    return
                self.say(f"{label} exited with code {code}. Start it again with: "
                         f"python manage.py fdnode --topic {self.topic} --name {label}")

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
        except RuntimeError as exc:
            self.say(f"The embedded Redis did not start again: {redact(str(exc), redis.url)}; trying again "
                     f"in {REDIS_BACKOFF_S:g} s.")

    def stop_children(self) -> None:
        for _, process in self.children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for label, process in self.children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{label} did not stop within {STOP_TIMEOUT_S}s; killing it.")
                process.kill()
                process.wait()

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
        self.stdout.write(line)
        self.stdout.flush()


def run_dir() -> Path:
    """Where ``make run`` keeps its secrets (FD_RUN_DIR, default .run/): owner-only."""
    path = Path(os.environ.get("FD_RUN_DIR") or Path(settings.BASE_DIR) / ".run")
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def use_redis_url(url: str) -> None:
    """Makes ``url`` the console's Redis here and in every process started from now on (the console,
    the nodes): the settings that name it, and FD_REDIS_URL."""
    os.environ["FD_REDIS_URL"] = url
    settings.FD_REDIS_URL = url
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [url]
    settings.RQ_QUEUES["default"]["URL"] = url
