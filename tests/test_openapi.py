"""``/v1/openapi.json`` describes every endpoint, and every real answer matches it."""

from __future__ import annotations

import re
import threading
import uuid
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import requests
from _schema import SchemaError, validate

from server_stub import create_app, serve
from server_stub._http import make_server
from server_stub._openapi import openapi_document

INSTANCE = str(uuid.uuid4())


@pytest.fixture
def token_server() -> Iterator[str]:
    """A server with a read token and no admin token; its URL."""
    app = create_app(read_token="reader")
    httpd = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.url
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
        app.store.close()


def _template(document: Dict[str, Any], path: str) -> str:
    """The document's path template that ``path`` (without its query) matches."""
    for template in document["paths"]:
        pattern = re.sub(r"\{[^}]+\}", "[^/]+", template)
        if re.fullmatch(pattern, path):
            return str(template)
    raise AssertionError(f"{path} is not in the OpenAPI document")


def _payload(data: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "instance_id": INSTANCE,
        "timestamp": "2026-11-23T10:00:00.5Z",
        "payload_id": uuid.uuid4().hex,
        "data": data,
        "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": 2},
    }


def _exchanges(url: str, token_url: str) -> List[Tuple[str, str, requests.Response]]:
    """Call every endpoint, in its successes and its refusals: (method, path, answer)."""
    window = "since=2026-11-20&until=2026-11-26"
    calls: List[Tuple[str, str, Dict[str, Any]]] = [
        ("POST", f"/v1/update/{INSTANCE}", {"json": _payload({"n": 3, "v": "1.2"})}),
        (
            "POST",
            f"/v1/update/{INSTANCE}",
            {"json": _payload({"agents": [{"value": "curl", "count": 2}], "m": {"a": [1]}})},
        ),
        ("POST", f"/v1/update/{INSTANCE}", {"json": {"instance_id": INSTANCE}}),
        ("POST", f"/v1/update/{INSTANCE}", {"data": b"{}"}),
        (
            "POST",
            f"/v1/update/{INSTANCE}",
            {
                "json": {
                    **_payload({}),
                    "events": [
                        {"event_id": uuid.uuid4().hex, "event_time": "2026-11-23T10:00:00Z",
                         "event_type": "behavioral", "event_name": "login", "ok": True},
                        {"event_id": uuid.uuid4().hex, "event_time": "2026-11-23T10:00:01Z",
                         "event_type": "log", "event_name": "warn", "message": "m", "n": 1.5},
                    ],
                }
            },
        ),
        ("GET", f"/v1/events?{window}", {}),
        ("GET", f"/v1/events?type=log&name=warn&instance={INSTANCE}&limit=1&{window}", {}),
        ("GET", "/v1/events?limit=0", {}),
        ("GET", f"/v1/instances/{INSTANCE}?limit=1", {}),
        ("GET", f"/v1/instances/{INSTANCE}?limit=0", {}),
        ("GET", f"/v1/stats?{window}", {}),
        ("GET", f"/v1/stats?{window}&format=csv", {}),
        ("GET", "/v1/stats?since=never", {}),
        ("GET", f"/v1/series?key=n&bucket=hour&{window}", {}),
        ("GET", f"/v1/series?key=v&bucket=week&{window}&format=csv", {}),
        ("GET", "/v1/series", {}),
        ("GET", f"/v1/breakdown?key=v&{window}", {}),
        ("GET", f"/v1/breakdown?key=agents&{window}", {}),
        ("GET", f"/v1/breakdown?key=n&{window}", {}),
        ("GET", "/v1/breakdown?key=missing", {}),
        ("GET", f"/v1/breakdown?key=agents&{window}&format=csv", {}),
        ("GET", "/v1/breakdown?key=v&limit=x", {}),
        ("GET", f"/v1/active?{window}", {}),
        ("GET", f"/v1/active?bucket=week&{window}&format=csv", {}),
        ("GET", "/v1/active?bucket=year", {}),
        ("GET", "/v1/policy", {}),
        ("PUT", "/v1/policy", {"json": {"disable_keys": []}}),
        ("PUT", "/v1/policy", {"data": b"{}"}),
        (
            "PUT",
            "/v1/policy",
            {
                "json": {
                    "next_update": 1.5,
                    "stop": [INSTANCE],
                    "rate_limit": {"payloads": 1, "window": 9},
                }
            },
        ),
        ("POST", f"/v1/update/{INSTANCE}", {"json": _payload({"n": 1})}),
        ("POST", f"/v1/update/{INSTANCE}", {"json": _payload({"n": 1})}),  # rate limited
        ("GET", "/v1/policy/history", {}),
        ("GET", "/v1/policy/history?limit=-1", {}),
        ("GET", "/v1/openapi.json", {}),
        ("GET", "/healthz", {}),
    ]
    answers = []
    for method, path, options in calls:
        answer = requests.request(method, f"{url}{path}", timeout=10, **options)
        answers.append((method, path, answer))
    refusals: List[Tuple[str, str, Dict[str, Any]]] = [
        ("GET", "/v1/stats", {}),
        ("GET", "/v1/openapi.json", {}),
        ("PUT", "/v1/policy", {"json": {}, "headers": {"Authorization": "Bearer reader"}}),
    ]
    for method, path, options in refusals:
        answer = requests.request(method, f"{token_url}{path}", timeout=10, **options)
        answers.append((method, path, answer))
    return answers


def test_every_answer_matches_the_document(backend_db: str, token_server: str) -> None:
    document = openapi_document()
    seen: Set[Tuple[str, str, int]] = set()
    with serve(port=0, db=backend_db) as server:
        served = requests.get(f"{server.url}/v1/openapi.json", timeout=10)
        assert served.json() == document
        for method, path, answer in _exchanges(server.url, token_server):
            route = path.split("?", 1)[0]
            template = _template(document, route)
            operation = document["paths"][template][method.lower()]
            status = str(answer.status_code)
            assert status in operation["responses"], f"{method} {path}: {status} undocumented"
            content = operation["responses"][status]["content"]
            media_type = answer.headers["Content-Type"].split(";")[0]
            assert media_type in content, f"{method} {path}: {media_type} undocumented"
            if media_type == "application/json":
                try:
                    validate(answer.json(), content[media_type]["schema"], document)
                except SchemaError as exc:
                    raise AssertionError(f"{method} {path} ({status}): {exc}") from None
            seen.add((template, method.lower(), answer.status_code))
    for template, operations in document["paths"].items():
        for method in operations:
            assert (template, method, 200) in seen, f"{method} {template} never answered 200"
    # The refusals are documented and were met too.
    assert {status for _, _, status in seen} >= {200, 400, 401, 403, 415, 429}


def test_the_checker_catches_what_it_checks() -> None:
    document = openapi_document()
    series = {"$ref": "#/components/schemas/Series"}
    good = {"key": "k", "bucket": "day", "points": [{"t": "x", "value": None, "instances": 0}]}
    validate(good, series, document)
    bad_answers = [
        {**good, "extra": 1},
        {**good, "bucket": "month"},
        {"key": "k", "bucket": "day"},
        {**good, "points": [{"t": "x", "value": True, "instances": 0}]},
        {**good, "points": [{"t": "x", "value": 1, "instances": -1}]},
    ]
    for bad in bad_answers:
        with pytest.raises(SchemaError):
            validate(bad, series, document)
    with pytest.raises(SchemaError, match="unsupported"):
        validate(1, {"oneOf": []}, document)
