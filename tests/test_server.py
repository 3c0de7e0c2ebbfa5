"""The reference server over real loopback HTTP: protocol, validation, storage, harness, CLI.

Every test that uses ``telemetry_server`` (or ``backend_db``) runs twice: on
in-memory SQLite and on a fresh schema of the session's real PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from wsgiref.util import setup_testing_defaults

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_stub import Policy, Server, create_app, open_store, serve

NS = 1_000_000_000
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

# A body Caddy's original Go client really sent (shared/examples/caddy_go_client_payload.json):
# no payload_id, 9-digit fraction, expect_next, no client.
CADDY_GO_CLIENT_BODY = (
    b'{"instance_id":"595a3d39-692a-4e97-9262-b7c303698871",'
    b'"timestamp":"2026-11-23T10:37:53.527539808Z","expect_next":"0001-01-01T00:00:00Z",'
    b'"data":{"goroutines":4,"interop_counter":16,"interop_fasthash":"4f9f2cab",'
    b'"interop_hello:1a2b3c":[{"value":"ua-hash","count":1}],"interop_increment_only":4,'
    b'"interop_list":["x",1,"x",{"k":1}],"interop_nested":{"a":2,"b":"x","c":[1,2]},'
    b'"interop_set_bool":true,"interop_set_counts":[{"value":"alpha","count":3},'
    b'{"value":"beta","count":1},{"value":"gamma","count":2}],'
    b'"interop_set_counts_int":[{"value":443,"count":2},{"value":80,"count":1}],'
    b'"interop_set_float":3.25,"interop_set_int":42,"interop_set_list":["a","b"],'
    b'"interop_set_string":"second","interop_set_struct":{"brand_name":"Interop CPU","num_cpus":2},'
    b'"memory":{"heap_alloc":160112,"sys":12958736}}}'
)


def make_payload(
    instance_id: Optional[str] = None,
    data: Optional[Dict[str, Any]] = None,
    *,
    dropped: int = 0,
    payload_id: Optional[str] = None,
) -> Dict[str, Any]:
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
    return requests.post(
        f"{server.url}/v1/update/{instance_id or uuid.uuid4()}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=10,
    )


def get(server: Server, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", timeout=10)


def assert_healthy(server: Server) -> None:
    response = get(server, "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.fixture(params=["sqlite", "postgres"])
def backend_db(request: pytest.FixtureRequest) -> str:
    """``db`` for the server under test: in-memory SQLite, or an empty PostgreSQL schema."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return ":memory:"


@pytest.fixture
def telemetry_server(backend_db: str) -> Iterator[Server]:
    """The plugin's fixture, on each storage backend."""
    with serve(port=0, db=backend_db) as server:
        yield server


def assert_error(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict)
    assert isinstance(body["error"], str)
    assert body["error"]


# -- the happy path ---------------------------------------------------------------------------


def test_healthz(telemetry_server: Server) -> None:
    assert_healthy(telemetry_server)


def test_update_is_stored_and_answered_with_next_update_in_nanoseconds(
    telemetry_server: Server,
) -> None:
    payload = make_payload(data={"requests": 3, "version": "1.4.2"}, dropped=2)

    response = post(telemetry_server, payload)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"next_update": 3600 * NS}
    stats = get(telemetry_server, "/v1/stats").json()
    assert stats == {
        "instances": 1,
        "payloads": 1,
        "dropped": 2,
        "keys": {"requests": 3, "version": "1.4.2"},
        "events": {},
    }
    assert telemetry_server.payloads == [payload]
    [stored] = telemetry_server.stored_payloads()
    assert stored["payload_id"] == payload["payload_id"]
    assert stored["data"] == payload["data"]


def test_content_type_parameters_and_gzip_are_accepted(telemetry_server: Server) -> None:
    payload = make_payload(data={"big": "x" * 5000})
    body = gzip.compress(json.dumps(payload).encode())

    response = post_raw(
        telemetry_server,
        body,
        instance_id=payload["instance_id"],
        headers={"Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip"},
    )

    assert response.status_code == 200
    [request] = telemetry_server.requests
    assert request.body == body
    assert request.decoded_body == json.dumps(payload).encode()
    assert request.json == payload
    assert request.headers["Content-Encoding"] == "gzip"
    assert telemetry_server.stats()["keys"] == {"big": "x" * 5000}


def test_multi_member_gzip_is_accepted(telemetry_server: Server) -> None:
    payload = make_payload(data={"n": 1})
    encoded = json.dumps(payload).encode()
    body = gzip.compress(encoded[:10]) + gzip.compress(encoded[10:])

    response = post_raw(
        telemetry_server,
        body,
        instance_id=payload["instance_id"],
        headers={"Content-Encoding": "gzip"},
    )

    assert response.status_code == 200


