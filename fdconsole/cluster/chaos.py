"""``fdbench chaos``: a steady load of real requests while the cluster is hurt, counting what it lost.

Design note. The benchmark runs a cluster of its own (``fdcluster`` on a free port, its embedded Redis
keeping an append-only file in a temporary run directory, ``--nodes`` node processes, the tiny model,
and by default a SQLite database of its own), so that nothing of the user's is touched. Clients submit
``--rate`` requests a second through the native API, each with its own ``request_id`` so that a call
retried after a lost reply is the same request (issue: idempotent submission); one in three reads its
tokens over SSE, reconnecting with ``Last-Event-ID`` whenever the stream breaks, and counts every token
index it is given twice. Meanwhile, every ``--fault-every`` seconds, one fault in turn: a node SIGKILLed
(``fdcluster`` starts it again), the console SIGKILLed (likewise), Redis SIGKILLed (started again with
its data), the database paused (a write lock held), and once, mid-run, Redis SIGKILLed with its data
removed (the reconciler queues every accepted request again from its row). Then the load stops and
every accepted request is awaited to its end. Figures: accepted, finished, expired, lost (accepted but
never final, or failed), duplicated tokens, the longest failover (the longest a streamed request went
without a token) and every request that ended other than finished, with why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import httpx

from fdconsole.cluster.serve_bench import sse_events
from fdconsole.embedded_redis import server_pid

START_TIMEOUT_S = 180  # migrations, two model loads, on a slow machine
SUBMIT_PATIENCE_S = 60  # how long a client keeps retrying one submission through faults
DRAIN_TIMEOUT_S = 180  # after the load: how long the accepted requests get to end
PAUSE_S = 4.0  # a database pause
PROMPTS = ("chaos is a ladder", "nothing accepted is ever lost", "once and only once", "tokens, in order")
FAULTS = ("kill_node", "kill_console", "kill_redis", "pause_database")


class ChaosError(Exception):
    """The benchmark's cluster could not be started."""


@dataclass
class Outcome:
    """What the clients saw of one request."""

    request_id: str
    streamed: bool
    accepted: bool = False
    status: str = ""
    why: str = ""
    duplicated: int = 0  # token indexes the stream gave more than once
    longest_gap_s: float = 0.0  # the longest this stream went without a new token


@dataclass
class Figures:
    outcomes: list[Outcome] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)

    def fault(self, name: str) -> None:
        self.faults[name] = self.faults.get(name, 0) + 1


