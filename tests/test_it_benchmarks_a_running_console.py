"""``manage.py fdbench serve``: a load through a running console's API and SSE streams. Against the real
console with a real node, every request completes at each concurrency level and the figures come back
in the contract's shape; a refused token, a missing OpenAI API and requests that never run are named or
counted, never hidden. The pure parts (SSE parsing, percentiles, the summary, the SVG) are checked
without a console."""

from __future__ import annotations

import asyncio
import json
import xml.dom.minidom
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from fdconsole.cluster.serve_bench import (
    RequestResult,
    StreamReads,
    parse_levels,
    percentile_ms,
    sse_events,
    summarize,
)
from fdconsole.cluster.serve_plot import write_svg

pytestmark = pytest.mark.postgresql

LEVEL_KEYS = {"concurrency", "requests", "completed", "errors", "requests_per_s", "tokens_per_s",
              "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms"}


def fdbench_serve(console, *args: str) -> dict:
    out, err = StringIO(), StringIO()
    call_command("fdbench", "serve", "--url", console.url, *args, stdout=out, stderr=err)
    return json.loads(out.getvalue().strip().splitlines()[-1])


# -- against the running console --------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)  # the console and nodes share the database
def test_every_request_completes_at_each_level_and_the_temporary_token_is_gone(console, node_processes,
                                                                              monkeypatch, tmp_path):
    from fdconsole.api.models import ApiToken

    node_processes.start("bench-1", "default")
    monkeypatch.delenv("FD_API_TOKEN", raising=False)  # no token given: the bench mints its own
    plot = tmp_path / "serve.svg"
    figures = fdbench_serve(console, "--requests", "4", "--concurrency", "1,2", "--max-tokens", "4",
                            "--plot", str(plot))

    assert figures["bench"] == "serve" and figures["api"] == "native"
    assert [level["concurrency"] for level in figures["results"]] == [1, 2]
    for level in figures["results"]:
        assert set(level) == LEVEL_KEYS
        assert level["requests"] == level["completed"] == 4 and level["errors"] == 0
        assert level["requests_per_s"] > 0 and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"]
        assert 0 <= level["itl_p50_ms"] <= level["itl_p99_ms"]  # 4 tokens: one read may bring them all
        assert 0 <= level["tpot_p50_ms"] <= level["tpot_p99_ms"]
    assert not ApiToken.objects.filter(user__username="fdbench").exists()
    assert "<polyline" in plot.read_text()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_wrong_token_is_refused_by_name(console):
    with pytest.raises(CommandError, match="refused the API token"):
        fdbench_serve(console, "--token", "fd_not-a-token", "--requests", "1")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_requests_that_never_run_count_as_errors(console, api_token):
    from fdconsole.topics.services import change_topic, ensure_node, ensure_topic

    topic = change_topic(ensure_topic("default"), {"scheduler_ttl": 1})
    ensure_node("bench-absent", topic)  # enabled, never started: its requests expire
    figures = fdbench_serve(console, "--token", api_token, "--requests", "2", "--concurrency", "2",
                            "--max-tokens", "4")
    [level] = figures["results"]
    assert (level["completed"], level["errors"]) == (0, 2)
    assert level["ttft_p50_ms"] is None and level["itl_p99_ms"] is None


# -- the pure parts -----------------------------------------------------------------------------------
async def events_of(text: str) -> list:
    async def lines():
        for line in text.split("\n"):
            yield line

    return [event async for event in sse_events(lines())]


def test_sse_events_are_parsed_with_comments_skipped_and_data_lines_joined():
    text = (': keep-alive\n\nevent: token\ndata: {"index": 0, "token_id": 72, "text": "H"}\n\n'
            'data: [DONE]\n\nevent: note\ndata: two\ndata: lines\n\n')
    assert asyncio.run(events_of(text)) == [("token", {"index": 0, "token_id": 72, "text": "H"}),
                                            ("message", "[DONE]"), ("note", "two\nlines")]