def test_body_of_exactly_one_mib_is_accepted(telemetry_server: Server) -> None:
    payload = make_payload(data={"pad": ""})
    padding = MIB - len(json.dumps(payload).encode())
    payload["data"]["pad"] = "x" * padding
    body = json.dumps(payload).encode()
    assert len(body) == MIB

    response = post_raw(telemetry_server, body, instance_id=payload["instance_id"])

    assert response.status_code == 200


def test_caddy_go_client_payload_is_accepted(telemetry_server: Server) -> None:
    example = REPO.parent / "shared" / "examples" / "caddy_go_client_payload.json"
    if example.exists():  # the copy above is the file, byte for byte
        assert example.read_bytes().strip() == CADDY_GO_CLIENT_BODY
    instance_id = "595a3d39-692a-4e97-9262-b7c303698871"

    first = post_raw(telemetry_server, CADDY_GO_CLIENT_BODY, instance_id=instance_id)
    second = post_raw(telemetry_server, CADDY_GO_CLIENT_BODY, instance_id=instance_id)

    for response in (first, second):
        assert response.status_code == 200
        # The Go client refuses an answer without this exact content type.
        assert response.headers["Content-Type"] == "application/json"
        assert response.json() == {"next_update": 3600 * NS}
    # No payload_id: the server assigns one each time, so there is no dedup.
    stored = get(telemetry_server, f"/v1/instances/{instance_id}").json()["payloads"]
    assert len(stored) == 2
    assert all(len(item["payload_id"]) == 32 for item in stored)
    assert stored[0]["payload_id"] != stored[1]["payload_id"]
    assert stored[0]["timestamp"] == "2026-11-23T10:37:53.527539808Z"
    assert stored[0]["client"] is None
    stats = telemetry_server.stats()
    assert stats["keys"]["interop_counter"] == 32
    assert stats["keys"]["interop_set_counts"] == [
        {"value": "alpha", "count": 6},
        {"value": "beta", "count": 2},
        {"value": "gamma", "count": 4},
    ]
    assert stats["keys"]["interop_set_string"] == "second"


def test_payload_without_data_and_with_numeric_offset_is_accepted(
    telemetry_server: Server,
) -> None:
    instance_id = str(uuid.uuid4())
    body = {"instance_id": instance_id, "timestamp": "2026-11-23T11:00:00.5+01:00"}

    response = post_raw(telemetry_server, json.dumps(body).encode(), instance_id=instance_id)

    assert response.status_code == 200
    assert telemetry_server.stats()["payloads"] == 1


def test_uppercase_instance_id_is_stored_in_canonical_form(telemetry_server: Server) -> None:
    instance_id = str(uuid.uuid4())
    payload = make_payload(instance_id.upper())

    assert post(telemetry_server, payload).status_code == 200

    listing = get(telemetry_server, f"/v1/instances/{instance_id}").json()
    assert listing["instance_id"] == instance_id
    assert len(listing["payloads"]) == 1


def test_repeated_payload_id_is_acknowledged_alike_and_stored_once(
    telemetry_server: Server,
) -> None:
    telemetry_server.policy.update(next_update=90, disabled_keys=["tls"])
    payload = make_payload(data={"requests": 5, "ua": [{"value": "curl", "count": 2}]})

    first = post(telemetry_server, payload)
    second = post(telemetry_server, payload)

    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.json() == {"next_update": 90 * NS, "disable_keys": ["tls"]}
    stats = telemetry_server.stats()
    assert stats["payloads"] == 1
    assert stats["keys"] == {"requests": 5, "ua": [{"value": "curl", "count": 2}]}
    assert len(telemetry_server.payloads) == 2  # both arrivals are recorded


# -- statistics -------------------------------------------------------------------------------


