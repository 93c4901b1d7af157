"""The processes ``fdcluster`` keeps running: each is started again when it dies, after a backoff.

Design note. A child that dies waits ``BACKOFF_FIRST_S`` before it is started again, twice as long after
each further death, up to ``BACKOFF_MAX_S``; one that stayed up ``STABLE_S`` counts as healthy again, so
its next death waits the first backoff only. Each child leads a session (and process group) of its own:
a terminal's Ctrl-C reaches the supervisor alone, which stops the children in its own order, and a
child's leftovers (its process group) are killed with it. What the supervisor reports of a death (a
database row, an event in Redis) is written by a ``Recorder`` thread: a database or a Redis that hangs
delays the report, never a restart or a stop.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # up this long, a child's backoff starts again from BACKOFF_FIRST_S


def exit_status(returncode: int) -> str:
    """How a process ended, in words: "exit code 1", "killed by SIGKILL"."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass(frozen=True)
class Death:
    """A child found dead: how it ended, and how long until it is started again."""

    label: str
    returncode: int
    delay_s: float

    @property
    def status(self) -> str:
        return exit_status(self.returncode)

    def __str__(self) -> str:
        ended = f"was {self.status}" if self.returncode < 0 else f"exited with code {self.returncode}"
        return f"{self.label} {ended}; starting it again in {self.delay_s:g} s."


class Child:
    """One process of the cluster (the console, a node), started again after a backoff when it dies."""

    def __init__(self, label: str, argv: list[str], cwd: Path | str) -> None:
        self.label, self.argv, self.cwd = label, argv, cwd
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0  # time.monotonic() of the last start
        self.backoff_s = BACKOFF_FIRST_S  # the wait after its next death
        self.restart_at: float | None = None  # while dead: when to start it again
        self.death: Death | None = None  # its last death, once it died
        self.group_killed = False  # its process group was killed after it ended (not again: pid reuse)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Child:
        """Starts it in a session of its own, with this process's environment as it is now."""
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, start_new_session=True,
                                        env=os.environ.copy())
        self.started_at, self.restart_at, self.group_killed = time.monotonic(), None, False
        return self

    def check(self, now: float) -> Death | None:
        """A ``Death`` when it is found dead now (once per death), with its wait before ``due``."""
        if self.process is None or self.restart_at is not None or self.process.poll() is None:
            return None
        self.kill_group()  # what it left behind goes with it
        if now - self.started_at >= STABLE_S:
            self.backoff_s = BACKOFF_FIRST_S
        delay, self.backoff_s = self.backoff_s, min(self.backoff_s * 2, BACKOFF_MAX_S)
        self.restart_at = now + delay
        self.death = Death(self.label, self.process.returncode, delay)
        return self.death

    def postpone(self, now: float) -> None:
        """It could not be started again: the next try waits its backoff."""
        self.restart_at = now + self.backoff_s

    def due(self, now: float) -> bool:
        """Whether it is dead and its backoff has run out."""
        return self.restart_at is not None and now >= self.restart_at

    def terminate(self) -> None:
        """SIGTERM to the child itself: it stops in its own way (a node finishes or hands back its work)."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL to its whole process group (it, and any process it started), then reaps it."""
        if self.process is None or self.group_killed:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # it leads its group: start_new_session
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
        self.process.wait()
        self.group_killed = True


class Recorder(threading.Thread):
    """Runs the supervisor's reports one at a time, in order, off its loop; one that fails is a warning.
    ``tidy`` runs before each report and at the end (the console's: Django's ``close_old_connections``)."""

    def __init__(self, tidy: Callable[[], None] = lambda: None) -> None:
        super().__init__(name="fd-recorder", daemon=True)
        self.tidy = tidy
        self.reports: queue.SimpleQueue[tuple[str, Callable[[], object]] | None] = queue.SimpleQueue()

    def record(self, what: str, report: Callable[[], object]) -> None:
        """Queues ``report``; ``what`` completes "could not ..." when it fails."""
        self.reports.put((what, report))

    def run(self) -> None:
        while (item := self.reports.get()) is not None:
            what, report = item
            try:
                self.tidy()  # a connection an outage broke is dropped: the report reconnects
                report()
            except Exception as exc:  # top-level loop: the database or a Redis is down; the next one runs
                log.warning("could not %s: %s", what, exc)
        self.tidy()

    def stop(self) -> None:
        """Ends the thread once the reports queued before are written."""
        self.reports.put(None)
