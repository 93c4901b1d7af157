"""A request's stop strings end its generation with finish "stop" as soon as its text holds one of them;
neither the stop string nor anything after it is ever streamed. Text that may be the start of a stop
string is held back until later tokens tell, and released when it was none. The engine alone, the
batching engine, a run resumed after a failover, a KV handoff, the console's derived output text and
the HTTP API all agree."""

from __future__ import annotations

import pytest

from gpu_worker.batch_engine import BatchEngine
from gpu_worker.capacity import EngineCapacity
from gpu_worker.engine import Engine
from gpu_worker.steps import GenerationStep
from gpu_worker.stop import StopStringStream
from gpu_worker.tokenizer import ByteTokenizer, streamed_text
from scheduler.messages import Request, SamplingParams
from tests.batching import Job, alone, assert_drained, run_batch

PROMPT = "Hello, world"
MAX_TOKENS = 24
ABSENT = "\u2603"  # a snowman: never in the tiny model's text below (checked)


def greedy(engine: Engine, stop: tuple[str, ...] = (), prompt: str = PROMPT,
           resume: list[int] | tuple[int, ...] = ()) -> list[GenerationStep]:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, stop=stop)
    return list(engine.generate(engine.tokenizer.encode(prompt), sampling, resume_token_ids=resume))


def token_ids(steps: list[GenerationStep]) -> list[int]:
    return [s.token_id for s in steps if s.token_id >= 0]


def joined(steps: list[GenerationStep]) -> str:
    return "".join(s.text for s in steps)


@pytest.fixture(scope="module")
def unstopped(engine) -> tuple[list[int], str]:
    """The greedy tokens of ``PROMPT`` without stop strings, and their text before the final flush
    (where a stop string can match)."""
    steps = greedy(engine)
    assert steps[-1].finish_reason == "length"
    ids = token_ids(steps)
    text = streamed_text(ids, None)
    assert ABSENT not in text and len(text) > 16
    return ids, text


def check_stopped(steps: list[GenerationStep], unstopped_ids: list[int], expected_text: str,
                  stop: tuple[str, ...]) -> None:
    """Ended at the token that completed the stop string, with the text before it."""
    last = steps[-1]
    assert last.finish_reason == "stop" and last.token_id >= 0, last
    assert [s.finish_reason for s in steps[:-1]] == [None] * (len(steps) - 1)
    assert [s.index for s in steps] == list(range(len(steps)))
    assert token_ids(steps) == unstopped_ids[:len(steps)]  # the same tokens, up to the stop
    assert joined(steps) == expected_text
    streamed = ""
    for step in steps:  # never a stop string, and never more than the text before it
        streamed += step.text
        assert expected_text.startswith(streamed) and not any(s in streamed for s in stop)
    assert streamed_text(token_ids(steps), "stop", ByteTokenizer(), stop=stop) == expected_text


# -- the engine alone --------------------------------------------------------------------------------
@pytest.mark.parametrize("start,length", [(2, 1), (7, 2), (11, 3), (13, 1), (5, 4)])
def test_generation_ends_before_a_stop_string_spanning_tokens(engine, unstopped, start, length):
    ids, text = unstopped
    stop = text[start:start + length]
    steps = greedy(engine, (stop,))
    check_stopped(steps, ids, text[:text.find(stop)], (stop,))
    assert streamed_text(ids[:len(steps)], None).endswith(stop)  # the last token completed it


def test_a_stop_string_met_in_the_first_token_streams_nothing(engine, unstopped):
    ids, text = unstopped
    assert ByteTokenizer().stream_decoder().push(ids[0]) == text[0]  # one byte, one character
    assert greedy(engine, (text[0],)) == [GenerationStep(0, ids[0], "", "stop")]


def test_the_stop_string_that_ends_first_wins(engine, unstopped):
    ids, text = unstopped
    late, early = text[12:16], text[6:8]
    assert text.find(early) + len(early) < text.find(late) + len(late)
    check_stopped(greedy(engine, (late, ABSENT, early)), ids, text[:text.find(early)], (late, early))
    # Of two ending at the same character, the longer one (it starts first) cuts.
    longer, shorter = text[8:12], text[10:12]
    assert text.find(shorter) == 10 and text.find(longer) == 8
    check_stopped(greedy(engine, (shorter, longer)), ids, text[:8], (shorter, longer))