def test_stats_totals_match_independently_computed_totals(telemetry_server: Server) -> None:
    rng = random.Random(4)
    instances = [str(uuid.uuid4()) for _ in range(6)]
    counters: Counter[str] = Counter()
    agents: Counter[str] = Counter()
    ports: Counter[int] = Counter()
    latest: Dict[str, Any] = {}
    dropped = 0
    with requests.Session() as session:
        for index in range(300):
            data: Dict[str, Any] = {"requests": rng.randint(0, 1000)}
            counters["requests"] += data["requests"]
            if rng.random() < 0.5:
                data["errors"] = rng.randint(-5, 5)
                counters["errors"] += data["errors"]
            picked = rng.sample(["curl", "firefox", "go-http", "python"], rng.randint(1, 3))
            data["user_agents"] = [{"value": agent, "count": rng.randint(1, 9)} for agent in picked]
            agents.update({item["value"]: item["count"] for item in data["user_agents"]})
            if rng.random() < 0.3:
                data["ports"] = [{"value": 443, "count": 1}, {"value": 8080, "count": 2}]
                ports.update({443: 1, 8080: 2})
            for key, value in {
                "version": f"1.{rng.randint(0, 9)}",
                "tls": rng.random() < 0.5,
                "ratio": rng.random(),
                "memory": {"heap": rng.randint(0, 99), "index": index},
                "modules": ["a", "b"][: rng.randint(0, 2)],
            }.items():
                if rng.random() < 0.7:
                    data[key] = value
                    latest[key] = value
            payload_dropped = rng.randint(0, 3)
            dropped += payload_dropped
            response = post(
                telemetry_server,
                make_payload(rng.choice(instances), data, dropped=payload_dropped),
                session,
            )
            assert response.status_code == 200

    stats = get(telemetry_server, "/v1/stats").json()

    expected_keys = {
        **latest,
        **counters,
        "user_agents": [{"value": agent, "count": agents[agent]} for agent in sorted(agents)],
        "ports": [{"value": port, "count": ports[port]} for port in (443, 8080)],
    }
    assert stats == {
        "instances": 6,
        "payloads": 300,
        "dropped": dropped,
        "keys": expected_keys,
        "events": {},
    }


def test_stats_key_that_changes_kind_restarts_from_the_latest_value(
    telemetry_server: Server,
) -> None:
    instance_id = str(uuid.uuid4())
    datas: List[Dict[str, Any]] = [
        {"k": 5, "flag": True, "set": [{"value": "a", "count": 1}], "empty": 3},
        {"k": "text", "flag": True, "set": 7, "empty": []},
        {"k": 2, "set": [{"value": {"z": 1, "a": 2}, "count": 2}, {"value": "a", "count": 1}]},
        {"k": 3, "set": [{"value": {"a": 2, "z": 1}, "count": 3}]},
    ]
    for data in datas:
        assert post(telemetry_server, make_payload(instance_id, data)).status_code == 200

    keys = telemetry_server.stats()["keys"]

    assert keys == {
        "k": 5,  # 2 + 3: the string reset the total
        "flag": True,  # bools are values, not counters
        "set": [{"value": "a", "count": 1}, {"value": {"a": 2, "z": 1}, "count": 5}],
        "empty": [],  # an empty array is a plain value
    }


def test_instances_lists_newest_first_with_pagination(telemetry_server: Server) -> None:
    instance_id = str(uuid.uuid4())
    sent = [make_payload(instance_id, {"n": n}) for n in range(5)]
    for payload in sent:
        assert post(telemetry_server, payload).status_code == 200
    assert post(telemetry_server, make_payload(data={"other": 1})).status_code == 200

    pages = []
    offset: Optional[int] = 0
    while offset is not None:
        page = get(telemetry_server, f"/v1/instances/{instance_id}?limit=2&offset={offset}").json()
        assert page["instance_id"] == instance_id
        pages.append(page["payloads"])
        offset = page["next_offset"]

    assert [len(page) for page in pages] == [2, 2, 1]
    listed = [item for page in pages for item in page]
    assert [item["payload_id"] for item in listed] == [p["payload_id"] for p in reversed(sent)]
    assert listed[0]["data"] == {"n": 4}
    assert listed[0]["timestamp"] == "2026-11-23T10:00:00.123456Z"
    assert listed[0]["client"]["name"] == "telemetry-python"
    assert listed[0]["received_at"].endswith("Z")
    unknown = get(telemetry_server, f"/v1/instances/{uuid.uuid4()}").json()
    assert unknown["payloads"] == []
    assert unknown["next_offset"] is None


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=abc",
        "limit=1001",
        "limit=%D9%A3",
        "offset=-1",
        "offset=x",
        "offset=" + "9" * 30,
    ],
)
def test_instances_rejects_bad_paging(telemetry_server: Server, query: str) -> None:
    assert_error(get(telemetry_server, f"/v1/instances/{uuid.uuid4()}?{query}"), 400)
    assert_healthy(telemetry_server)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("POST", "/v1/update/not-a-uuid", 400, None),
        ("POST", "/v1/update/", 400, None),
        ("GET", "/v1/instances/1234", 400, None),
        ("GET", "/", 404, None),
        ("POST", "/v2/update/3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11", 404, None),
        ("POST", "/v1/update/3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11/x", 404, None),
        ("GET", "/v1/update/3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11", 405, "POST"),
        ("PUT", "/v1/update/3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11", 405, "POST"),
        ("POST", "/v1/stats", 405, "GET, HEAD"),
        ("DELETE", "/healthz", 405, "GET, HEAD"),
        ("POST", "/v1/instances/3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11", 405, "GET, HEAD"),
    ],
)
def test_routing_errors(
    telemetry_server: Server, method: str, path: str, status: int, allow: Optional[str]
) -> None:
    response = requests.request(
        method,
        f"{telemetry_server.url}{path}",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )

    assert_error(response, status)
    assert response.headers.get("Allow") == allow
    assert_healthy(telemetry_server)