def bench_chaos(*, minutes: float, rate: float, nodes: int, fault_every: float, max_tokens: int,
                database_url: str | None, log) -> dict[str, Any]:
    """Run the cluster, the load and the faults; the figures."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per call would bury the progress
    run_dir = Path(tempfile.mkdtemp(prefix="fd-chaos-"))
    try:
        with Cluster(run_dir, nodes, database_url, log) as cluster:
            figures = asyncio.run(_load_and_faults(cluster, minutes, rate, fault_every, max_tokens, log))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return _summary(minutes, rate, figures)


# -- the cluster ------------------------------------------------------------------------------------------
class Cluster:
    """``fdcluster`` on free ports, its processes found by their command lines for the faults."""

    def __init__(self, run_dir: Path, nodes: int, database_url: str | None, log) -> None:
        self.run_dir, self.nodes, self.log = run_dir, nodes, log
        self.port, self.redis_port = _free_port(), _free_port()
        self.database_url = database_url or f"sqlite:///{run_dir / 'chaos.sqlite3'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.token = ""

    def __enter__(self) -> Self:
        env = {**os.environ, "FD_RUN_DIR": str(self.run_dir), "DATABASE_URL": self.database_url,
               "FD_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0", "FD_MODEL": "tiny",
               "FD_LOG_LEVEL": "WARNING", "FD_DEVICE": "cpu", "FD_TOKEN_DELAY_MS": "20"}
        self.log(f"starting a cluster of {self.nodes} node(s) in {self.run_dir}")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "fdcluster", "--nodes", str(self.nodes), "--port", str(self.port)],
            cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.run_dir / "fdcluster.log", "wb"), start_new_session=True)  # noqa: SIM115
        self._wait_up()
        return self

    def _wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ChaosError(f"fdcluster exited with {self.process.returncode}: "
                                 f"{(self.run_dir / 'fdcluster.log').read_text()[-2000:]}")
            token_file = self.run_dir / "api_token"
            if token_file.exists() and len(self.node_pids()) == self.nodes and self._ready():
                self.token = token_file.read_text().strip()
                return
            time.sleep(0.5)
        raise ChaosError(f"the cluster did not come up within {START_TIMEOUT_S}s")

    def _ready(self) -> bool:
        """Every node idle or busy, as the console's API sees them."""
        token = (self.run_dir / "api_token").read_text().strip()
        try:
            answer = httpx.get(f"{self.url}/api/v1/nodes", timeout=2,
                               headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError:
            return False
        if answer.status_code != 200:
            return False
        return sum(n["state"] in ("idle", "busy") for n in answer.json()["nodes"]) == self.nodes

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    # -- its processes, by command line --
    def children(self) -> dict[int, str]:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                if parent == self.process.pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
        return found

    def node_pids(self) -> list[int]:
        return [pid for pid, argv in self.children().items() if " fdnode " in argv]

    def console_pid(self) -> int | None:
        return next((pid for pid, argv in self.children().items() if "daphne" in argv), None)

    # -- the faults --
    def kill_node(self) -> None:
        pids = self.node_pids()
        if pids:
            os.kill(random.choice(pids), signal.SIGKILL)

    def kill_console(self) -> None:
        pid = self.console_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)

    def kill_redis(self, keep_data: bool = True) -> None:
        os.kill(server_pid(self.redis_port), signal.SIGKILL)
        if not keep_data:  # before fdcluster starts it again (it looks twice a second)
            shutil.rmtree(self.run_dir / "redis", ignore_errors=True)

    def pause_database(self, seconds: float = PAUSE_S) -> None:
        """Holds a write lock on the database for ``seconds``: every write waits (a pause, not an outage).
        In a thread: the load goes on meanwhile."""
        threading.Thread(target=self._hold_write_lock, args=(seconds,), daemon=True).start()

    def _hold_write_lock(self, seconds: float) -> None:
        if self.database_url.startswith("sqlite:///"):
            path = self.database_url.removeprefix("sqlite:///")
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
            try:
                db.execute("BEGIN EXCLUSIVE")
                time.sleep(seconds)
                db.execute("ROLLBACK")
            finally:
                db.close()
            return
        import psycopg

        with psycopg.connect(self.database_url) as db:  # a transaction, ended (rolled back) on leaving
            db.execute("LOCK TABLE inference_request IN ACCESS EXCLUSIVE MODE")
            time.sleep(seconds)


# -- the load ---------------------------------------------------------------------------------------------
async def _load_and_faults(cluster: Cluster, minutes: float, rate: float, fault_every: float, max_tokens: int,
                           log) -> Figures:
    figures = Figures()
    headers = {"Authorization": f"Bearer {cluster.token}"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=cluster.url, headers=headers, timeout=10, limits=limits) as http:
        end = time.monotonic() + minutes * 60
        faults = asyncio.create_task(_faults(cluster, figures, end, fault_every, log))
        tasks = []
        n = 0
        while time.monotonic() < end:
            outcome = Outcome(f"chaos-{uuid.uuid4().hex[:12]}", streamed=n % 3 == 0)
            figures.outcomes.append(outcome)
            tasks.append(asyncio.create_task(_one(http, outcome, PROMPTS[n % len(PROMPTS)], max_tokens)))
            n += 1
            await asyncio.sleep(random.expovariate(rate))
        await faults
        log(f"load over: {n} requests sent; waiting for every accepted one to end")
        await asyncio.gather(*tasks)
    return figures


async def _faults(cluster: Cluster, figures: Figures, end: float, every: float, log) -> None:
    """One fault every ``every`` seconds, in turn, and Redis losing its data once, half-way."""
    empty_at = time.monotonic() + (end - time.monotonic()) / 2
    turn = 0
    while time.monotonic() + every < end:
        await asyncio.sleep(every)
        try:
            if empty_at is not None and time.monotonic() >= empty_at:
                cluster.kill_redis(keep_data=False)
                name, empty_at = "restart_redis_empty", None
            else:
                name = FAULTS[turn % len(FAULTS)]
                getattr(cluster, name)()
                turn += 1
        except (LookupError, ProcessLookupError) as exc:  # what it was to hurt is between two lives
            log(f"fault skipped: {exc}")
            continue
        figures.fault(name)
        log(f"fault: {name}")


