"""``GET /api/openapi.json`` and ``GET /api/docs``: public, as most servers' schemas are (they tell how to
call the API, not what is in it; every call still takes a token). The docs page is rendered here from
the schema, with no script and nothing fetched from elsewhere."""

from __future__ import annotations

import json
import re
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from fdconsole.openapi.schema import openapi_schema

REF_PREFIX = "#/components/schemas/"


@csrf_exempt  # public and read-only: another method is a 405, not a CSRF failure
@require_GET
def openapi_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse(openapi_schema())


@csrf_exempt
@require_GET
def api_docs(request: HttpRequest) -> HttpResponse:
    schema = openapi_schema()
    components = schema["components"]["schemas"]
    tags = {tag["name"]: {**tag, "operations": []} for tag in schema["tags"]}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            tags[operation["tags"][0]]["operations"].append(describe_operation(path, method, operation))
    return render(request, "api_docs.html", {
        "info": {**schema["info"], "description": markup(schema["info"]["description"])},
        "tags": list(tags.values()),
        "components": [{"name": name, **describe_object(component)}
                       for name, component in sorted(components.items())],
    })


def markup(text: str) -> SafeString:
    """A description as HTML: escaped, its CommonMark code spans (in backticks) as ``<code>``."""
    return mark_safe(re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text)))


def describe_operation(path: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    return {
        "method": method.upper(), "path": path, "id": operation["operationId"],
        "summary": markup(operation["summary"]),
        "parameters": [{"name": p["name"], "where": p["in"], "description": p.get("description", "")}
                       for p in operation.get("parameters", [])],
        "body": type_of(body["schema"]) if body else None,
        "responses": [
            {"status": status, "description": markup(answer["description"]),
             "content": [{"type": media, "schema": type_of(content["schema"]),
                          "events": stream_events(content["schema"]) if media == "text/event-stream" else {}}
                         for media, content in answer.get("content", {}).items()]}
            for status, answer in operation["responses"].items()
        ],
    }


def stream_events(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each event of a ``text/event-stream`` schema (by its ``event`` name, else ``data``) and the type
    of its data."""
    events = {}
    for option in schema.get("oneOf", [schema]):
        properties = option.get("properties", {})
        name = properties.get("event", {}).get("const", "data")
        data = properties.get("data", {})
        contents = [o["contentSchema"] for o in [data, *data.get("anyOf", ())] if "contentSchema" in o]
        events[name] = type_of(contents[0]) if contents else type_of(data)
    return events


def describe_object(schema: dict[str, Any]) -> dict[str, Any]:
    """A component's description and fields (name, type, whether required, default, rules)."""
    required = set(schema.get("required", ()))
    fields = [{"name": name, "type": type_of(prop), "required": name in required, "default": _default(prop),
               "rules": rules_of(prop), "description": markup(prop.get("description", ""))}
              for name, prop in schema.get("properties", {}).items()]
    rules = []
    if schema.get("additionalProperties") is False:
        rules.append("unknown fields are refused")
    if "oneOf" in schema:
        options = (" + ".join(option.get("required", ())) for option in schema["oneOf"])
        rules.append("exactly one of " + ", ".join(options))
    return {"description": markup(schema.get("description", "")), "fields": fields, "rules": rules,
            "enum": schema.get("enum")}


def type_of(schema: dict[str, Any]) -> dict[str, Any]:
    """``{"text": "array of ChatTurn", "refs": ["ChatTurn"]}``: a schema's type in words, and the
    components it names (the page links them)."""
    refs: list[str] = []
    return {"text": _words(schema, refs), "refs": refs}


def _words(schema: dict[str, Any], refs: list[str]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF_PREFIX)
        refs.append(name)
        return name
    for key in ("anyOf", "oneOf"):
        if key in schema and "properties" not in schema:
            return " | ".join(_words(option, refs) for option in schema[key])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_words(schema.get('items', {}), refs)}"
    if kind == "string" and "format" in schema:
        return f"string ({schema['format']})"
    return kind if isinstance(kind, str) else " | ".join(kind)


RULES = [("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}"),
         ("minLength", "length ≥ {}"), ("maxLength", "length ≤ {}"), ("minItems", "items ≥ {}"),
         ("maxItems", "items ≤ {}"), ("pattern", "matches {}")]


def rules_of(schema: dict[str, Any]) -> list[str]:
    """The constraints of a schema and of its options, in words."""
    rules = [words.format(_number(schema[key])) for key, words in RULES if key in schema]
    if "not" in schema:
        rules.append("not " + ", ".join(f"{k} {v}" for k, v in schema["not"].items()))
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key, ()):
            rules += rules_of(option)
    if "items" in schema:
        rules += [f"each {rule}" for rule in rules_of(schema["items"])]
    return rules


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _default(schema: dict[str, Any]) -> str | None:
    return json.dumps(schema["default"]) if "default" in schema else None