def test_head_answers_like_get_without_a_body(telemetry_server: Server) -> None:
    response = requests.head(f"{telemetry_server.url}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/jsonx"},
        {"Content-Type": "application/json", "Content-Encoding": "br"},
    ],
)
def test_unsupported_media_type_is_415(telemetry_server: Server, headers: Dict[str, str]) -> None:
    payload = make_payload()
    response = post_raw(
        telemetry_server,
        json.dumps(payload).encode(),
        instance_id=payload["instance_id"],
        headers=headers,
    )

    assert_error(response, 415)
    assert_healthy(telemetry_server)
    assert telemetry_server.stats()["payloads"] == 0


def test_missing_content_type_is_415(telemetry_server: Server) -> None:
    payload = make_payload()
    response = requests.post(
        f"{telemetry_server.url}/v1/update/{payload['instance_id']}",
        data=json.dumps(payload).encode(),
        timeout=10,
    )

    assert_error(response, 415)
    assert_healthy(telemetry_server)


def test_body_over_one_mib_is_413(telemetry_server: Server) -> None:
    payload = make_payload(data={"pad": "x" * MIB})

    response = post(telemetry_server, payload)

    assert_error(response, 413)
    assert_healthy(telemetry_server)
    assert telemetry_server.stats()["payloads"] == 0


def test_compressed_body_over_one_mib_is_413(telemetry_server: Server) -> None:
    body = gzip.compress(random.Random(1).randbytes(MIB + 1024), compresslevel=1)
    assert len(body) > MIB

    response = post_raw(telemetry_server, body, headers={"Content-Encoding": "gzip"})

    assert_error(response, 413)
    assert_healthy(telemetry_server)


