"""Request bodies validated by pydantic models, refused in the native API's words.

A body model (``scheduler.messages.SubmissionBody``, the topic bodies of ``fdconsole.api.schemas``)
says each field's type, range and whether unknown fields are refused; the OpenAPI schema is generated
from the same models. ``validated`` runs one and turns the first error into the named ``FdError`` the
API answers with, naming the field at fault: ``max_tokens must be an integer``, ``top_p must be greater
than 0 and at most 1``, ``unknown field 'colour'``, or, inside a list or object, the field and then the
path: ``messages: messages[0].role must be one of 'system', 'user' or 'assistant'``.

Helpers for the models: ``integer`` (JSON has one number type: 4.0 is the integer 4, as JSON Schema
says too), ``optional`` (a field that may be left out but is never null), ``matching`` (a pattern with
the words its error says) and ``FieldValueError`` (a rule over several fields, naming the one at fault).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, ValidationError

from scheduler.config import NAME_RE
from scheduler.errors import FdError

M = TypeVar("M", bound=BaseModel)


def _integral(value: Any) -> Any:
    """A float with no fraction as the int it is (``1e400`` and NaN are not: they stay and are refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integer(**constraints: Any) -> Any:
    """The type of an int within ``constraints`` (``ge=1``...); a float with no fraction is taken as that
    int. (The constraints go inside: pydantic could not put them on an int behind a validator.)"""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def optional(description: str, default: Any = None, **constraints: Any) -> Any:
    """A field that may be left out (then ``default``) but not sent as null. Its schema shows ``default``
    unless it is None (which the field's type does not take)."""
    extra = _no_default if default is None else None
    return Field(default, description=description, json_schema_extra=extra, **constraints)


_PATTERN_PROBLEMS: dict[str, str] = {}


def matching(pattern: str, problem: str) -> StringConstraints:
    """The constraint that a string matches ``pattern`` (an anchored regular expression that both
    pydantic's and JSON Schema's engines read alike); a mismatch says ``<field> <problem>``."""
    _PATTERN_PROBLEMS[pattern] = problem
    return StringConstraints(pattern=pattern)


class FieldValueError(ValueError):
    """Raised by a model validator for a rule over several fields: ``field`` is the one to name, and
    ``message`` is said as it is."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def validated(model: type[M], data: Any, error: type[FdError]) -> M:
    """``data`` (a decoded JSON body) as ``model``; ``error`` naming the field at fault otherwise."""
    if not isinstance(data, dict):
        raise error("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise field_error(model, exc, error) from None


def field_error(model: type[BaseModel], exc: ValidationError, error: type[FdError]) -> FdError:
    """The first field at fault in ``exc``, as ``error``. Where a value matched no member of a union
    (``stop``: a string or a list of strings), the member that got furthest is told, and a broken
    constraint before a mere type mismatch."""
    loc, at_loc = deepest_errors(model, exc)
    chosen = next((e for e in at_loc if not e["type"].endswith("_type")), at_loc[0])
    cause = (chosen.get("ctx") or {}).get("error")
    if isinstance(cause, FieldValueError):
        return error(cause.message, field=cause.field)
    if not loc:  # a rule over the whole body
        return error(_problem(model, (), chosen))
    path, field = param_of(loc), str(loc[0])
    if chosen["type"] == "extra_forbidden":
        unknown = f"unknown field '{loc[-1]}'"
        where = "" if len(loc) == 1 else f"{field}: {param_of(loc[:-1])} has an "
        return error(where + unknown, field=field)
    problem = _problem(model, loc, chosen)
    inside = len(loc) > 1 or chosen["type"] in ("too_short", "too_long", "list_type")
    return error(f"{field}: {path} {problem}" if inside else f"{path} {problem}", field=field)


def deepest_errors(model: type[BaseModel], exc: ValidationError) -> tuple[tuple[str | int, ...], list[dict]]:
    """The location of the first field at fault that validation got furthest into, and the errors there
    (several when a value matched no member of a union: one per member)."""
    errors = exc.errors(include_url=False)
    top = errors[0]["loc"][:1]
    names = field_names(model)
    located = [(_location(e, names), e) for e in errors if e["loc"][:1] == top]
    loc = max((path for path, _ in located), key=len)
    return loc, [e for path, e in located if path == loc]


def _location(error: dict[str, Any], names: set[str]) -> tuple[str | int, ...]:
    """The error's location without the tags pydantic adds for union members and validators."""
    if error["type"] == "extra_forbidden":
        return tuple(error["loc"])
    return tuple(part for part in error["loc"] if isinstance(part, int) or part in names)


def param_of(loc: tuple[str | int, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param


@functools.cache
def field_names(model: type[BaseModel]) -> set[str]:
    """The names of every field of ``model`` and of the models it nests."""
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for nested in models_in(info.annotation):
            names |= field_names(nested)
    return names


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models a field's type names, through unions, lists and ``Annotated``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from models_in(arg)


def _problem(model: type[BaseModel], loc: tuple[str | int, ...], error: dict[str, Any]) -> str:
    """What is wrong, as the words after the field's name."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _BOUNDS and len(loc) == 1:
        return _range(model, str(loc[0])) or _BOUNDS[kind].format(**ctx)
    if kind in _BOUNDS:
        return _BOUNDS[kind].format(**ctx)
    if kind == "string_pattern_mismatch":
        return _PATTERN_PROBLEMS.get(ctx["pattern"], f"must match {ctx['pattern']}")
    if kind in ("string_too_short", "too_short"):
        what = "characters long" if kind == "string_too_short" else "items"
        if ctx.get("min_length") == 1:
            return "must not be empty" if kind == "string_too_short" else "must be a non-empty list"
        return f"must be at least {ctx['min_length']} {what}"
    if kind in ("string_too_long", "too_long"):
        what = "characters long" if kind == "string_too_long" else "items"
        return f"must be at most {ctx['max_length']} {what}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return _PROBLEMS.get(kind, error["msg"][:1].lower() + error["msg"][1:])


_PROBLEMS = {
    "missing": "is required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}
_BOUNDS = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
}


def _range(model: type[BaseModel], name: str) -> str | None:
    """``must be at least 1 and at most 65535``: the bounds of field ``name`` as its schema states them,
    both told at once."""
    prop = _properties(model).get(name, {})
    for option in (prop, *prop.get("anyOf", ())):
        low = _bound(option, "exclusiveMinimum", "greater than") or _bound(option, "minimum", "at least")
        high = _bound(option, "exclusiveMaximum", "less than") or _bound(option, "maximum", "at most")
        if low or high:
            return "must be " + " and ".join(part for part in (low, high) if part)
    return None


@functools.cache
def _properties(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()["properties"]


def _bound(schema: dict[str, Any], key: str, words: str) -> str | None:
    if key not in schema:
        return None
    value = schema[key]
    return f"{words} {int(value) if float(value).is_integer() else value}"


# What a schema can say of Python's str.isprintable: no C0 or C1 control character (isprintable refuses a
# few more, such as unassigned code points: a validator checks those).
NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f]*$"
_PATTERN_PROBLEMS[NO_CONTROLS] = "must contain only printable characters"


# -- names ------------------------------------------------------------------------------------------
# NAME_RE's rule as both engines read it ('$' is the end of the text in pydantic's Rust regex and in
# JSON Schema's ECMA 262 regex alike; Python's '\Z' is neither's).
NAME_PATTERN = NAME_RE.pattern.removesuffix(r"\Z") + "$"
Name = Annotated[str, matching(NAME_PATTERN, "must be 1-64 letters, digits, '-', '_' or '.'")]