def test_the_summary_counts_failures_as_errors_and_takes_latencies_from_completed_requests():
    done = RequestResult(ok=True)
    for at in (0.010, 0.012, 0.015):  # submitted at 0: TTFT 10 ms, gaps of 2 and 3 ms
        done.add_token(0.0, at)
    broken = RequestResult(error="the stream ended before its done event")
    broken.add_token(0.0, 0.5)
    level = summarize(2, 3, [done, broken], wall_s=0.5)
    assert set(level) == LEVEL_KEYS
    assert (level["completed"], level["errors"]) == (1, 2)  # one never even came back
    assert level["requests_per_s"] == 2.0 and level["tokens_per_s"] == 8.0  # every token received
    assert level["ttft_p50_ms"] == level["ttft_p99_ms"] == 10.0
    assert level["itl_p50_ms"] == 2.5 and 2.9 < level["itl_p99_ms"] <= 3.0
    assert level["tpot_p50_ms"] == level["tpot_p99_ms"] == 2.5  # 5 ms over its 2 later tokens


def test_tokens_that_arrive_in_one_read_make_one_inter_token_gap():
    result = RequestResult(ok=True)
    # reads 1, 1, 2, 2, 2, 3 at 10, 10.01, 30, 30.01, 30.02, 45 ms: gaps 20 and 15 ms, none of ~0
    for read, at_ms in ((1, 10.0), (1, 10.01), (2, 30.0), (2, 30.01), (2, 30.02), (3, 45.0)):
        result.add_token(0.0, at_ms / 1000, read)
    assert [round(gap * 1000, 2) for gap in result.itls_s] == [19.99, 14.98]
    assert result.num_tokens == 6 and round(result.tpot_s * 1000, 2) == 7.0  # 35 ms over 5 tokens


def test_a_request_streamed_whole_in_one_read_counts_an_inter_token_gap_of_zero():
    whole = RequestResult(ok=True)
    for at_ms in (10.0, 10.01, 10.02):
        whole.add_token(0.0, at_ms / 1000, read=1)
    alone = RequestResult(ok=True)
    alone.add_token(0.0, 0.010, read=1)
    assert whole.itls_s == [] and whole.arrival_gaps_s == [0.0] and alone.arrival_gaps_s == []
    level = summarize(1, 2, [whole, alone], wall_s=1.0)
    assert level["itl_p50_ms"] == level["itl_p99_ms"] == 0.0
    assert summarize(1, 1, [alone], wall_s=1.0)["itl_p50_ms"] is None  # one token: no gap at all


def test_lines_are_split_across_reads_and_each_knows_its_read():
    async def chunks():
        for chunk in ("event: tok", "en\r\ndata: 1\n\nevent: token\ndata: 2\n", "\nevent: done\n",
                      "data: {}\n\n"):
            yield chunk

    async def read_all():
        reads = StreamReads(chunks())
        return [(event, data, reads.count) async for event, data in sse_events(reads.lines())]

    assert asyncio.run(read_all()) == [("token", 1, 2), ("token", 2, 3), ("done", {}, 4)]


def test_percentiles_are_null_without_samples():
    assert percentile_ms([], 50) is None
    assert percentile_ms([0.004], 99) == 4.0
    assert percentile_ms([i / 1000 for i in range(1, 102)], 50) == 51.0


@pytest.mark.parametrize("text", ["0", "1,,-2", "a", ""])
def test_bad_concurrency_levels_are_refused_by_name(text):
    with pytest.raises(ValueError, match="--concurrency"):
        parse_levels(text)


def test_the_plot_is_a_self_contained_svg_of_both_figures(tmp_path):
    results = [{"concurrency": c, "tokens_per_s": t, "ttft_p50_ms": f}
               for c, t, f in ((1, 150.0, 20.0), (4, 400.0, 35.5), (16, 600.0, None))]
    path = write_svg(tmp_path / "serve.svg", results)
    document = xml.dom.minidom.parse(str(path))
    assert document.documentElement.tagName == "svg"
    lines = document.getElementsByTagName("polyline")
    assert [len(line.getAttribute("points").split()) for line in lines] == [3, 2]  # null: no point
    assert "href" not in path.read_text()  # nothing outside the file


def test_a_png_plot_charts_tokens_per_second_and_ttft_percentiles(tmp_path):
    from fdconsole.cluster.serve_plot import write_plot

    results = [{"concurrency": c, "tokens_per_s": 100.0 * c, "ttft_p50_ms": 20.0 + c,
                "ttft_p99_ms": 40.0 + 2 * c} for c in (1, 4, 16)]
    results.append({"concurrency": 32, "tokens_per_s": None, "ttft_p50_ms": None, "ttft_p99_ms": None})
    path = write_plot(tmp_path / "serve.png", results)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 200  # two charts side by side
    assert write_plot(tmp_path / "serve.svg", results).read_text().startswith("<svg")
