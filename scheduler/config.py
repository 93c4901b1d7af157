"""Scheduler configuration: the user's parameter table, its validation, and the config type.

One table (``PARAMETERS``) describes every parameter once: its name, type, default, the schedulers it
applies to, its unit and help text, and its bounds. The model, the REST API and the config form all
validate through ``parse_config`` so that a value refused in one place is refused everywhere with
the same message.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.errors import ConfigError

SCHEDULER_NAMES = ("local", "global", "splitwise")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")  # \Z: '$' would let a trailing newline through
PASSWORD_MASK = "********"
YEAR_S = 365 * 24 * 3600


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type  # str, int or float (float accepts ints; "period" floats keep ints when integral)
    default: Any
    scopes: tuple[str, ...]  # scheduler names it applies to
    unit: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # True: value must be > minimum


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("scheduler_name", str, "local", SCHEDULER_NAMES, "",
              "Which scheduler the topic uses: local, global or splitwise."),
    Parameter("scheduler_max_size", int, -1, ("local",), "requests",
              "Maximum length of each node's queue; -1 means unbounded. A request that does not fit "
              "is refused with 'queue full' (HTTP 429).", -1, 10_000_000),
    Parameter("scheduler_ttl", int, 900, SCHEDULER_NAMES, "seconds",
              "Maximum time a request may wait in a queue before it is evicted with status 'expired'.",
              1, YEAR_S),
    Parameter("scheduler_host", str, "127.0.0.1", ("global", "splitwise"), "",
              "Redis host of the topic's scheduler. Left at the default, the console's FD_REDIS_URL "
              "is used."),
    Parameter("scheduler_port", int, 6379, ("global", "splitwise"), "",
              "Redis port of the topic's scheduler.", 1, 65535),
    Parameter("scheduler_db", int, 0, ("global", "splitwise"), "",
              "Redis database index of the topic's scheduler.", 0, 1_000_000),
    Parameter("scheduler_password", str, "", ("global", "splitwise"), "",
              "Redis password of the topic's scheduler; empty for none. Never shown back in full."),
    Parameter("scheduler_topic", str, "default", ("global", "splitwise"), "",
              "Nodes under the same topic schedule together; every Redis key is namespaced by it."),
    Parameter("scheduler_min_load_score", float, 3, ("global",), "requests",
              "Minimum load score (waiting requests) for a node to be stolen from.", 1, 1e9),
    Parameter("scheduler_load_shards_num", int, 1, ("global",), "shards",
              "Number of load-table shards; a node's shard is CRC-16/CCITT-FALSE of its name modulo this.",
              1, 1024),
    Parameter("scheduler_sync_period", float, 5, ("splitwise",), "seconds",
              "Heartbeat and load sync interval, in seconds (fractions allowed). A node is stale after "
              "three missed periods.", 0, YEAR_S, True),
    Parameter("scheduler_expire_period", float, 3000, ("splitwise",), "seconds",
              "Heartbeat expiry, in seconds (fractions allowed): a silent node is removed after this.",
              0, YEAR_S, True),
    Parameter("scheduler_release_load_expire_period", float, 600, ("splitwise",), "seconds",
              "Load held by a silent request is released after this many seconds (leak guard).",
              0, YEAR_S, True),
    Parameter("scheduler_reader_parallel", int, 4, ("splitwise",), "threads",
              "Number of result reader threads.", 1, 64),
    Parameter("scheduler_writer_parallel", int, 4, ("splitwise",), "threads",
              "Number of result writer threads.", 1, 64),
    Parameter("scheduler_reader_batch_size", int, 200, ("splitwise",), "results",
              "Results read per batch.", 1, 100_000),
    Parameter("scheduler_writer_batch_size", int, 200, ("splitwise",), "results",
              "Results written per batch.", 1, 100_000),
)
PARAMETERS_BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}


@dataclass(frozen=True)
class SchedulerConfig:
    """A validated scheduler configuration; build it with ``parse_config``."""

    scheduler_name: str = "local"
    scheduler_max_size: int = -1
    scheduler_ttl: int = 900
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 6379
    scheduler_db: int = 0
    scheduler_password: str = ""
    scheduler_topic: str = "default"
    scheduler_min_load_score: float = 3
    scheduler_load_shards_num: int = 1
    scheduler_sync_period: float = 5
    scheduler_expire_period: float = 3000
    scheduler_release_load_expire_period: float = 600
    scheduler_reader_parallel: int = 4
    scheduler_writer_parallel: int = 4
    scheduler_reader_batch_size: int = 200
    scheduler_writer_batch_size: int = 200

    def as_dict(self, *, mask_password: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if mask_password and data["scheduler_password"]:
            data["scheduler_password"] = PASSWORD_MASK
        return data

    def replace(self, changes: Mapping[str, Any], *, from_text: bool = False) -> SchedulerConfig:
        """A copy with ``changes`` applied, validated as a whole."""
        return parse_config(changes, base=self, from_text=from_text)

    def applies(self, name: str) -> bool:
        """Whether parameter ``name`` matters for this config's scheduler."""
        return self.scheduler_name in PARAMETERS_BY_NAME[name].scopes


