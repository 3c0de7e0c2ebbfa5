"""The app refuses what it must, each with a JSON ``{"error": ...}`` and the right status,
and keeps serving: media types, sizes, gzip, JSON, payload shape, lengths, fuzzed bodies.

Every test that uses ``backend_server`` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc
import uuid
import zlib
from typing import Any, Dict

import pytest
import requests
from _net import raw_exchange
from _server_api import MIB, assert_error, assert_healthy, make_payload, post, post_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_stub import Server


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/jsonx"},
        {"Content-Type": "application/json", "Content-Encoding": "br"},
    ],
)
def test_unsupported_media_type_is_415(backend_server: Server, headers: Dict[str, str]) -> None:
    payload = make_payload()
    response = post_raw(
        backend_server,
        json.dumps(payload).encode(),
        instance_id=payload["instance_id"],
        headers=headers,
    )

    assert_error(response, 415)
    assert_healthy(backend_server)
    assert backend_server.stats()["payloads"] == 0


def test_missing_content_type_is_415(backend_server: Server) -> None:
    payload = make_payload()
    response = requests.post(
        f"{backend_server.url}/v1/update/{payload['instance_id']}",
        data=json.dumps(payload).encode(),
        timeout=10,
    )

    assert_error(response, 415)
    assert_healthy(backend_server)


def test_body_over_one_mib_is_413(backend_server: Server) -> None:
    payload = make_payload(data={"pad": "x" * MIB})

    response = post(backend_server, payload)

    assert_error(response, 413)
    assert_healthy(backend_server)
    assert backend_server.stats()["payloads"] == 0


def test_compressed_body_over_one_mib_is_413(backend_server: Server) -> None:
    body = gzip.compress(random.Random(1).randbytes(MIB + 1024), compresslevel=1)
    assert len(body) > MIB

    response = post_raw(backend_server, body, headers={"Content-Encoding": "gzip"})

    assert_error(response, 413)
    assert_healthy(backend_server)


def _gzip_of_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MIB)
    chunks = [compressor.compress(zeros) for _ in range(size // MIB)]
    chunks.append(compressor.flush())
    return b"".join(chunks)


def test_gzip_bomb_is_stopped_while_decompressing(backend_server: Server) -> None:
    bomb = _gzip_of_zeros(50 * MIB)  # ~50 KB on the wire
    assert len(bomb) < 100_000

    tracemalloc.start()
    try:
        response = post_raw(backend_server, bomb, headers={"Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert_error(response, 413)
    assert "decompressed" in response.json()["error"]
    # The server runs in this process: all of its allocations are traced.
    assert peak < 16 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert_healthy(backend_server)


def test_decompressed_body_just_over_ten_mib_is_413(backend_server: Server) -> None:
    payload = make_payload(data={"pad": ""})
    payload["data"]["pad"] = "x" * (10 * MIB + 1 - len(json.dumps(payload)))
    body = json.dumps(payload).encode()
    assert len(body) == 10 * MIB + 1

    response = post_raw(
        backend_server,
        gzip.compress(body),
        instance_id=payload["instance_id"],
        headers={"Content-Encoding": "gzip"},
    )

    assert_error(response, 413)


@pytest.mark.parametrize(
    "body",
    [
        b"not gzip at all",
        gzip.compress(b'{"a": 1}', mtime=0)[:-6],  # truncated
        gzip.compress(b'{"a": 1}', mtime=0) + b"trailing junk",
    ],
)
def test_invalid_gzip_is_400(backend_server: Server, body: bytes) -> None:
    assert_error(post_raw(backend_server, body, headers={"Content-Encoding": "gzip"}), 400)
    assert_healthy(backend_server)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b'{"a": NaN}', b"\xff\xfe\x00", b"[" * 100_000, b'{"a": 1} x'],
)
def test_unparseable_json_is_400(backend_server: Server, body: bytes) -> None:
    assert_error(post_raw(backend_server, body), 400)
    assert_healthy(backend_server)


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
    "timestamp impossible date, as the client writes it": _with(
        timestamp="2026-02-30T10:00:00.000000Z"
    ),
    "timestamp hour 24": _with(timestamp="2026-11-23T24:00:00.000000Z"),
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
def test_malformed_payload_is_400(backend_server: Server, body: Any) -> None:
    response = post_raw(
        backend_server,
        json.dumps(body).encode(),
        instance_id="3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11",
    )

    assert_error(response, 400)
    assert_healthy(backend_server)
    assert backend_server.stats()["payloads"] == 0


def test_chunked_body_without_content_length_is_411(backend_server: Server) -> None:
    answer = raw_exchange(
        backend_server,
        f"POST /v1/update/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
    )

    assert answer.startswith(b"HTTP/1.1 411 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert_healthy(backend_server)


@pytest.mark.parametrize("length", [b"-5", b"\xb2", b"1e3", b"9" * 40])
def test_bad_content_length_is_400(backend_server: Server, length: bytes) -> None:
    answer = raw_exchange(
        backend_server,
        f"POST /v1/update/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: "
        + length
        + b"\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert_healthy(backend_server)


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
    backend_server: Server, body: bytes, gzipped: bool
) -> None:
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    response = post_raw(
        backend_server,
        gzip.compress(body) if gzipped else body,
        instance_id="3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11",
        headers=headers,
    )

    assert 200 <= response.status_code < 300 or 400 <= response.status_code < 500
    assert isinstance(response.json(), dict)
    assert_healthy(backend_server)


def test_received_at_is_the_arrival_rounded_as_datetime_rounds_it() -> None:
    from datetime import datetime, timezone

    from server_stub import create_app

    app = create_app(db=":memory:")
    try:
        for now in (1_764_000_000.1234565, 1_764_000_000.9999996, 1_764_000_001.0, 0.0000004,
                    1_764_000_000.5, -1.25, 4_102_444_799.999999):
            expected = datetime.fromtimestamp(now, timezone.utc).replace(tzinfo=None)
            assert app._received_at(now) == expected.isoformat("T", "microseconds") + "Z"
    finally:
        app.store.close()