def _gzip_of_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MIB)
    chunks = [compressor.compress(zeros) for _ in range(size // MIB)]
    chunks.append(compressor.flush())
    return b"".join(chunks)


def test_gzip_bomb_is_stopped_while_decompressing(telemetry_server: Server) -> None:
    bomb = _gzip_of_zeros(50 * MIB)  # ~50 KB on the wire
    assert len(bomb) < 100_000

    tracemalloc.start()
    try:
        response = post_raw(telemetry_server, bomb, headers={"Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert_error(response, 413)
    assert "decompressed" in response.json()["error"]
    # The server runs in this process: all of its allocations are traced.
    assert peak < 16 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert_healthy(telemetry_server)


def test_decompressed_body_just_over_ten_mib_is_413(telemetry_server: Server) -> None:
    payload = make_payload(data={"pad": ""})
    payload["data"]["pad"] = "x" * (10 * MIB + 1 - len(json.dumps(payload)))
    body = json.dumps(payload).encode()
    assert len(body) == 10 * MIB + 1

    response = post_raw(
        telemetry_server,
        gzip.compress(body),
        instance_id=payload["instance_id"],
        headers={"Content-Encoding": "gzip"},
    )

    assert_error(response, 413)


@pytest.mark.parametrize(
    "body",
    [
        b"not gzip at all",
        gzip.compress(b'{"a": 1}')[:-6],  # truncated
        gzip.compress(b'{"a": 1}') + b"trailing junk",
    ],
)
def test_invalid_gzip_is_400(telemetry_server: Server, body: bytes) -> None:
    assert_error(post_raw(telemetry_server, body, headers={"Content-Encoding": "gzip"}), 400)
    assert_healthy(telemetry_server)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b'{"a": NaN}', b"\xff\xfe\x00", b"[" * 100_000, b'{"a": 1} x'],
)
def test_unparseable_json_is_400(telemetry_server: Server, body: bytes) -> None:
    assert_error(post_raw(telemetry_server, body), 400)
    assert_healthy(telemetry_server)


def _with(**changes: Any) -> Dict[str, Any]:
    payload = make_payload("3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11")
    for name, value in changes.items():
        if value is _DELETE:
            del payload[name]
        else:
            payload[name] = value
    return payload


_DELETE = object()
_MALFORMED = {
    "array": [1, 2],
    "string": "payload",
    "null": None,
    "missing instance_id": _with(instance_id=_DELETE),
    "instance_id not a string": _with(instance_id=7),
    "instance_id differs from path": _with(instance_id=str(uuid.uuid4())),
    "missing timestamp": _with(timestamp=_DELETE),
    "timestamp a number": _with(timestamp=1763892000),
    "timestamp without zone": _with(timestamp="2026-11-23T10:00:00"),
    "timestamp impossible date": _with(timestamp="2026-02-30T10:00:00Z"),
    "timestamp bad offset": _with(timestamp="2026-11-23T10:00:00+01:99"),
    "timestamp not a date": _with(timestamp="yesterday"),
    "payload_id uppercase": _with(payload_id="9B1D" + "0" * 28),
    "payload_id too short": _with(payload_id="9b1d"),
    "payload_id a number": _with(payload_id=12),
    "payload_id null": _with(payload_id=None),
    "data an array": _with(data=[1]),
    "data a string": _with(data="x"),
    "client a string": _with(client="telemetry-python"),
    "client.name a number": _with(client={"name": 1, "version": "1", "dropped": 0}),
    "client.dropped a string": _with(client={"name": "t", "version": "1", "dropped": "3"}),
    "client.dropped a bool": _with(client={"name": "t", "version": "1", "dropped": True}),
    "client.dropped negative": _with(client={"name": "t", "version": "1", "dropped": -1}),
    "data nested too deep": _with(data={"deep": json.loads("[" * 200 + "]" * 200)}),
}


@pytest.mark.parametrize("body", list(_MALFORMED.values()), ids=list(_MALFORMED))
def test_malformed_payload_is_400(telemetry_server: Server, body: Any) -> None:
    response = post_raw(
        telemetry_server,
        json.dumps(body).encode(),
        instance_id="3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11",
    )

    assert_error(response, 400)
    assert_healthy(telemetry_server)
    assert telemetry_server.stats()["payloads"] == 0


def _raw_http(server: Server, request: bytes) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        chunks: List[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_chunked_body_without_content_length_is_411(telemetry_server: Server) -> None:
    answer = _raw_http(
        telemetry_server,
        f"POST /v1/update/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
    )

    assert answer.startswith(b"HTTP/1.1 411 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert_healthy(telemetry_server)


def _update_request(instance_id: str, body: bytes, *, version: str = "HTTP/1.1") -> bytes:
    head = (
        f"POST /v1/update/{instance_id} {version}\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_keep_alive_serves_pipelined_requests_on_one_connection(telemetry_server: Server) -> None:
    first, second = make_payload(), make_payload()
    closing = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    answer = _raw_http(
        telemetry_server,
        _update_request(first["instance_id"], json.dumps(first).encode())
        + _update_request(second["instance_id"], json.dumps(second).encode())
        + closing,
    )

    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert answer.endswith(b'{"status":"ok"}')
    assert b"Connection: close" in answer
    assert telemetry_server.stats()["payloads"] == 2


def test_http_1_0_client_gets_its_answer_and_a_closed_connection(telemetry_server: Server) -> None:
    payload = make_payload()

    answer = _raw_http(
        telemetry_server,
        _update_request(payload["instance_id"], json.dumps(payload).encode(), version="HTTP/1.0"),
    )

    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert answer.endswith(b'{"next_update":3600000000000}')


def test_expect_100_continue_is_answered(telemetry_server: Server) -> None:
    payload = make_payload()
    body = json.dumps(payload).encode()
    head = _update_request(payload["instance_id"], b"").split(b"\r\n\r\n")[0]
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())

    with socket.create_connection((telemetry_server.host, telemetry_server.port), 10) as sock:
        sock.sendall(head + b"\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        answer = sock.recv(65536)

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("length", [b"-5", b"\xb2", b"1e3", b"9" * 40])
def test_bad_content_length_is_400(telemetry_server: Server, length: bytes) -> None:
    answer = _raw_http(
        telemetry_server,
        f"POST /v1/update/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: "
        + length
        + b"\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert_healthy(telemetry_server)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_PAYLOAD_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "instance_id": st.just("3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11") | _JSON,
        "timestamp": st.just("2026-11-23T10:00:00Z") | st.text(max_size=40) | _JSON,
        "payload_id": st.uuids().map(lambda u: u.hex) | _JSON,
        "data": st.dictionaries(st.text(max_size=8), _JSON, max_size=5) | _JSON,
        "client": st.fixed_dictionaries(
            {}, optional={"name": _JSON, "version": _JSON, "dropped": st.integers() | _JSON}
        )
        | _JSON,
        "expect_next": _JSON,
    },
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.binary(max_size=512)
    | _JSON.map(lambda value: json.dumps(value).encode())
    | _PAYLOAD_LIKE.map(lambda value: json.dumps(value).encode()),
    gzipped=st.booleans(),
)
def test_any_body_gets_a_json_answer_and_the_server_keeps_serving(
    telemetry_server: Server, body: bytes, gzipped: bool
) -> None:
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    response = post_raw(
        telemetry_server,
        gzip.compress(body) if gzipped else body,
        instance_id="3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11",
        headers=headers,
    )

    assert 200 <= response.status_code < 300 or 400 <= response.status_code < 500
    assert isinstance(response.json(), dict)
    assert_healthy(telemetry_server)


# -- policy -----------------------------------------------------------------------------------


def test_policy_fields_in_responses(telemetry_server: Server) -> None:
    telemetry_server.policy.update(
        next_update=1.5, disabled_keys=["tls", "http_user_agent"], enabled_keys=["goroutines"]
    )

    response = post(telemetry_server, make_payload())

    assert response.json() == {
        "next_update": 1_500_000_000,
        "disable_keys": ["http_user_agent", "tls"],
        "enable_keys": ["goroutines"],
    }


def test_policy_stop_for_all(telemetry_server: Server) -> None:
    telemetry_server.policy.update(stop=True)

    response = post(telemetry_server, make_payload())

    assert response.status_code == 200
    assert response.json()["stop"] is True
    assert telemetry_server.stats()["payloads"] == 1  # what was sent is still kept


def test_policy_stop_for_listed_instances_only(telemetry_server: Server) -> None:
    stopped, running = str(uuid.uuid4()), str(uuid.uuid4())
    telemetry_server.policy.update(stop=[stopped.upper()])

    assert post(telemetry_server, make_payload(stopped)).json()["stop"] is True
    assert "stop" not in post(telemetry_server, make_payload(running)).json()


def test_rate_limit_answers_429_with_retry_after(telemetry_server: Server) -> None:
    telemetry_server.policy.update(rate_limit={"payloads": 3, "window": 60})
    limited, other = str(uuid.uuid4()), str(uuid.uuid4())

    statuses = [post(telemetry_server, make_payload(limited)).status_code for _ in range(3)]
    refused = post(telemetry_server, make_payload(limited))

    assert statuses == [200, 200, 200]
    assert_error(refused, 429)
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert refused.json()["next_update"] == retry_after * NS
    assert post(telemetry_server, make_payload(other)).status_code == 200
    assert telemetry_server.stats()["payloads"] == 4  # the refused one was not stored
    telemetry_server.policy.update(rate_limit=None)
    assert post(telemetry_server, make_payload(limited)).status_code == 200


def test_rate_limit_window_restarts(backend_db: str) -> None:
    clock = [1000.0]
    store = open_store(backend_db)
    try:
        assert store.check_rate("a", 2, 10.0, clock[0]) is None
        assert store.check_rate("a", 2, 10.0, clock[0] + 1) is None
        assert store.check_rate("a", 2, 10.0, clock[0] + 4) == pytest.approx(6.0)
        assert store.check_rate("b", 2, 10.0, clock[0] + 4) is None
        assert store.check_rate("a", 2, 10.0, clock[0] + 10) is None
    finally:
        store.close()


def _bump_mtime(path: Path) -> None:
    # Rewrites can land within the file system's timestamp granularity: move mtime on
    # explicitly instead of sleeping.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + NS))


def test_policy_file_is_reloaded_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"next_update": 10}))
    with serve(policy=Policy(policy_file)) as server:
        assert post(server, make_payload()).json() == {"next_update": 10 * NS}

        policy_file.write_text(json.dumps({"next_update": 20}))  # same size
        _bump_mtime(policy_file)
        assert post(server, make_payload()).json() == {"next_update": 20 * NS}

        policy_file.write_text("{not json")
        _bump_mtime(policy_file)
        with caplog.at_level(logging.ERROR, logger="server_stub"):
            assert post(server, make_payload()).json() == {"next_update": 20 * NS}
        assert "keeping previous policy" in caplog.text

        policy_file.write_text(json.dumps({"disabled_keys": ["tls"], "stop": True}))
        _bump_mtime(policy_file)
        assert post(server, make_payload()).json() == {
            "next_update": 3600 * NS,
            "disable_keys": ["tls"],
            "stop": True,
        }


@pytest.mark.parametrize(
    "fields",
    [
        {"next_update": -1},
        {"next_update": "60"},
        {"disabled_keys": "tls"},
        {"stop": "yes"},
        {"rate_limit": {"payloads": 0, "window": 60}},
        {"rate_limit": {"payloads": 3}},
        {"disable_keys": ["tls"]},
    ],
)
def test_invalid_policy_is_refused(fields: Dict[str, Any], tmp_path: Path) -> None:
    policy = Policy(next_update=5)
    with pytest.raises(ValueError, match=r"\S"):
        policy.update(**fields)
    assert policy.current().next_update == 5
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"\S"):
        Policy(policy_file)


