"""The OpenAPI 3.1 description of the whole HTTP API, served at ``/v1/openapi.json``.

Kept by hand next to the code it describes; the tests check every real
answer of every endpoint against it, so it cannot drift unnoticed.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List

__all__ = ["openapi_document"]

_JSON = "application/json"
_CSV = "text/csv"


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Dict[str, Any], description: str) -> Dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> Dict[str, Any]:
    return _json(_ref("Error"), description)


_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_TIME = {"type": "string", "description": "RFC 3339, UTC"}
_ANY: Dict[str, Any] = {"description": "any JSON value"}

_SCHEMAS: Dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Payload": {
        "type": "object",
        "required": ["instance_id", "timestamp"],
        "properties": {
            "instance_id": {"type": "string", "description": "equals the path's instance id"},
            "timestamp": _TIME,
            "payload_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "data": {"type": ["object", "null"]},
            "events": {"type": ["array", "null"], "items": _ref("Event")},
            "client": {
                "type": ["object", "null"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "dropped": _COUNT,
                    "dropped_events": _COUNT,
                },
            },
        },
    },
    "Event": {
        "type": "object",
        "description": "one flat event: its four fields, then scalar attributes",
        "required": ["event_id", "event_time", "event_type", "event_name"],
        "properties": {
            "event_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "event_time": _TIME,
            "event_type": {"type": "string", "minLength": 1, "maxLength": 256},
            "event_name": {"type": "string", "minLength": 1, "maxLength": 256},
        },
        "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
    },
    "StoredEvent": {
        "type": "object",
        "required": ["instance_id", "event_id", "event_time", "event_type", "event_name",
                     "attrs", "received_at"],
        "additionalProperties": False,
        "properties": {
            "instance_id": {"type": "string"},
            "event_id": {"type": "string"},
            "event_time": _TIME,
            "event_type": {"type": "string"},
            "event_name": {"type": "string"},
            "attrs": {
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
            },
            "received_at": _TIME,
        },
    },
    "Events": {
        "type": "object",
        "required": ["since", "until", "events", "next_offset"],
        "additionalProperties": False,
        "properties": {
            "since": _TIME,
            "until": _TIME,
            "events": {"type": "array", "items": _ref("StoredEvent")},
            "next_offset": {"type": ["integer", "null"]},
        },
    },
    "UpdateAnswer": {
        "type": "object",
        "required": ["next_update"],
        "additionalProperties": False,
        "properties": {
            "next_update": {"type": "integer", "description": "nanoseconds until the next send"},
            "disable_keys": {"type": "array", "items": {"type": "string"}},
            "enable_keys": {"type": "array", "items": {"type": "string"}},
            "stop": {"type": "boolean"},
        },
    },
    "RateLimited": {
        "type": "object",
        "required": ["error", "next_update"],
        "properties": {"error": {"type": "string"}, "next_update": _INT},
    },
    "StoredPayload": {
        "type": "object",
        "required": ["payload_id", "timestamp", "received_at", "data", "client"],
        "additionalProperties": False,
        "properties": {
            "payload_id": {"type": "string"},
            "timestamp": {"type": "string", "description": "the client's timestamp, as sent"},
            "received_at": _TIME,
            "data": {"type": "object"},
            "client": {"type": ["object", "null"]},
        },
    },
    "InstancePayloads": {
        "type": "object",
        "required": ["instance_id", "payloads", "next_offset"],
        "additionalProperties": False,
        "properties": {
            "instance_id": {"type": "string"},
            "payloads": {"type": "array", "items": _ref("StoredPayload")},
            "next_offset": {"type": ["integer", "null"]},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["instances", "payloads", "dropped", "keys", "events"],
        "additionalProperties": False,
        "properties": {
            "instances": _COUNT,
            "payloads": _COUNT,
            "dropped": _COUNT,
            "keys": {
                "type": "object",
                "description": "per key: the sum of a counter, the merged counting set"
                " ([{value, count}]), or the latest value",
                "additionalProperties": _ANY,
            },
            "events": {
                "type": "object",
                "description": "events per type and name",
                "additionalProperties": {"type": "object", "additionalProperties": _COUNT},
            },
        },
    },
    "Series": {
        "type": "object",
        "required": ["key", "bucket", "points"],
        "additionalProperties": False,
        "properties": {
            "key": {"type": "string"},
            "bucket": {"enum": ["hour", "day", "week"]},
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["t", "value", "instances"],
                    "additionalProperties": False,
                    "properties": {
                        "t": _TIME,
                        "value": {
                            "type": ["integer", "null"],
                            "description": "the sum of a counter's reports; null for other kinds",
                        },
                        "instances": _COUNT,
                    },
                },
            },
        },
    },
    "Breakdown": {
        "type": "object",
        "required": ["key", "kind", "values"],
        "additionalProperties": False,
        "properties": {
            "key": {"type": "string"},
            "kind": {"enum": ["set", "counting_set", "counter", None]},
            "values": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["value", "instances"],
                    "additionalProperties": False,
                    "properties": {
                        "value": _ANY,
                        "count": {"type": "integer", "description": "counting sets only"},
                        "instances": _COUNT,
                    },
                },
            },
        },
    },
    "Active": {
        "type": "object",
        "required": ["bucket", "points"],
        "additionalProperties": False,
        "properties": {
            "bucket": {"enum": ["hour", "day", "week"]},
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["t", "instances", "payloads", "dropped"],
                    "additionalProperties": False,
                    "properties": {
                        "t": _TIME,
                        "instances": _COUNT,
                        "payloads": _COUNT,
                        "dropped": _COUNT,
                    },
                },
            },
        },
    },
    "Policy": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "next_update": {"type": "number", "minimum": 0, "description": "seconds"},
            "disabled_keys": {"type": "array", "items": {"type": "string"}},
            "enabled_keys": {"type": "array", "items": {"type": "string"}},
            "stop": {
                "type": ["boolean", "array"],
                "items": {"type": "string"},
                "description": "true, false, or the instance ids to stop",
            },
            "rate_limit": {
                "type": ["object", "null"],
                "required": ["payloads", "window"],
                "additionalProperties": False,
                "properties": {
                    "payloads": {"type": "integer", "minimum": 1},
                    "window": {"type": "number", "description": "seconds"},
                },
            },
        },
    },
    "PolicyHistory": {
        "type": "object",
        "required": ["changes"],
        "additionalProperties": False,
        "properties": {
            "changes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["time", "source", "policy", "changed"],
                    "additionalProperties": False,
                    "properties": {
                        "time": _TIME,
                        "source": {"enum": ["http", "file", "api"]},
                        "policy": _ref("Policy"),
                        "changed": {"type": "array", "items": {"type": "string"}},
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}


def _parameter(
    name: str,
    description: str,
    schema: Dict[str, Any],
    *,
    required: bool = False,
    where: str = "query",
) -> Dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": schema,
    }


_WINDOW = [
    _parameter(
        "since",
        "start, inclusive: RFC 3339 or YYYY-MM-DD (default: until - 30 days)",
        {"type": "string"},
    ),
    _parameter(
        "until", "end, exclusive: RFC 3339 or YYYY-MM-DD (default: now)", {"type": "string"}
    ),
    _parameter("format", "json (default) or csv", {"enum": ["json", "csv"]}),
]
_BUCKET = _parameter(
    "bucket",
    "hour, day (default) or week (from Monday 00:00 UTC)",
    {"enum": ["hour", "day", "week"]},
)
_KEY = _parameter("key", "the key asked for", {"type": "string"}, required=True)
_INSTANCE = _parameter("instance_id", "a UUID", {"type": "string"}, required=True, where="path")
_READ: List[Dict[str, List[str]]] = [{"bearer": []}]
_REFUSALS = {
    "400": _error("a bad parameter"),
    "401": _error("no valid token (WWW-Authenticate: Bearer)"),
    "403": _error("no token is configured and the client is not local"),
}


def _read(
    summary: str, schema: str, parameters: List[Dict[str, Any]], *, csv: bool = False
) -> Dict[str, Any]:
    ok = _json(_ref(schema), "the answer")
    if csv:
        ok["content"][_CSV] = {"schema": {"type": "string"}}
    return {
        "get": {
            "summary": summary,
            "security": _READ,
            "parameters": parameters,
            "responses": {"200": ok, **_REFUSALS},
        }
    }


_PATHS: Dict[str, Any] = {
    "/v1/update/{instance_id}": {
        "post": {
            "summary": "Send a payload (open to anyone); the answer carries the policy",
            "security": [],
            "parameters": [_INSTANCE],
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Payload")}}},
            "responses": {
                "200": _json(_ref("UpdateAnswer"), "stored (or already stored)"),
                "400": _error("malformed payload"),
                "413": _error("too large"),
                "415": _error("not JSON"),
                "429": _json(_ref("RateLimited"), "rate limited: wait Retry-After seconds"),
            },
        }
    },
    "/v1/instances/{instance_id}": _read(
        "One instance's stored payloads, newest first",
        "InstancePayloads",
        [
            _INSTANCE,
            _parameter("limit", "1..1000, default 50", {"type": "integer"}),
            _parameter("offset", "default 0", {"type": "integer"}),
        ],
    ),
    "/v1/stats": _read("Totals within the window (whole UTC days)", "Stats", _WINDOW, csv=True),
    "/v1/events": _read(
        "Stored events, newest first (an event counts at its event_time, or its arrival"
        " when that is earlier)",
        "Events",
        [
            _parameter("type", "only this event_type", {"type": "string"}),
            _parameter("name", "only this event_name", {"type": "string"}),
            _parameter("instance", "only this instance id", {"type": "string"}),
            _parameter("limit", "1..1000, default 100", {"type": "integer"}),
            _parameter("offset", "default 0", {"type": "integer"}),
            *_WINDOW[:2],
        ],
    ),
    "/v1/series": _read(
        "A key over time: one point per bucket, empty ones included",
        "Series",
        [_KEY, _BUCKET, *_WINDOW],
        csv=True,
    ),
    "/v1/breakdown": _read(
        "A set key's latest value per instance, or a counting set's top values",
        "Breakdown",
        [_KEY, _parameter("limit", "1..1000, default 10", {"type": "integer"}), *_WINDOW],
        csv=True,
    ),
    "/v1/active": _read(
        "Distinct active instances, payloads and dropped items per bucket",
        "Active",
        [_BUCKET, *_WINDOW],
        csv=True,
    ),
    "/v1/policy": {
        **_read("The policy in force", "Policy", []),
        "put": {
            "summary": "Replace the whole policy (admin token); omitted fields take defaults",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Policy")}}},
            "responses": {
                "200": _json(_ref("Policy"), "the policy now in force"),
                "400": _error("invalid policy: says which field and why"),
                "401": _error("no valid token"),
                "403": _error("not the admin token, or no admin token configured"),
                "415": _error("not JSON"),
            },
        },
    },
    "/v1/policy/history": _read(
        "Every policy change, newest first",
        "PolicyHistory",
        [_parameter("limit", "1..1000, default 100", {"type": "integer"})],
    ),
    "/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "security": _READ,
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {_JSON: {"schema": {"type": "object"}}},
                },
                **_REFUSALS,
            },
        }
    },
    "/healthz": {
        "get": {
            "summary": "Liveness (open to anyone)",
            "security": [],
            "responses": {"200": _json(_ref("Health"), "serving")},
        }
    },
}

_DOCUMENT: Dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "telemetry server_stub",
        "version": "1",
        "description": "Collection endpoint for the telemetry client, and the operator's API."
        " Reads need the read or admin token (Authorization: Bearer), or, with no token"
        " configured, a loopback client.",
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}


def openapi_document() -> Dict[str, Any]:
    """A fresh copy of the document (callers may change it)."""
    return copy.deepcopy(_DOCUMENT)
