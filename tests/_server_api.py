"""Talking to the server under test: payloads, requests, and checks of its answers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import requests

from server_stub import Server

__all__ = [
    "MIB",
    "NS",
    "REPO",
    "assert_error",
    "assert_healthy",
    "get",
    "make_payload",
    "post",
    "post_raw",
]

NS = 1_000_000_000
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def make_payload(
    instance_id: Optional[str] = None,
    data: Optional[Dict[str, Any]] = None,
    *,
    dropped: int = 0,
    payload_id: Optional[str] = None,
) -> Dict[str, Any]:
    """A valid ``/v1/update`` body: a new instance and ``payload_id`` unless given."""
    return {
        "instance_id": instance_id or str(uuid.uuid4()),
        "timestamp": "2026-11-23T10:00:00.123456Z",
        "payload_id": payload_id or uuid.uuid4().hex,
        "data": data if data is not None else {},
        "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": dropped},
    }


def post(
    server: Server,
    payload: Dict[str, Any],
    session: Any = requests,
    **kwargs: Any,
) -> requests.Response:
    """``payload`` as JSON to ``/v1/update/<its instance_id>``."""
    response: requests.Response = session.post(
        f"{server.url}/v1/update/{payload['instance_id']}", json=payload, timeout=10, **kwargs
    )
    return response


def post_raw(
    server: Server,
    body: bytes,
    *,
    instance_id: Optional[str] = None,
    headers: Optional[Dict[str, str]] = None,
) -> requests.Response:
    """``body`` as it is to ``/v1/update/...``, declared ``application/json`` unless overridden."""
    return requests.post(
        f"{server.url}/v1/update/{instance_id or uuid.uuid4()}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=10,
    )


def get(server: Server, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", timeout=10)


def assert_healthy(server: Server) -> None:
    """The server still answers (after a request that could have hurt it)."""
    response = get(server, "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def assert_error(response: requests.Response, status: int) -> None:
    """``response`` is ``status`` with a JSON ``{"error": "<something>"}`` body."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict)
    assert isinstance(body["error"], str)
    assert body["error"]