def test_text_held_back_is_released_when_no_stop_string_completes(engine, unstopped):
    ids, text = unstopped
    plain = greedy(engine)
    # (stop string, the most characters held back at once): its start at token 7, at the first token,
    # and at the last but one (released by the "length" step)
    for stop, most in ((text[7:9] + ABSENT, 2), (text[0] + ABSENT, 1), (text[-2:] + ABSENT, 1)):
        steps = greedy(engine, (stop,))
        assert token_ids(steps) == ids and steps[-1].finish_reason == "length"
        assert joined(steps) == joined(plain)  # all of it came out, only later
        lag = [len(joined(plain[:i + 1])) - len(joined(steps[:i + 1])) for i in range(len(steps))]
        assert max(lag) == most and lag[-1] == 0, stop
        assert streamed_text(ids, "length", stop=(stop,)) == joined(steps)
    assert lag[-2] == 1  # the last case: held until the end


def test_an_end_of_text_or_a_cancel_releases_the_held_back_text_in_its_marker(engine):
    sampling = SamplingParams(max_tokens=MAX_TOKENS, stop=("abc",))
    decoder = engine.primed_text_stream(sampling, list(b"xyab"))
    end = engine.step(4, ByteTokenizer.eos_token_id, sampling, decoder)
    assert end == GenerationStep(4, -1, "ab", "stop")
    batch = BatchEngine(engine, EngineCapacity(num_kv_blocks=64, block_size=4))
    batch.add_request("r", list(b"Hi"), sampling, resume_token_ids=list(b"xyab"))
    batch.cancel("r")
    assert batch.step() == [("r", GenerationStep(4, -1, "ab", "cancelled"))]
    assert_drained(batch)


def test_every_window_of_the_text_as_a_stop_string_cuts_where_it_first_ends(unstopped):
    ids, text = unstopped
    for start in range(len(text)):
        for length in (1, 2, 3, 5):
            stop = text[start:start + length]
            stream = StopStringStream(ByteTokenizer().stream_decoder(), [stop])
            pieces = [stream.push(token_id) for token_id in ids]
            assert stream.stopped and "".join(pieces) == text[:text.find(stop)], (start, length)


# -- the batching engine -------------------------------------------------------------------------------
def test_staggered_requests_with_different_stops_end_as_each_alone(engine, batch_engine, unstopped):
    ids, text = unstopped
    seeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, seed=7)
    seeded_text = streamed_text(token_ids(alone(engine, Job("s", "abc", seeded))), None)
    jobs = [Job("three", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, stop=(text[11:14],))),
            Job("two", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, stop=(text[15:17], text[9:10]))),
            Job("held", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, stop=(text[3:5] + ABSENT,))),
            Job("none", "The quick brown fox", SamplingParams(max_tokens=MAX_TOKENS)),
            Job("seeded", "abc", SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, seed=7,
                                                stop=(seeded_text[6:8],)))]
    outputs = run_batch(batch_engine, jobs, per_step=1)
    for job in jobs:
        assert outputs[job.request_id] == alone(engine, job), job.request_id
    assert outputs["three"][-1].finish_reason == outputs["seeded"][-1].finish_reason == "stop"
    assert outputs["held"][-1].finish_reason == "length"
    assert_drained(batch_engine)


# -- failover: a run resumed after the tokens already streamed ----------------------------------------
@pytest.mark.parametrize("stop_of", [lambda text: text[11:14], lambda text: text[11:13] + ABSENT],
                         ids=["completes", "released"])
def test_a_run_resumed_at_any_token_streams_exactly_the_rest(engine, unstopped, stop_of):
    stop = (stop_of(unstopped[1]),)
    whole = greedy(engine, stop)
    ids = token_ids(whole)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, stop=stop)
    batch = BatchEngine(engine, EngineCapacity(num_kv_blocks=512))
    for k in range(len(ids)):  # every cut point, those inside held-back text among them
        batch.add_request(f"cut-{k}", list(PROMPT.encode()), sampling, resume_token_ids=ids[:k])
    resumed = run_batch(batch, [])
    for k in range(len(ids)):
        assert resumed[f"cut-{k}"] == whole[k:], k
        assert joined(whole[:k]) + joined(resumed[f"cut-{k}"]) == joined(whole)
        assert greedy(engine, stop, resume=ids[:k]) == whole[k:], k
    assert_drained(batch)


def test_a_run_resumed_after_its_stop_string_only_ends(engine, unstopped):
    stop = (unstopped[1][11:14],)
    ids = token_ids(greedy(engine, stop))
    end = GenerationStep(len(ids), -1, "", "stop")
    assert greedy(engine, stop, resume=ids) == [end]
    batch = BatchEngine(engine, EngineCapacity(num_kv_blocks=64))
    batch.add_request("r", list(PROMPT.encode()), SamplingParams(max_tokens=MAX_TOKENS, stop=stop),
                      resume_token_ids=ids)
    assert batch.step() == [("r", end)]
    assert_drained(batch)


