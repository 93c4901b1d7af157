"""Scheduler configuration: the user's parameter table, its validation, and the config type.

The fields of ``SchedulerConfig`` are the table: each parameter's name, type and default is written
there once, with the schedulers it applies to, its unit, help text and bounds (``PARAMETERS`` reads them
back as rows). The model, the REST API, the config form and the admin all validate through
``parse_config`` so that a value refused in one place is refused everywhere with the same message.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.errors import ConfigError, FdError

SCHEDULER_NAMES = ("local", "global", "splitwise")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")  # \Z: '$' would let a trailing newline through
PASSWORD_MASK = "********"
UNBOUNDED = -1  # scheduler_max_size of a queue without a bound (the Lua gets it as a constant too)
YEAR_S = 365 * 24 * 3600


@dataclass(frozen=True)
class Parameter:
    """One row of the user's parameter table (the fields of ``SchedulerConfig``)."""

    name: str
    kind: type  # str, int or float (float accepts ints; "period" floats keep ints when integral)
    default: Any
    scopes: tuple[str, ...]  # scheduler names it applies to
    unit: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # True: value must be > minimum


def _row(default: Any, scopes: tuple[str, ...], unit: str, help: str, minimum: float | None = None,
         maximum: float | None = None, exclusive_minimum: bool = False) -> Any:
    """A field of ``SchedulerConfig`` that is a row of the table: its default and what the table says."""
    return field(default=default, metadata={"row": {"scopes": scopes, "unit": unit, "help": help,
                                                    "minimum": minimum, "maximum": maximum,
                                                    "exclusive_minimum": exclusive_minimum}})


REDIS_MODES = ("global", "splitwise")


@dataclass(frozen=True)
class SchedulerConfig:
    """A validated scheduler configuration; build it with ``parse_config``. Its fields are the user's
    parameter table (``PARAMETERS``): each name, type and default is written here and nowhere else."""

    scheduler_name: str = _row(
        "local", SCHEDULER_NAMES, "", "Which scheduler the topic uses: local, global or splitwise.")
    scheduler_max_size: int = _row(
        -1, ("local",), "requests", "Maximum length of each node's queue; -1 means unbounded. A request that "
        "does not fit is refused with 'queue full' (HTTP 429).", -1, 10_000_000)
    scheduler_ttl: int = _row(
        900, SCHEDULER_NAMES, "seconds",
        "Maximum time a request may wait in a queue before it is evicted with status 'expired'.", 1, YEAR_S)
    scheduler_host: str = _row(
        "127.0.0.1", REDIS_MODES, "", "Redis host of the topic's scheduler. Left at the default, the "
        "console's FD_REDIS_URL is used.")
    scheduler_port: int = _row(6379, REDIS_MODES, "", "Redis port of the topic's scheduler.", 1, 65535)
    scheduler_db: int = _row(
        0, REDIS_MODES, "", "Redis database index of the topic's scheduler.", 0, 1_000_000)
    scheduler_password: str = _row(
        "", REDIS_MODES, "",
        "Redis password of the topic's scheduler; empty for none. Never shown back in full.")
    scheduler_topic: str = _row(
        "default", REDIS_MODES, "",
        "Nodes under the same topic schedule together; every Redis key is namespaced by it.")
    scheduler_min_load_score: float = _row(
        3, ("global",), "requests", "Minimum load score (waiting requests) for a node to be stolen from.",
        1, 1e9)
    scheduler_load_shards_num: int = _row(
        1, ("global",), "shards",
        "Number of load-table shards; a node's shard is CRC-16/CCITT-FALSE of its name modulo this.", 1, 1024)
    scheduler_sync_period: float = _row(
        5, ("splitwise",), "seconds", "Heartbeat and load sync interval, in seconds (fractions allowed). A "
        "node is stale after three missed periods.", 0, YEAR_S, True)
    scheduler_expire_period: float = _row(
        3000, ("splitwise",), "seconds",
        "Heartbeat expiry, in seconds (fractions allowed): a silent node is removed after this.",
        0, YEAR_S, True)
    scheduler_release_load_expire_period: float = _row(
        600, ("splitwise",), "seconds",
        "Load held by a silent request is released after this many seconds (leak guard).", 0, YEAR_S, True)
    scheduler_reader_parallel: int = _row(
        4, ("splitwise",), "threads", "Number of result reader threads.", 1, 64)
    scheduler_writer_parallel: int = _row(
        4, ("splitwise",), "threads", "Number of result writer threads.", 1, 64)
    scheduler_reader_batch_size: int = _row(
        200, ("splitwise",), "results", "Results read per batch.", 1, 100_000)
    scheduler_writer_batch_size: int = _row(
        200, ("splitwise",), "results", "Results written per batch.", 1, 100_000)

    def as_dict(self, *, mask_password: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if mask_password and data["scheduler_password"]:
            data["scheduler_password"] = PASSWORD_MASK
        return data

    def for_scripts(self) -> dict[str, Any]:
        """The parameters the Lua scripts read on every call (``SCRIPT_PARAMETERS``)."""
        return {name: getattr(self, name) for name in SCRIPT_PARAMETERS}

    def replace(self, changes: Mapping[str, Any], *, from_text: bool = False) -> SchedulerConfig:
        """A copy with ``changes`` applied, validated as a whole."""
        return parse_config(changes, base=self, from_text=from_text)

    def applies(self, name: str) -> bool:
        """Whether parameter ``name`` matters for this config's scheduler."""
        return self.scheduler_name in PARAMETERS_BY_NAME[name].scopes


_KINDS = {"str": str, "int": int, "float": float}
PARAMETERS: tuple[Parameter, ...] = tuple(
    Parameter(f.name, _KINDS[str(f.type)], f.default, **f.metadata["row"])
    for f in dataclasses.fields(SchedulerConfig))
PARAMETERS_BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}
# What the Lua scripts read on every call, published beside the whole configuration in a small JSON.
SCRIPT_PARAMETERS = ("scheduler_name", "scheduler_ttl", "scheduler_load_shards_num",
                     "scheduler_min_load_score", "scheduler_sync_period", "scheduler_expire_period",
                     "scheduler_release_load_expire_period")


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
    if name == "scheduler_host" and not is_host(raw):
        raise ConfigError("scheduler_host must be a host name or an IP address", field=name)
    if name == "scheduler_password" and len(raw) > 512:
        raise ConfigError("scheduler_password is longer than 512 characters", field=name)
    if name == "scheduler_password" and not raw.isprintable():
        raise ConfigError("scheduler_password must contain only printable characters", field=name)
    return raw


HOST_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}\Z")


def is_host(text: str) -> bool:
    """A host name, an IPv4 address or an IPv6 one (in brackets or not): what a Redis URL can hold."""
    if HOST_NAME_RE.match(text):
        return True
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if "%" in bare:  # a zone id: not something a URL's host carries
        return False
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        return False
    return True


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
    if name == "scheduler_max_size" and value != UNBOUNDED and value < 1:
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


def validate_name(value: Any, field: str, error: type[FdError] = ConfigError) -> str:
    """A topic or node name: 1-64 letters, digits, '-', '_' or '.'; else ``error`` naming ``field``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise error(f"{field} must be 1-64 letters, digits, '-', '_' or '.'", field=field)
    return value