def parse_config(
    data: Mapping[str, Any],
    *,
    base: SchedulerConfig | None = None,
    from_text: bool = False,
) -> SchedulerConfig:
    """Validate ``data`` over ``base`` (defaults when None) and return the resulting config.

    Unknown names are refused. With ``from_text`` (an HTML form), numbers may come as strings.
    Raises ``ConfigError`` naming the first field at fault.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a JSON object")
    values = (base or SchedulerConfig()).as_dict()
    for name, raw in data.items():
        param = PARAMETERS_BY_NAME.get(name)
        if param is None:
            raise ConfigError(f"unknown scheduler parameter '{name}'", field=str(name))
        if name == "scheduler_password" and raw == PASSWORD_MASK:
            continue  # the masked value shown by GET means "unchanged"
        values[name] = _coerce(param, raw, from_text)
    return SchedulerConfig(**values)


def _coerce(param: Parameter, raw: Any, from_text: bool) -> Any:
    if param.kind is str:
        return _check_text(param, raw)
    number = _parse_number(param, raw, from_text)
    _check_bounds(param, number)
    return number


def _check_text(param: Parameter, raw: Any) -> str:
    name = param.name
    if not isinstance(raw, str):
        raise ConfigError(f"{name} must be a string", field=name)
    if name == "scheduler_name" and raw not in SCHEDULER_NAMES:
        raise ConfigError(f"scheduler_name must be one of {', '.join(SCHEDULER_NAMES)}", field=name)
    if name == "scheduler_topic" and not NAME_RE.match(raw):
        raise ConfigError(
            "scheduler_topic must be 1-64 letters, digits, '-', '_' or '.'", field=name
        )
    if name == "scheduler_host" and not re.match(r"^[A-Za-z0-9_.:\[\]-]{1,255}\Z", raw):
        raise ConfigError("scheduler_host must be a host name or an IP address", field=name)
    if name == "scheduler_password" and len(raw) > 512:
        raise ConfigError("scheduler_password is longer than 512 characters", field=name)
    if name == "scheduler_password" and not raw.isprintable():
        raise ConfigError("scheduler_password must contain only printable characters", field=name)
    return raw


def _parse_number(param: Parameter, raw: Any, from_text: bool) -> int | float:
    name = param.name
    if from_text and isinstance(raw, str):
        try:
            raw = float(raw.strip()) if re.search(r"[.eE]", raw) else int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number", field=name) from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        kind = "an integer" if param.kind is int else "a number"
        raise ConfigError(f"{name} must be {kind}", field=name)
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ConfigError(f"{name} must be a finite number", field=name)
        if raw.is_integer():
            raw = int(raw)
        elif param.kind is int:
            raise ConfigError(f"{name} must be an integer", field=name)
    return raw


def _check_bounds(param: Parameter, value: float) -> None:
    name = param.name
    if name == "scheduler_max_size" and value != -1 and value < 1:
        raise ConfigError("scheduler_max_size must be -1 (unbounded) or at least 1", field=name)
    low, high = param.minimum, param.maximum
    if low is not None:
        if param.exclusive_minimum and value <= low:
            raise ConfigError(f"{name} must be greater than {_fmt(low)}", field=name)
        if not param.exclusive_minimum and value < low:
            raise ConfigError(f"{name} must be at least {_fmt(low)}", field=name)
    if high is not None and value > high:
        raise ConfigError(f"{name} must be at most {_fmt(high)}", field=name)


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def validate_name(value: Any, field: str) -> str:
    """A topic or node name: 1-64 letters, digits, '-', '_' or '.'."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(f"{field} must be 1-64 letters, digits, '-', '_' or '.'", field=field)
    return value
