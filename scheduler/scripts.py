"""The Lua scripts, assembled at import from the files in ``scheduler/lua/``.

Design note. Each file holds one concern: ``helpers.lua`` (keys, clock, configuration, load scores,
queueing), ``splitwise.lua`` (placement, charges, handoff), ``stealing.lua`` (Global's stealing and
re-homing), ``lifecycle.lua`` (submit, claim, stream, finish, cancel, expire, heartbeat) and
``failover.lua``. A file is its helpers, then its scripts: each script starts at a line
``-- @script <name>`` and is one Lua function of that name, whose parameters are the script's
arguments, by name and in order. That signature is the one place the arguments are declared:
``Script.call`` takes them by keyword, so no position is written twice.

A topic script (the default) runs as: the helper part of its own file and of the files before it in
the order above (so a helper may use those before it), the script's own function, then ``return
<name>(unpack(ARGV, 3))``. The Lua names constants that Python defines (key suffixes, request
statuses, reply codes: ``keys.lua_constants``, ``config.UNBOUNDED``, ``status.lua_constants``); the
assembly writes each value in place of its name, so that each is spelled once and costs nothing per
call (as locals, captured by every helper, they cost a fifth of a short script's time). Redis reports
an error at a line of that assembled text; ``Script.where`` maps it back to the file and line, and the
runner (``scheduler.connection.ScriptRunner``) raises ``ScriptError`` naming them. A standalone script
(``lease.lua``) is its own function alone, with its first ``keys`` arguments in KEYS.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from scheduler import config, keys, status

LUA_DIR = Path(__file__).with_name("lua")
LIBRARY = ("helpers", "splitwise", "stealing", "lifecycle", "failover")  # each may use those before it
_MARKER = re.compile(r"^-- @script (\w+)[ \t]*$", re.M)
_SIGNATURE = re.compile(r"^local function (\w+)\(([^)]*)\)", re.M)
_WHERE = re.compile(r"user_script:(\d+)")


@dataclass(frozen=True)
class Segment:
    """Lines of assembled source from ``line`` on came from ``source``, starting at ``first_line``."""

    line: int
    source: str
    first_line: int


@dataclass(frozen=True)
class Part:
    """Lua text and where it comes from."""

    text: str
    source: str
    first_line: int


class ScriptCall(NamedTuple):
    """One call of a script: what EVALSHA gets after the digest."""

    script: Script
    keys: tuple[str, ...]
    argv: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class Script:
    name: str
    args: tuple[str, ...]  # the function's parameters, in order
    varargs: bool  # the function takes more after them (``...``)
    keys: int  # standalone scripts: how many leading arguments go to KEYS (0: a topic script)
    source: str  # the assembled Lua
    segments: tuple[Segment, ...]

    @cached_property
    def names(self) -> frozenset[str]:
        """``args`` as a set (what a call's keywords must be)."""
        return frozenset(self.args)

    @cached_property
    def sha(self) -> str:
        """EVALSHA's digest of ``source``."""
        return hashlib.sha1(self.source.encode()).hexdigest()

    def call(self, topic: str, *more: Any, **named: Any) -> ScriptCall:
        """A call of this topic script on ``topic`` with its arguments by name (``more`` after them,
        for a script that takes ``...``). A missing or unknown name raises TypeError."""
        if named.keys() != self.names or (more and not self.varargs):
            self._refuse(named, more)
        config_key, prefix = _topic_keys(topic)
        values = map(named.__getitem__, self.args)
        return ScriptCall(self, (config_key,), (prefix, keys.RETENTION_S, *values, *more))

    def call_standalone(self, **named: Any) -> ScriptCall:
        """A call of this standalone script: its first ``keys`` arguments are its keys."""
        if named.keys() != self.names:
            self._refuse(named, ())
        values = [named[name] for name in self.args]
        return ScriptCall(self, tuple(values[:self.keys]), tuple(values[self.keys:]))

    def _refuse(self, named: dict[str, Any], more: tuple[Any, ...]) -> None:
        missing = [name for name in self.args if name not in named]
        if missing:
            raise TypeError(f"script {self.name} needs argument '{missing[0]}' "
                            f"(it takes {', '.join(self.args)})")
        unknown = [name for name in named if name not in self.names]
        if unknown:
            raise TypeError(f"script {self.name} takes no argument {', '.join(unknown)}")
        raise TypeError(f"script {self.name} takes no arguments after {self.args[-1]}")

    def where(self, line: int) -> str:
        """``file.lua:N`` of line ``line`` of the assembled source (as Redis numbers it, from 1)."""
        segment = next(s for s in reversed(self.segments) if s.line <= line)
        return f"{segment.source}:{segment.first_line + line - segment.line}"

    def locate(self, message: str) -> str | None:
        """Where the error ``message`` from Redis happened, as ``file.lua:N``; None when it says not."""
        found = _WHERE.search(message)
        return self.where(int(found.group(1))) if found else None


@lru_cache(maxsize=1024)
def _topic_keys(topic: str) -> tuple[str, str]:
    """A topic script's key (the topic's config key: it routes the call to the topic's Redis Cluster
    slot) and its first argument (the topic's key prefix)."""
    return keys.config(topic), keys.topic_prefix(topic)


@cache
def _parts(name: str) -> tuple[Part, dict[str, Part]]:
    """A file's helper part and its scripts' parts, by script name."""
    text = (LUA_DIR / f"{name}.lua").read_text()
    markers = list(_MARKER.finditer(text))
    source = f"{name}.lua"
    library = Part(text[:markers[0].start()] if markers else text, source, 1)
    sections: dict[str, Part] = {}
    for marker, following in zip(markers, [*markers[1:], None], strict=False):
        body = text[marker.start():following.start() if following else len(text)]
        sections[marker.group(1)] = Part(body, source, text.count("\n", 0, marker.start()) + 1)
    return library, sections


@cache
def _literals() -> dict[str, str]:
    """Each constant's name and its value as a Lua literal."""
    constants = {**keys.lua_constants(), "UNBOUNDED": config.UNBOUNDED, **status.lua_constants()}
    literals = {}
    for name, value in constants.items():
        if isinstance(value, str):
            assert re.fullmatch(r"[\w:.-]*", value), value  # nothing to escape in a Lua string
            literals[name] = f"'{value}'"
        else:
            literals[name] = str(int(value))
    return literals


@cache
def _constant_names() -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(map(re.escape, _literals())) + r")\b")


