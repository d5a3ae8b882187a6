"""Requests drawn from a request body's own JSON schema (the OpenAPI 3.0 subset the service states):
valid ones that use only what the schema allows, and ones that break exactly one stated rule.

Small on purpose: objects, arrays, oneOf, enum, integer and number bounds, booleans, nullable and
``additionalProperties: false``. A string with a ``pattern`` is left out of valid requests (drawing
from a regex is out of scope) and filled with text that breaks the pattern in invalid ones.
"""

from __future__ import annotations

import copy
import random
import re
import string
from typing import Any

JUNK_ALPHABET = string.ascii_letters + string.digits + "./-_\\ \n\x01é:"


def inline_refs(schema: Any, document: dict) -> Any:
    """``schema`` with every ``{"$ref": "#/components/..."}`` replaced by a copy of its target."""
    if isinstance(schema, list):
        return [inline_refs(item, document) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return inline_refs(target, document)
    return {key: inline_refs(value, document) for key, value in schema.items()}


def valid_instance(schema: dict, rng: random.Random, caps: dict[str, int] | None = None,
                   name: str = "") -> Any:
    """A value the schema accepts. ``caps`` lowers the ``maximum`` of the properties it names (to keep
    requests cheap); optional properties are present half of the time."""
    caps = caps or {}
    if "oneOf" in schema:
        return valid_instance(rng.choice(schema["oneOf"]), rng, caps, name)
    if schema.get("nullable") and rng.random() < 0.15:
        return None
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        value = {}
        for key, child in schema.get("properties", {}).items():
            if key in schema.get("required", []) or (rng.random() < 0.5 and "pattern" not in child):
                value[key] = valid_instance(child, rng, caps, key)
        return value
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), max(schema.get("minItems", 0), 3))
        return [valid_instance(schema["items"], rng, caps, name) for _ in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", -1000)
        high = min(schema.get("maximum", 1000), caps.get(name, float("inf")))
        if kind == "integer":
            return rng.choice([low, high, rng.randint(int(low), int(high))])
        return rng.choice([float(low), float(high), rng.uniform(low, high)])
    if kind == "boolean":
        return rng.random() < 0.5
    raise ValueError(f"no valid value drawn for {name or 'the body'}: {schema}")


def _breaking(schema: dict, rng: random.Random) -> Any:
    """A value that breaks ``schema`` (which has bounds, an enum, a pattern or a type)."""
    if "oneOf" in schema:  # labels: a name outside the vocabulary, as a key or a list item
        return rng.choice([{"Pneumonitis": True}, ["Pneumonitis"], {"No Finding": False}, "Effusion"])
    if "enum" in schema:
        return rng.choice(["png32", "", 3])
    if "pattern" in schema:
        while True:
            text = "".join(rng.choice(JUNK_ALPHABET) for _ in range(rng.randint(0, 20)))
            candidate = rng.choice([text, "s3://" + text, "s3://bucket/" + text])
            if not re.search(schema["pattern"], candidate):
                return candidate
    kind = schema.get("type")
    if kind in ("integer", "number"):
        choices: list[Any] = ["3", True]
        if "maximum" in schema:
            choices.append(schema["maximum"] + 1)
        if "minimum" in schema:
            choices.append(schema["minimum"] - 1)
        return rng.choice(choices)
    if kind == "boolean":
        return rng.choice(["yes", 1])
    if kind == "object":
        return rng.choice([[], "{}"])
    raise ValueError(f"no breaking value for {schema}")


def invalid_instance(schema: dict, rng: random.Random, caps: dict[str, int] | None = None) -> tuple[Any, str]:
    """A valid instance with one rule broken: an unknown property, or one property's value. Returns
    the body and the dotted path of what was broken."""
    body = valid_instance(schema, rng, caps)
    parent, path, properties = body, "", schema["properties"]
    if "lco" in properties and rng.random() < 0.3:  # reach into the nested object too
        parent = body.setdefault("lco", {})
        path, properties = "lco.", properties["lco"]["properties"]
    if rng.random() < 0.15:
        parent["unexpected_field"] = 1
        return body, path + "unexpected_field"
    key = rng.choice(sorted(properties))
    parent[key] = _breaking(copy.deepcopy(properties[key]), rng)
    return body, path + key