# -- splitwise: the decode node primes its text with the first token -----------------------------------
@pytest.mark.parametrize("stop_of", [lambda text: text[0], lambda text: text[0] + ABSENT,
                                     lambda text: text[0:3], lambda text: text[9:12]],
                         ids=["first-token", "held-from-the-first-token", "spans-the-handoff", "later"])
def test_a_kv_handoff_ends_as_the_request_run_alone(engine, unstopped, stop_of):
    from gpu_worker.kv_transfer import continue_from_handoff, first_step, prefill_for_handoff

    stop = (stop_of(unstopped[1]),)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, stop=stop)
    prompt = list(PROMPT.encode())
    whole = greedy(engine, stop)
    handoff = prefill_for_handoff(engine, prompt, sampling)
    assert [first_step(engine, handoff, sampling),
            *continue_from_handoff(engine, handoff, prompt, sampling)] == whole

    prefill = BatchEngine(engine, EngineCapacity(num_kv_blocks=64, block_size=4))
    prefill.add_request("r", prompt, sampling, prefill_only=True)
    steps = run_batch(prefill, [])["r"]
    if steps[0].finish_reason is None:
        decode = BatchEngine(engine, EngineCapacity(num_kv_blocks=64, block_size=4))
        decode.add_request("r", prompt, sampling, resume_token_ids=[steps[0].token_id],
                           kv=prefill.exported.pop("r"))
        steps += run_batch(decode, [])["r"]
        assert_drained(decode)
    assert steps == whole and not prefill.exported


# -- a real tokenizer: stop strings inside multi-character tokens -----------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Engine:
    return Engine("cpu", model="smollm2")


def test_smollm2_stops_before_paris(smollm2):
    tokenizer = smollm2.tokenizer
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
    cases = {"paris": (["Paris"], "The capital of France is "),
             "is": ([" is"], "The capital of France"),
             "capital": (["capital", "France"], "The "),  # inside " capital": its step carries " "
             "held": (["Paris!"], "The capital of France is Paris."),
             "released": (["Paris.!"], "The capital of France is Paris."),  # "Paris." until the end
             "first": (["The"], "")}
    batch = BatchEngine(smollm2, EngineCapacity(num_kv_blocks=64))
    for name, (stop, _) in cases.items():
        batch.add_request(name, prompt, SamplingParams(max_tokens=24, stop=tuple(stop)))
    outputs = run_batch(batch, [])
    for name, (stop, text) in cases.items():
        steps = outputs[name]
        assert joined(steps) == text, name
        ids = token_ids(steps)
        assert streamed_text(ids, steps[-1].finish_reason, tokenizer, stop=stop) == text, name
        if name == "held":  # "Paris" was held back until "." showed it was no "Paris!"
            assert steps[-1] == GenerationStep(len(ids), -1, "", "stop")  # then end of text
            assert [s.text for s in steps[-3:-1]] == [" ", "Paris."]
        elif name == "released":  # held back to the end: end of text releases it
            assert steps[-1] == GenerationStep(len(ids), -1, "Paris.", "stop")
        else:
            assert steps[-1].finish_reason == "stop" and steps[-1].token_id >= 0, name
    assert outputs["first"] == [GenerationStep(0, outputs["paris"][0].token_id, "", "stop")]
    assert_drained(batch)


# -- the wire and the API ------------------------------------------------------------------------------
def test_stop_strings_travel_as_a_json_list_and_old_messages_still_load():
    request = Request("r", [1, 2], SamplingParams(max_tokens=4, stop=("a", "\n\n")))
    data = request.to_dict()
    assert data["sampling"]["stop"] == ["a", "\n\n"]
    assert Request.from_dict(data).sampling == request.sampling
    old = Request("r", [1, 2], SamplingParams(max_tokens=4)).to_dict()
    assert "stop" not in old["sampling"]
    assert Request.from_dict(old).sampling.stop == ()
    assert SamplingParams(stop="ab").stop == ("ab",)  # one string is one stop string


def test_the_engine_refuses_bad_stop_strings(engine):
    for stop in (("a",) * 5, ("",), ("a" * 257,), (3,)):
        with pytest.raises(ValueError, match="stop"):
            greedy(engine, stop)


URL = "/api/v1/topics/default/requests"
FOUR = ["a", "b c", "\n", "x" * 256]


@pytest.mark.django_db
@pytest.mark.parametrize("stop,kept", [("ab", ["ab"]), (FOUR, FOUR), ([], None), (None, None)])
def test_the_api_takes_a_stop_string_or_a_list(api, node, stop, kept):
    from fdconsole.inference.models import Request as Row

    answer = api.post(URL, {"prompt": "a", "max_tokens": 4, "stop": stop})
    assert answer.status_code == 202, answer.content
    assert Row.objects.get(request_id=answer.json()["request_id"]).sampling.get("stop") == kept