def _with_constants(part: Part) -> Part:
    """``part`` with each constant's value in place of its name (line for line: errors still map)."""
    literals = _literals()
    text = _constant_names().sub(lambda found: literals[found.group(1)], part.text)
    return Part(text, part.source, part.first_line)


def _assemble(parts: list[Part]) -> tuple[str, tuple[Segment, ...]]:
    text, segments, line = "", [], 1
    for part in parts:
        body = part.text if part.text.endswith("\n") else part.text + "\n"
        segments.append(Segment(line, part.source, part.first_line))
        text += body
        line += body.count("\n")
    return text, tuple(segments)


def load(file: str, name: str, *, keys: int = 0) -> Script:
    """Script ``name`` of ``lua/<file>.lua``: a topic script, or with ``keys`` a standalone one."""
    library, sections = _parts(file)
    if name not in sections:
        raise LookupError(f"{file}.lua has no '-- @script {name}' section")
    section = sections[name]
    signature = _SIGNATURE.search(section.text)
    if signature is None or signature.group(1) != name:
        raise LookupError(f"the '{name}' section of {file}.lua must define 'local function {name}(...)'")
    params = [p.strip() for p in signature.group(2).split(",") if p.strip()]
    varargs = bool(params) and params[-1] == "..."
    args = tuple(params[:-1] if varargs else params)
    if keys:
        key_args = ", ".join(f"KEYS[{i}]" for i in range(1, keys + 1))
        call = Part(f"return {name}({key_args}, unpack(ARGV))\n", f"{file}.lua (call)", 1)
        source, segments = _assemble([section, call])
    else:
        call = Part(f"return {name}(unpack(ARGV, 3))\n", f"{file}.lua (call)", 1)
        libraries = [_parts(lib)[0] for lib in LIBRARY[:LIBRARY.index(file) + 1]]
        source, segments = _assemble([_with_constants(part) for part in (*libraries, section)] + [call])
    return Script(name=name, args=args, varargs=varargs, keys=keys, source=source, segments=segments)


# The request lifecycle (lifecycle.lua; Python side: scheduler.store)
SUBMIT = load("lifecycle", "submit")
RESUBMIT = load("lifecycle", "resubmit")
CLAIM = load("lifecycle", "claim")
EMIT = load("lifecycle", "emit")
FINISH = load("lifecycle", "finish")
EMIT_FINISH = load("lifecycle", "emit_finish")
CANCEL = load("lifecycle", "cancel")
EXPIRE_DUE = load("lifecycle", "expire_due")
RENEW = load("lifecycle", "renew")
PUBLISH_CONFIG = load("lifecycle", "publish_config")
# Global: re-homing (stealing.lua, with stealing itself inside claim; Python side: scheduler.global_)
REHOME = load("stealing", "rehome")
# Failover (failover.lua; Python side: scheduler.failover)
RECOVER = load("failover", "recover")
RECLAIM = load("failover", "reclaim")
# Splitwise placement and handoff (splitwise.lua; Python side: scheduler.splitwise)
HAND_OFF = load("splitwise", "hand_off")
PLACE_PENDING = load("splitwise", "place_pending")
SPLITWISE_UPKEEP = load("splitwise", "splitwise_upkeep")
# A lease held by one process at a time (lease.lua; Python side: scheduler.lease)
HOLD_LEASE = load("lease", "hold", keys=1)
RELEASE_LEASE = load("lease", "release", keys=1)
