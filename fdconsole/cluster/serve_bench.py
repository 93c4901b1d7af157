"""``fdbench serve``: a load through a running console's HTTP API and SSE streams (like ``vllm bench
serve``): for each concurrency level C, N requests, C clients at a time, each submitting one request and
reading its token stream to the end.

Design note: one small client class per API (``CLIENTS[kind]``) knows how to probe the console and run
one request, returning what it saw as a ``RequestResult``; the level runner and the summary know
nothing of HTTP. Time to first token runs from just before the submit to the first token event;
inter-token latencies are the gaps between one request's successive arrivals of tokens (the token
events of one network read arrived together: one gap), and time per output token is a request's time
from its first token to its last over its later tokens (both as ``vllm bench serve``). A failed request
(an HTTP error, a broken or timed-out stream, a final status other than ``finished``) counts in
``errors``; its tokens still count in tokens/s (they were received), its latencies do not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from scheduler.bench import percentile_ms

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"
BENCH_USER = "fdbench"  # the user of the temporary token minted when none is given
REQUEST_TIMEOUT_S = 120.0  # one request, submit to the end of its stream
PROBE_TIMEOUT_S = 10.0
# A malformed answer (not JSON, a field missing or of the wrong type) fails its request, not the bench.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError)


class ServeBenchError(Exception):
    """The benchmark cannot run against this console (nothing answers, a refused token, no such API)."""


@dataclass
class RequestResult:
    """What one client saw of one request; times in seconds."""

    ok: bool = False
    num_tokens: int = 0
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    error: str | None = None
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    last_read: int | None = None

    def add_token(self, started: float, now: float, read: int | None = None) -> None:
        """A token event arrived at ``now`` for a request submitted at ``started``; ``read`` numbers the
        network read of the stream that brought it. Tokens of one read arrived together: the gap before
        the first of them is one inter-token latency and the others add none (``vllm bench serve``
        counts a chunk so), where a gap per token would count each of them as a latency of zero."""
        if self.ttft_s is None:
            self.ttft_s = now - started
            self.first_token_at = now
        elif read is None or read != self.last_read:
            self.itls_s.append(now - self.last_token_at)
        self.last_token_at, self.last_read, self.num_tokens = now, read, self.num_tokens + 1

    @property
    def arrival_gaps_s(self) -> list[float]:
        """The inter-token latencies this request contributes: its gaps between arrivals; one of zero
        when it gave two or more tokens that all came in one read (no wait between them was seen), so
        that a short request streamed whole still counts, as a gap per token event would count it."""
        if not self.itls_s and self.num_tokens > 1:
            return [0.0]
        return self.itls_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: the request's decode time over its later tokens."""
        if self.num_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.num_tokens - 1)


class StreamReads:
    """The lines of a streamed response body, counting the network reads that brought them (``count``:
    the read of the line given last). A line ends with a line feed, or a carriage return and a line feed,
    as the console writes them."""

    def __init__(self, chunks: AsyncIterator[str]) -> None:
        self.chunks, self.count = chunks, 0

    async def lines(self) -> AsyncIterator[str]:
        pending = ""
        async for chunk in self.chunks:
            self.count += 1
            *complete, pending = (pending + chunk).split("\n")
            for line in complete:
                yield line.removesuffix("\r")
        if pending:
            yield pending.removesuffix("\r")


# -- the clients, one per API ---------------------------------------------------------------------------
class ServeClient(ABC):
    """One API's way to probe the console and to run one request (submit, then read its stream)."""

    def __init__(self, http: httpx.AsyncClient, topic: str, prompt: str, max_tokens: int) -> None:
        self.http, self.topic, self.prompt, self.max_tokens = http, topic, prompt, max_tokens

    @abstractmethod
    async def probe(self) -> None:
        """Raise ServeBenchError, saying why, when this API cannot be benchmarked at the console."""

    @abstractmethod
    async def run_one(self) -> RequestResult:
        """Submit one request and read its stream to the end."""