# -- concurrency and persistence --------------------------------------------------------------


def test_concurrent_clients_give_exact_totals(telemetry_server: Server) -> None:
    threads, per_thread = 8, 40

    def client(worker: int) -> None:
        instance_id = str(uuid.uuid4())
        with requests.Session() as session:
            for n in range(per_thread):
                data = {
                    "hits": n,
                    "workers": [{"value": worker, "count": 1}],
                    "shared": [{"value": "all", "count": 2}],
                }
                response = post(
                    telemetry_server, make_payload(instance_id, data, dropped=1), session
                )
                assert response.status_code == 200

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(client, worker) for worker in range(threads)]:
            future.result()

    stats = get(telemetry_server, "/v1/stats").json()
    assert stats == {
        "instances": threads,
        "payloads": threads * per_thread,
        "dropped": threads * per_thread,
        "keys": {
            "hits": threads * sum(range(per_thread)),
            "shared": [{"value": "all", "count": 2 * threads * per_thread}],
            "workers": [{"value": worker, "count": per_thread} for worker in range(threads)],
        },
        "events": {},
    }


def test_file_database_survives_a_restart(tmp_path: Path, backend_db: str) -> None:
    db = str(tmp_path / "telemetry.db") if backend_db == ":memory:" else backend_db
    payload = make_payload(data={"n": 7})
    with serve(db=db) as server:
        assert post(server, payload).status_code == 200
    with serve(db=db) as server:
        assert post(server, payload).status_code == 200  # still a duplicate
        assert server.stats() == {
            "instances": 1, "payloads": 1, "dropped": 0, "keys": {"n": 7}, "events": {},
        }
    assert (tmp_path / "telemetry.db").exists() == (db != backend_db)


