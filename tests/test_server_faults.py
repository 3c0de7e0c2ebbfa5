"""The server under hostile requests: traversal, odd request lines and headers.

Raw HTTP to the real ``server_stub`` over loopback; Hypothesis runs ``derandomize``d.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, Optional

import pytest
from _net import RawAnswer, raw_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_stub import Server

# -- security ------------------------------------------------------------------------------
# Covered elsewhere, so not repeated here: bodies over 1 MiB / 10 MiB decompressed and gzip
# bombs with bounded memory (tests/test_app_validation.py), 0600 files in 0700 directories
# (tests/test_state.py::test_directories_0700_and_files_0600).

INSTANCE = "3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11"


def post_path(server: Server, path: str, body: bytes = b"{}",
              content_type: str = "application/json") -> RawAnswer:
    return raw_http(server, (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1") + body)


def assert_json_error(status: int, headers: Dict[str, str], body: bytes, allowed: Any) -> None:
    assert status in allowed, (status, body)
    assert headers["content-type"] == "application/json"
    assert isinstance(json.loads(body)["error"], str)


def valid_body(instance: str = INSTANCE) -> bytes:
    return json.dumps({"instance_id": instance, "timestamp": "2026-11-23T10:00:00Z",
                       "payload_id": uuid.uuid4().hex, "data": {"k": 1}}).encode()


@pytest.mark.parametrize("path", [
    "/v1/update/../../etc/passwd",
    "/v1/update/..",
    "/v1/update/%2e%2e",
    "/v1/update/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/update/..%2f..%2fv1%2fstats",
    "/v1/update/" + INSTANCE + "/../" + INSTANCE,
    "/v1/update/%2F" + INSTANCE,
    "/v1/update/" + INSTANCE + "%2F..",
    "/v1/update/" + INSTANCE + "junk",
    "/v1/update/" + INSTANCE + "%00",
    "/v1/update/" + INSTANCE + "%0a",
    "/v1/update/" + INSTANCE + ";x",
    "/v1/update/" + INSTANCE[:-1],
    "/v1/update/{" + INSTANCE + "}",
    "/v1/update/urn:uuid:" + INSTANCE,
    "/v1/update/" + INSTANCE.replace("-", ""),
    "/v1/update/" + INSTANCE.replace("3", "\u0663"),  # an Arabic-Indic digit
    "/v1/update/%EF%BC%93" + INSTANCE[1:],  # a fullwidth digit, percent-encoded
    "/v1/instances/../../etc/passwd",
    "/v1/instances/%2e%2e",
    "/v1//update/" + INSTANCE,
    "/V1/UPDATE/" + INSTANCE,
])
def test_the_server_refuses_traversal_and_non_uuid_instance_ids(
    telemetry_server: Server, path: str
) -> None:
    raw = path.encode("utf-8").decode("latin-1")  # as the bytes go on the wire
    status, headers, body = post_path(telemetry_server, raw, valid_body())
    assert_json_error(status, headers, body, {400, 404, 405})
    assert telemetry_server.stats()["payloads"] == 0
    assert telemetry_server.stats()["instances"] == 0
    assert post_path(telemetry_server, f"/v1/update/{INSTANCE}", valid_body())[0] == 200


_PATH_PIECES = st.sampled_from(
    ["/", "..", ".", "%2e", "%2f", "%00", "%0a", "%ff", "%", "v1", "update", "instances",
     "stats", "healthz", INSTANCE, INSTANCE.upper(), "?", "?limit=-1", "#", ";", "~", "\\"]
)
_PATHS = st.lists(_PATH_PIECES | st.text("abcdef0123456789-/.%", max_size=12), max_size=8).map(
    lambda pieces: "/" + "".join(pieces)
) | st.sampled_from([f"/v1/update/{INSTANCE}", "*", f"http://evil.example/v1/update/{INSTANCE}"])


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"]),
    path=_PATHS,
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8",
                                  "text/plain", "", "application/json;;;", "*/*"]),
    encoding=st.sampled_from([None, "gzip", "identity", "br", "gzip, gzip", ""]),
    body=st.binary(max_size=256) | st.builds(valid_body),
    declared=st.sampled_from(["exact", "short", "none", "junk"]),
)
def test_any_request_line_and_headers_get_a_json_answer(
    telemetry_server: Server, method: str, path: str, content_type: str,
    encoding: Optional[str], body: bytes, declared: str,
) -> None:
    """Extends the body fuzz in tests/test_app_validation.py to methods, paths and headers."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if encoding is not None:
        lines.append(f"Content-Encoding: {encoding}")
    if declared == "exact":
        lines.append(f"Content-Length: {len(body)}")
    elif declared == "short":  # fewer bytes declared than sent: the rest is not read
        lines.append(f"Content-Length: {len(body) // 2}")
    elif declared == "junk":
        lines.append("Content-Length: 12abc")
    status, headers, answer = raw_http(
        telemetry_server, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    )
    assert 200 <= status < 300 or 400 <= status < 500, (status, answer)
    assert headers.get("content-type") == "application/json", (status, answer)
    assert isinstance(json.loads(answer), dict)
    status, _, _ = raw_http(telemetry_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
    assert status == 200