@pytest.mark.django_db
@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "", [""], ["a", ""], [1], "x" * 300, ["x" * 257],
                                  {"a": 1}, 5, True, [["a"]], [None]],
                         ids=["five", "empty", "empty-in-list", "empty-second", "number-in-list", "300-chars",
                              "257-chars", "object", "number", "bool", "nested", "null-in-list"])
def test_the_api_refuses_bad_stop_strings_naming_the_field(api, node, store, stop):
    from tests.api_errors import assert_error

    assert_error(api.post(URL, {"prompt": "a", "stop": stop}), 400, field="stop")
    assert store.queue_length("default", "node-a") == 0


@pytest.mark.django_db(transaction=True)
def test_a_request_with_a_stop_string_runs_on_a_node_and_ends_before_it(api, node, run_node, engine,
                                                                         unstopped):
    from tests.test_it_streams_tokens_over_sse import check_stream, read_events

    ids, text = unstopped
    stop = text[11:14]
    answer = api.post(URL, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stop": [ABSENT, stop]})
    assert answer.status_code == 202, answer.content
    request_id = answer.json()["request_id"]
    run_node()
    done = api.get(f"/api/v1/requests/{request_id}").json()
    assert done["status"] == "finished" and done["finish_reason"] == "stop"
    assert done["output_text"] == text[:text.find(stop)]
    assert done["output_token_ids"] == token_ids(greedy(engine, (stop,)))
    tokens, streamed = check_stream(read_events(api, request_id))  # the client's text is the record's
    assert streamed["output_text"] == done["output_text"]


# -- the console: what only the end releases reaches every reader -------------------------------------
def play_node(store, token_ids: list[int], stop: tuple[str, ...]) -> None:
    """What a node does with a request whose output is ``token_ids`` and then end of text (see
    ``gpu_worker.serving``): each token's text as the engine streams it, then the end."""
    from gpu_worker.tokenizer import text_stream
    from scheduler.status import RequestStatus

    [claim] = store.claim("default", "node-a")
    stream = text_stream(ByteTokenizer(), stop)
    for index, token_id in enumerate(token_ids):
        store.emit("default", claim.uid, claim.lease, index, token_id, stream.push(token_id))
    store.finish("default", claim.uid, claim.lease, status=RequestStatus.FINISHED, finish_reason="stop",
                 output_token_ids=token_ids)


@pytest.mark.django_db(transaction=True)
def test_text_held_back_until_end_of_text_is_in_the_output_and_the_openai_answers(api, node, store):
    import json

    from asgiref.sync import async_to_sync

    from fdconsole.api.stream import DoneEvent, TokenEvent, replayed_events, request_events
    from fdconsole.inference.models import Request as Row
    from fdconsole.openai_api.answers import CompletionShape, chunks
    from scheduler import keys

    native = {"prompt": "Hi", "max_tokens": 8, "stop": ["abc"], "request_id": "held"}
    assert api.post("/api/v1/topics/default/requests", native).status_code == 202
    play_node(store, list(b"xyab"), ("abc",))  # "ab" could start "abc": held back, then end of text

    assert api.get("/api/v1/requests/held").json()["output_text"] == "xyab"
    row = Row.objects.select_related("topic").get(request_id="held")

    async def read(events):
        return [event async for event in events]

    live = async_to_sync(read)(request_events(row))
    assert [e.text for e in live if isinstance(e, TokenEvent)] == ["x", "y", "", ""]
    assert isinstance(live[-1], DoneEvent) and live[-1].text == "ab"
    store.redis.delete(keys.output("default", row.uid))  # Redis let the stream go: read from the row
    replayed = replayed_events(Row.objects.select_related("topic").get(request_id="held"), -1)
    assert [(e.index, e.text) for e in replayed[:-1]] == [(e.index, e.text) for e in live[:-1]]
    assert replayed[-1].text == "ab"

    async def streamed():
        async def rest():
            yield live[1:]
        return "".join([piece async for piece in chunks(CompletionShape(row), live[:1], rest(), False)])

    choices = [json.loads(block.removeprefix("data: "))["choices"][0]
               for block in async_to_sync(streamed)().split("\n\n") if block.startswith("data: {")]
    assert [c["text"] for c in choices][-2:] == ["ab", ""] and choices[-1]["finish_reason"] == "stop"
    assert "".join(c["text"] for c in choices) == "xyab"
    whole = api.post("/v1/completions", {"model": "default", "prompt": list(b"Hi"), "max_tokens": 8,
                                         "temperature": 0, "stop": "abc", "request_id": "held"})
    assert whole.status_code == 200, whole.content
    assert whole.json()["choices"][0]["text"] == "xyab"
