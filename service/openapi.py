"""OpenAPI 3.0 spellings of JSON Schema that pydantic writes in 3.1 form (BentoML 1.4 serves 3.0.2)."""

from __future__ import annotations


def openapi_30_nullable(schema: dict) -> None:
    """Rewrite each property's ``anyOf: [X, {"type": "null"}]`` as OpenAPI 3.0's ``X, nullable``
    (a pydantic ``json_schema_extra`` hook; BentoML keeps only the first branch of an ``anyOf``)."""
    for name, field in schema.get("properties", {}).items():
        branches = field.get("anyOf", [])
        if len(branches) == 2 and {"type": "null"} in branches:
            field.pop("anyOf")
            schema["properties"][name] = {**next(b for b in branches if b != {"type": "null"}), **field,
                                          "nullable": True}