def test_create_app_is_a_plain_wsgi_application(tmp_path: Path) -> None:
    app = create_app(db=str(tmp_path / "wsgi.db"))
    environ: Dict[str, Any] = {"PATH_INFO": "/healthz"}
    setup_testing_defaults(environ)
    answers: List[str] = []

    def start_response(
        status: str, headers: List[Tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        answers.append(status)
        return lambda data: None

    body = b"".join(app(environ, start_response))

    assert answers == ["200 OK"]
    assert json.loads(body) == {"status": "ok"}
    app.store.close()


# -- the harness ------------------------------------------------------------------------------


def test_scripted_status_is_answered_and_not_stored(telemetry_server: Server) -> None:
    telemetry_server.script(503, {"error": "busy"}, headers={"Retry-After": "7"})
    payload = make_payload()

    response = post(telemetry_server, payload)

    assert response.status_code == 503
    assert response.json() == {"error": "busy"}
    assert response.headers["Retry-After"] == "7"
    assert telemetry_server.stats()["payloads"] == 0
    assert telemetry_server.payloads == [payload]
    assert telemetry_server.requests[-1].scripted
    # The script is used up: the retry is processed normally.
    assert post(telemetry_server, payload).status_code == 200
    assert telemetry_server.stats()["payloads"] == 1


def test_scripted_status_with_store_stores(telemetry_server: Server) -> None:
    telemetry_server.script(500, store=True)

    response = post(telemetry_server, make_payload())

    assert response.status_code == 500
    assert response.content == b""
    assert telemetry_server.stats()["payloads"] == 1


def test_scripted_responses_are_used_in_order(telemetry_server: Server) -> None:
    telemetry_server.script(429, headers={"Retry-After": "1"}, times=2)
    telemetry_server.script(200, b"not json")
    telemetry_server.script(body={"next_update": 5 * NS, "stop": True})
    assert telemetry_server.scripts_pending == 4

    answers = [post(telemetry_server, make_payload()) for _ in range(5)]

    assert [answer.status_code for answer in answers] == [429, 429, 200, 200, 200]
    assert answers[2].content == b"not json"
    assert answers[3].json() == {"next_update": 5 * NS, "stop": True}
    assert answers[4].json() == {"next_update": 3600 * NS}
    assert telemetry_server.stats()["payloads"] == 2  # the normally processed ones
    # Only /v1/update requests use the script.
    telemetry_server.script(500)
    assert_healthy(telemetry_server)
    assert telemetry_server.scripts_pending == 1


def test_scripted_drop_closes_without_answer_or_storing(telemetry_server: Server) -> None:
    telemetry_server.script(drop=True)
    payload = make_payload()

    with pytest.raises(requests.ConnectionError):
        post(telemetry_server, payload)

    assert telemetry_server.stats()["payloads"] == 0
    assert telemetry_server.requests[-1].dropped
    assert telemetry_server.payloads == [payload]
    assert_healthy(telemetry_server)


def test_scripted_drop_after_store_stores_then_drops(telemetry_server: Server) -> None:
    telemetry_server.script(drop_after_store=True)
    payload = make_payload(data={"n": 1})

    with pytest.raises(requests.ConnectionError):
        post(telemetry_server, payload)
    retry = post(telemetry_server, payload)

    assert retry.status_code == 200
    assert telemetry_server.stats()["payloads"] == 1
    assert [request.status for request in telemetry_server.requests] == [None, 200]


def test_scripted_delay_answers_late(telemetry_server: Server) -> None:
    telemetry_server.script(delay=0.2)

    started = time.monotonic()
    response = post(telemetry_server, make_payload())

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_scripted_delay_times_out_the_client_and_close_stays_prompt() -> None:
    server = serve()
    try:
        server.script(delay=60)
        with pytest.raises(requests.Timeout):
            requests.post(
                f"{server.url}/v1/update/{uuid.uuid4()}",
                json=make_payload(),
                timeout=(5, 0.2),
            )
    finally:
        started = time.monotonic()
        server.close()
    assert time.monotonic() - started < 2
    server.close()  # twice is fine


def test_close_while_a_request_waits_in_a_scripted_delay() -> None:
    server = serve()
    errors: List[BaseException] = []

    def client() -> None:
        try:
            post(server, make_payload())
        except requests.ConnectionError as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    with server:
        server.script(delay=60)
        thread.start()
        assert server.wait_for(lambda: server.scripts_pending == 0)
        started = time.monotonic()
    assert time.monotonic() - started < 2
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert server.requests[-1].dropped


def test_wait_for_requests(telemetry_server: Server) -> None:
    assert not telemetry_server.wait_for_requests(1, timeout=0.01)
    assert_healthy(telemetry_server)
    assert not telemetry_server.wait_for_requests(1, timeout=0.01)
    assert telemetry_server.wait_for_requests(1, timeout=0.01, path_prefix="")
    thread = threading.Thread(target=post, args=(telemetry_server, make_payload()))
    thread.start()
    assert telemetry_server.wait_for_requests(1)
    thread.join()


def test_script_rejects_contradictions(telemetry_server: Server) -> None:
    with pytest.raises(ValueError, match="exclude"):
        telemetry_server.script(drop=True, drop_after_store=True)
    with pytest.raises(ValueError, match="status"):
        telemetry_server.script(700)
    with pytest.raises(ValueError, match="status"):
        telemetry_server.script(100)
    with pytest.raises(TypeError):
        telemetry_server.script(200, {"when": object()})
    with pytest.raises(ValueError, match="hop-by-hop"):
        telemetry_server.script(200, headers={"Connection": "close"})
    assert telemetry_server.scripts_pending == 0


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    command = [sys.executable, "-m", "server_stub", "--port", "0", "--db", str(tmp_path / "t.db")]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("server_stub listening on http://127.0.0.1:"), line
            yield line.split()[-1], process
        finally:
            if process.poll() is None:
                process.kill()


def test_command_line_server(cli_server: tuple[str, subprocess.Popen[str]]) -> None:
    url, process = cli_server
    payload = make_payload(data={"n": 1})

    response = requests.post(f"{url}/v1/update/{payload['instance_id']}", json=payload, timeout=10)
    health = requests.get(f"{url}/healthz", timeout=10)

    assert response.status_code == 200
    assert response.json() == {"next_update": 3600 * NS}
    assert health.json() == {"status": "ok"}
    process.terminate()
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert f"POST /v1/update/{payload['instance_id']}" in stderr
    assert "GET /healthz" in stderr


def test_command_line_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text('{"stop": "yes"}')

    result = subprocess.run(
        [sys.executable, "-m", "server_stub", "--port", "0", "--policy", str(policy_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert "bad policy file" in result.stderr
    assert result.stdout == ""