class NativeClient(ServeClient):
    """``POST /api/v1/topics/{topic}/requests``, then ``GET /api/v1/requests/{id}/stream`` (SSE)."""

    async def probe(self) -> None:
        answer = await self.http.get(f"/api/v1/topics/{quote(self.topic, safe='')}", timeout=PROBE_TIMEOUT_S)
        if answer.status_code == 404:
            raise ServeBenchError(f"the console has no topic '{self.topic}' (--topic)")
        refuse_unless_ok(answer)

    async def run_one(self) -> RequestResult:
        started = time.perf_counter()
        request_id, result = None, RequestResult()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0}
                answer = await self.http.post(f"/api/v1/topics/{quote(self.topic, safe='')}/requests",
                                              json=body)
                if answer.status_code != 202:
                    return RequestResult(error=f"submit answered {answer.status_code}: {answer.text[:200]}")
                request_id = answer.json()["request_id"]
                await self._stream(request_id, started, result)
        except (httpx.HTTPError, TimeoutError, *MALFORMED) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        if not result.ok and request_id is not None:
            await cancel(self.http, request_id)
        return result

    async def _stream(self, request_id: str, started: float, result: RequestResult) -> None:
        path = f"/api/v1/requests/{quote(request_id, safe='')}/stream"
        async with self.http.stream("GET", path) as response:
            if response.status_code != 200:
                result.error = f"stream answered {response.status_code}"
                return
            reads = StreamReads(response.aiter_text())
            async for event, data in sse_events(reads.lines()):
                if event == "token":
                    result.add_token(started, time.perf_counter(), reads.count)
                elif event == "done":
                    status = data.get("status")
                    result.ok = status == "finished"
                    if not result.ok:
                        result.error = f"request {request_id} ended {status}: {data.get('error')}"
                    return
                elif event == "error":
                    result.error = f"stream error: {data}"
                    return
        result.error = result.error or "the stream ended before its done event"


class OpenAIClient(ServeClient):
    """``POST /v1/completions`` with ``stream: true``: ``data: {chunk}`` events, then ``data: [DONE]``.
    The console sends one chunk per token (its text may be empty: part of a character), then one with
    the finish reason; each request carries its own ``request_id``, so a request given up on is
    cancelled through the native API like the native client's."""

    async def probe(self) -> None:
        answer = await self.http.get("/v1/models", timeout=PROBE_TIMEOUT_S)
        if answer.status_code == 404:
            raise ServeBenchError(f"the OpenAI-compatible API is not served at {self.http.base_url}: "
                                  "GET /v1/models answered 404; use --api native")
        refuse_unless_ok(answer)
        if self.topic not in {model.get("id") for model in answer.json().get("data", [])}:
            raise ServeBenchError(f"the console has no model '{self.topic}' (a topic with an enabled node; "
                                  "--topic)")

    async def run_one(self) -> RequestResult:
        request_id = f"fdbench-{uuid.uuid4().hex}"
        body = {"model": self.topic, "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "request_id": request_id}
        started, result = time.perf_counter(), RequestResult()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S), \
                    self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    result.error = f"completions answered {response.status_code}: {response.text[:200]}"
                else:
                    await self._read(response, started, result)
        except (httpx.HTTPError, TimeoutError, *MALFORMED) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        if not result.ok:
            await cancel(self.http, request_id)
        return result

    async def _read(self, response: httpx.Response, started: float, result: RequestResult) -> None:
        finish_reason = None
        reads = StreamReads(response.aiter_text())
        async for _, data in sse_events(reads.lines()):
            if data == "[DONE]":
                result.ok = result.error is None and finish_reason in ("stop", "length")
                if result.error is None and not result.ok:
                    result.error = f"the request ended with finish_reason {finish_reason}"
                return
            if "error" in data:
                result.error = f"stream error: {data['error']}"
                continue
            for choice in data["choices"]:
                if choice["finish_reason"] is None:
                    result.add_token(started, time.perf_counter(), reads.count)
                else:
                    finish_reason = choice["finish_reason"]
        result.error = result.error or "the stream ended before [DONE]"


CLIENTS: dict[str, type[ServeClient]] = {"native": NativeClient, "openai": OpenAIClient}


async def cancel(http: httpx.AsyncClient, request_id: str) -> None:
    """Best effort: a request the benchmark gave up on should not keep a node busy."""
    try:
        await http.delete(f"/api/v1/requests/{quote(request_id, safe='')}", timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        pass


def token_refused(answer: httpx.Response) -> ServeBenchError:
    return ServeBenchError(f"the console refused the API token (401): {answer.text[:200]} "
                           "(--token, FD_API_TOKEN)")


def refuse_unless_ok(answer: httpx.Response) -> None:
    if answer.status_code == 401:
        raise token_refused(answer)
    if answer.status_code >= 400:
        raise ServeBenchError(f"{answer.request.method} {answer.request.url.path} answered "
                              f"{answer.status_code}: {answer.text[:200]}")


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """(event name, data) per Server-Sent Event; data parsed as JSON where it is JSON."""
    event, data = "message", []
    async for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    yield event, json.loads(text)
                except ValueError:
                    yield event, text
            event, data = "message", []
        elif line.startswith(":"):
            continue  # a comment: keep-alive
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))