async def _one(http: httpx.AsyncClient, outcome: Outcome, prompt: str, max_tokens: int) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "request_id": outcome.request_id}
    answer = await _submit(http, body)
    outcome.accepted = answer == 202
    if answer == 409:  # its own request_id, taken: an earlier try reached Redis, and its row is gone
        outcome.accepted, outcome.status = True, "lost"
        outcome.why = "a retry was refused as a duplicate (409): an earlier try was queued without a row"
        return
    if not outcome.accepted:
        outcome.status, outcome.why = "refused", f"not accepted within the clients' patience (last: {answer})"
        return
    if outcome.streamed:
        await _stream(http, outcome)
    final = await _await_final(http, outcome.request_id)
    if final is None:
        outcome.status, outcome.why = "lost", f"not final {DRAIN_TIMEOUT_S}s after the load"
    else:
        outcome.status = final["status"]
        error = final.get("error") or {}
        outcome.why = f"{error.get('code')}: {error.get('message')}" if error else ""


async def _submit(http: httpx.AsyncClient, body: dict) -> int | None:
    """Submits until accepted; the last status (None: no reply at all). A lost reply, a 503 (Redis or the
    database away) or a 429 is tried again with the same request_id, which makes the retry the same
    request."""
    deadline, status = time.monotonic() + SUBMIT_PATIENCE_S, None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            status = (await http.post("/api/v1/topics/default/requests", json=body)).status_code
            if status not in (429, 500, 502, 503, 504):
                return status
        await asyncio.sleep(0.5)
    return status


async def _stream(http: httpx.AsyncClient, outcome: Outcome) -> None:
    """Reads the tokens over SSE, reconnecting with Last-Event-ID; counts an index seen twice."""
    seen: set[int] = set()
    last_id, last_token = None, None  # the gaps are between tokens: waiting for the first is no failover
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    path = f"/api/v1/requests/{quote(outcome.request_id, safe='')}/stream"
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": last_id} if last_id is not None else {}
        with contextlib.suppress(httpx.HTTPError):
            timeout = httpx.Timeout(10, read=30)
            async with http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    await asyncio.sleep(0.5)
                    continue
                async for event, data in sse_events(response.aiter_lines()):
                    if event == "token":
                        now = time.monotonic()
                        if last_token is not None:
                            outcome.longest_gap_s = max(outcome.longest_gap_s, now - last_token)
                        last_token = now
                        index = data["index"]
                        outcome.duplicated += index in seen
                        seen.add(index)
                        last_id = str(index)
                    elif event == "done":
                        return
        await asyncio.sleep(0.3)


async def _await_final(http: httpx.AsyncClient, request_id: str) -> dict | None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = await http.get(f"/api/v1/requests/{quote(request_id, safe='')}")
            if answer.status_code == 200 and answer.json()["status"] not in ("queued", "running"):
                return answer.json()
        await asyncio.sleep(0.5)
    return None


# -- the figures ------------------------------------------------------------------------------------------
def _summary(minutes: float, rate: float, figures: Figures) -> dict[str, Any]:
    accepted = [o for o in figures.outcomes if o.accepted]
    count = lambda status: sum(o.status == status for o in accepted)  # noqa: E731
    lost = [o for o in accepted if o.status not in ("finished", "expired", "cancelled")]
    return {
        "bench": "chaos", "minutes": minutes, "rate": rate, "sent": len(figures.outcomes),
        "accepted": len(accepted), "finished": count("finished"), "expired": count("expired"),
        "lost": len(lost), "duplicated_tokens": sum(o.duplicated for o in accepted),
        "longest_failover_s": round(max((o.longest_gap_s for o in accepted if o.streamed), default=0.0), 3),
        "faults": figures.faults,
        "not_finished": [{"request_id": o.request_id, "status": o.status, "why": o.why}
                         for o in figures.outcomes if o.status != "finished"],
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
