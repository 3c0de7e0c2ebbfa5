"""A small JSON Schema checker: the subset the OpenAPI document uses, strictly.

Supports ``$ref`` (to ``#/components/schemas/...``), ``type`` (a name or a
list, ``integer`` excluding bools), ``enum``, ``properties``, ``required``,
``additionalProperties`` (false or a schema), ``items``, ``minimum`` and
``pattern``. Any other keyword is an error, so the document cannot use one
this checker would silently ignore.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

__all__ = ["SchemaError", "validate"]

_KNOWN = {
    "$ref",
    "type",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "pattern",
    "description",
}


class SchemaError(AssertionError):
    """``value`` does not match the schema; the message gives the JSON path."""


def _is(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise SchemaError(f"unknown type {name!r} in the schema")


def validate(value: Any, schema: Dict[str, Any], document: Dict[str, Any], path: str = "$") -> None:
    """Raise ``SchemaError`` unless ``value`` matches ``schema`` (refs resolved in ``document``)."""
    unknown = set(schema) - _KNOWN
    if unknown:
        raise SchemaError(f"{path}: the schema uses unsupported keywords {sorted(unknown)}")
    if "$ref" in schema:
        target: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        validate(value, target, document, path)
        return
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{path}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        names: List[str] = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, name) for name in names):
            raise SchemaError(f"{path}: {value!r} is not of type {names}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        raise SchemaError(f"{path}: {value!r} is below {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        raise SchemaError(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaError(f"{path}: {name!r} is required")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], document, f"{path}.{name}")
            elif extra is False:
                raise SchemaError(f"{path}: {name!r} is not in the schema")
            elif isinstance(extra, dict):
                validate(item, extra, document, f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], document, f"{path}[{index}]")