# -- the load and its figures ---------------------------------------------------------------------------
async def run_level(client: ServeClient, num_requests: int,
                    concurrency: int) -> tuple[list[RequestResult], float]:
    """``num_requests`` requests, ``concurrency`` at a time; returns their results and the wall time."""
    remaining = iter(range(num_requests))  # shared by the clients: each takes the next until none is left
    results: list[RequestResult] = []

    async def one_client() -> None:
        for _ in remaining:
            results.append(await client.run_one())

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(min(concurrency, num_requests))))
    return results, time.perf_counter() - started


def summarize(concurrency: int, num_requests: int, results: list[RequestResult], wall_s: float) -> dict:
    """One level's figures, as the contract names them."""
    completed = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in completed if r.ttft_s is not None]
    itls = [gap for r in completed for gap in r.arrival_gaps_s]
    tpots = [r.tpot_s for r in completed if r.tpot_s is not None]
    num_tokens = sum(r.num_tokens for r in results)
    return {"concurrency": concurrency, "requests": num_requests, "completed": len(completed),
            "errors": num_requests - len(completed),
            "requests_per_s": round(len(completed) / wall_s, 3) if wall_s > 0 else None,
            "tokens_per_s": round(num_tokens / wall_s, 2) if wall_s > 0 else None,
            "ttft_p50_ms": percentile_ms(ttfts, 50), "ttft_p99_ms": percentile_ms(ttfts, 99),
            "itl_p50_ms": percentile_ms(itls, 50), "itl_p99_ms": percentile_ms(itls, 99),
            "tpot_p50_ms": percentile_ms(tpots, 50), "tpot_p99_ms": percentile_ms(tpots, 99)}


async def run_levels(api: str, url: str, token: str, topic: str, prompt: str, max_tokens: int,
                     num_requests: int, levels: list[int], log: Callable[[str], Any]) -> list[dict]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per HTTP call would drown the progress
    limits = httpx.Limits(max_connections=2 * max(levels) + 4)  # a submit and a stream per client
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        client = CLIENTS[api](http, topic, prompt, max_tokens)
        try:
            await client.probe()
        except httpx.HTTPError as exc:
            raise ServeBenchError(f"no console answers at {url}: {exc} (--url)") from None
        figures = []
        for concurrency in levels:
            log(f"concurrency {concurrency}: {num_requests} requests of {max_tokens} tokens...")
            results, wall_s = await run_level(client, num_requests, concurrency)
            level = summarize(concurrency, num_requests, results, wall_s)
            log(f"  {level['completed']} completed, {level['errors']} errors in {wall_s:.2f}s: "
                f"{level['tokens_per_s']} tokens/s, TTFT p50 {level['ttft_p50_ms']} ms")
            first_error = next((r.error for r in results if not r.ok), None)
            if first_error:
                log(f"  first error: {first_error}")
            figures.append(level)
    return figures


def bench_serve(*, api: str, url: str, token: str | None, topic: str, prompt: str, max_tokens: int,
                num_requests: int, levels: list[int], log: Callable[[str], Any]) -> dict[str, Any]:
    with bench_token(token) as plain:
        results = asyncio.run(run_levels(api, url.rstrip("/"), plain, topic, prompt, max_tokens,
                                         num_requests, levels, log))
    return {"bench": "serve", "api": api, "url": url, "topic": topic, "max_tokens": max_tokens,
            "results": results}


def parse_levels(text: str, option: str = "--concurrency") -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]; ValueError naming ``option`` otherwise."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ValueError(f"{option} must be positive integers separated by commas, not '{text}'")
    return levels


@contextmanager
def bench_token(token: str | None) -> Iterator[str]:
    """``token``, else FD_API_TOKEN, else a temporary token of user BENCH_USER minted through the ORM
    (so it works against a console sharing this database) and deleted on the way out."""
    token = token or os.environ.get("FD_API_TOKEN")
    if token:
        yield token
        return
    from django.contrib.auth import get_user_model

    from fdconsole.api.models import ApiToken

    user, created = get_user_model().objects.get_or_create(username=BENCH_USER)
    if created:
        user.set_unusable_password()
        user.save()
    row, plain = ApiToken.issue(user, "fdbench serve (temporary)")
    try:
        yield plain
    finally:
        row.delete()
