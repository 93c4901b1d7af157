"""The Lua scripts live in scheduler/lua, one concern a file, and are called with their arguments by
name: a missing or unknown argument is refused before anything is sent, and an error inside a script
names the file and line of scheduler/lua where it happened, whatever the assembled text looks like."""

import re
from pathlib import Path

import pytest

from scheduler import scripts
from scheduler.config import parse_config
from scheduler.errors import ScriptError
from scheduler.messages import Request
from scheduler.store import RequestStore, new_uid

LUA = Path(scripts.__file__).with_name("lua")


@pytest.fixture
def store(redis_conn) -> RequestStore:
    store = RequestStore(redis_conn)
    store.publish_config("t", parse_config({"scheduler_topic": "t"}))
    return store


def line_of(file: str, text: str) -> int:
    """The line of ``lua/<file>`` that holds ``text`` (exactly one does)."""
    [number] = [i for i, line in enumerate((LUA / file).read_text().splitlines(), 1) if text in line]
    return number


def claim_call(**changes):
    arguments = {"node": "n1", "n": 1, "may_steal": "0", "rand": 0.5, "lease_s": 5, "available_blocks": -1,
                 "block_size": 1, "reserved_output_blocks": 0, "max_num_batched_tokens": 0, **changes}
    return scripts.CLAIM.call("t", **arguments)


def test_an_error_in_a_script_names_its_file_and_line(store):
    with pytest.raises(ScriptError) as failed:
        store.run(claim_call(n="not-a-number"))
    where = f"lifecycle.lua:{line_of('lifecycle.lua', 'if n < 1 or')}"
    assert failed.value.where == where and failed.value.script == "claim"
    assert where in str(failed.value) and "compare" in str(failed.value)  # and what Lua said


def test_a_command_redis_refuses_inside_a_helper_names_the_helpers_line(store):
    from scheduler import keys

    uid = new_uid()
    store.submit("t", uid, Request("r1", [1, 2]), "n1", parse_config({"scheduler_topic": "t"}))
    store.redis.delete(keys.waiting("t"))
    store.redis.set(keys.waiting("t"), "not a sorted set")  # the next enqueue's ZADD fails
    with pytest.raises(ScriptError) as failed:
        store.submit("t", new_uid(), Request("r2", [1, 2]), "n1", parse_config({"scheduler_topic": "t"}))
    assert failed.value.where == f"helpers.lua:{line_of('helpers.lua', 'ZADD')}"
    assert "WRONGTYPE" in failed.value.reply


def test_a_topic_without_a_configuration_is_named_not_defaulted(redis_conn):
    bare, message = RequestStore(redis_conn), "has no published scheduler configuration"
    with pytest.raises(ScriptError) as failed:
        bare.submit("nowhere", new_uid(), Request("r1", [1]), "n1", parse_config({"scheduler_topic": "x"}))
    assert message in str(failed.value)
    assert failed.value.where == f"helpers.lua:{line_of('helpers.lua', message)}"
    assert bare.claim("nowhere", "n1") == []  # nothing can be queued there, so nothing is claimed


def test_arguments_go_by_name_and_a_wrong_one_is_refused_before_sending():
    assert scripts.CLAIM.args[:3] == ("node", "n", "may_steal")
    call = claim_call()
    assert call.argv[2:] == ("n1", 1, "0", 0.5, 5, -1, 1, 0, 0)  # after the prefix and the retention
    with pytest.raises(TypeError, match="needs argument 'lease_s'"):
        scripts.EMIT.call("t", uid="u", lease="l", index=0, token_id=1, text="")
    with pytest.raises(TypeError, match="takes no argument colour"):
        scripts.CANCEL.call("t", uid="u", colour="red")
    with pytest.raises(TypeError, match="takes no arguments after uid"):
        scripts.CANCEL.call("t", "extra", uid="u")
    renew = scripts.RENEW.call("t", "u1", "n#1", lease_s=5, node="n", accepts_work="1", role="mixed")
    assert scripts.RENEW.varargs and renew.argv[-2:] == ("u1", "n#1")


def test_every_script_is_a_section_of_a_lua_file_and_no_lua_is_left_in_python():
    for path in LUA.glob("*.lua"):
        text = path.read_text()
        for name in re.findall(r"^-- @script (\w+)", text, re.M):
            assert re.search(rf"^local function {name}\(", text, re.M), (path.name, name)
    root = Path(scripts.__file__).parents[1]
    python = [path for package in ("scheduler", "gpu_worker", "fdconsole")
              for path in (root / package).rglob("*.py")]
    assert len(python) > 50
    for path in python:
        assert "redis.call(" not in path.read_text(), path


def test_the_scripts_restate_no_default_of_the_parameter_table():
    from scheduler.config import PARAMETERS

    for path in LUA.glob("*.lua"):
        for parameter in PARAMETERS:
            assert not re.search(rf"{parameter.name}\s+or\b", path.read_text()), (path.name, parameter.name)
