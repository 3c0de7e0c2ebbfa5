"""The WSGI app over real loopback HTTP: endpoints, their answers, routing.

Every test that uses ``backend_server`` runs twice: on in-memory SQLite and on
a fresh schema of the session's real PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from wsgiref.util import setup_testing_defaults

import pytest
import requests
from _server_api import (
    MIB,
    NS,
    REPO,
    assert_error,
    assert_healthy,
    get,
    make_payload,
    post,
    post_raw,
)

from server_stub import Server, create_app

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


def test_healthz(backend_server: Server) -> None:
    assert_healthy(backend_server)


def test_update_is_stored_and_answered_with_next_update_in_nanoseconds(
    backend_server: Server,
) -> None:
    payload = make_payload(data={"requests": 3, "version": "1.4.2"}, dropped=2)

    response = post(backend_server, payload)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"next_update": 3600 * NS}
    stats = get(backend_server, "/v1/stats?since=2000-01-01").json()
    assert stats == {
        "instances": 1,
        "payloads": 1,
        "dropped": 2,
        "keys": {"requests": 3, "version": "1.4.2"},
        "events": {},
    }
    assert backend_server.payloads == [payload]
    [stored] = backend_server.stored_payloads()
    assert stored["payload_id"] == payload["payload_id"]
    assert stored["data"] == payload["data"]


def test_content_type_parameters_and_gzip_are_accepted(backend_server: Server) -> None:
    payload = make_payload(data={"big": ["x" * 1000] * 5})
    body = gzip.compress(json.dumps(payload).encode())

    response = post_raw(
        backend_server,
        body,
        instance_id=payload["instance_id"],
        headers={"Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip"},
    )

    assert response.status_code == 200
    [request] = backend_server.requests
    assert request.body == body
    assert request.decoded_body == json.dumps(payload).encode()
    assert request.json == payload
    assert request.headers["Content-Encoding"] == "gzip"
    assert backend_server.stats()["keys"] == {"big": ["x" * 1000] * 5}


def test_multi_member_gzip_is_accepted(backend_server: Server) -> None:
    payload = make_payload(data={"n": 1})
    encoded = json.dumps(payload).encode()
    body = gzip.compress(encoded[:10]) + gzip.compress(encoded[10:])

    response = post_raw(
        backend_server,
        body,
        instance_id=payload["instance_id"],
        headers={"Content-Encoding": "gzip"},
    )

    assert response.status_code == 200


def test_body_of_exactly_one_mib_is_accepted(backend_server: Server) -> None:
    # Strings of at most 1,024 characters, as a client sends them.
    payload = make_payload(data={"pad": ["x" * 1024] * 1019, "rest": ""})
    payload["data"]["rest"] = "x" * (MIB - len(json.dumps(payload).encode()))
    body = json.dumps(payload).encode()
    assert len(body) == MIB

    response = post_raw(backend_server, body, instance_id=payload["instance_id"])

    assert response.status_code == 200


def test_caddy_go_client_payload_is_accepted(backend_server: Server) -> None:
    example = REPO.parent / "shared" / "examples" / "caddy_go_client_payload.json"
    if example.exists():  # the copy above is the file, byte for byte
        assert example.read_bytes().strip() == CADDY_GO_CLIENT_BODY
    instance_id = "595a3d39-692a-4e97-9262-b7c303698871"

    first = post_raw(backend_server, CADDY_GO_CLIENT_BODY, instance_id=instance_id)
    second = post_raw(backend_server, CADDY_GO_CLIENT_BODY, instance_id=instance_id)

    for response in (first, second):
        assert response.status_code == 200
        # The Go client refuses an answer without this exact content type.
        assert response.headers["Content-Type"] == "application/json"
        assert response.json() == {"next_update": 3600 * NS}
    # No payload_id: the server assigns one each time, so there is no dedup.
    stored = get(backend_server, f"/v1/instances/{instance_id}").json()["payloads"]
    assert len(stored) == 2
    assert all(len(item["payload_id"]) == 32 for item in stored)
    assert stored[0]["payload_id"] != stored[1]["payload_id"]
    assert stored[0]["timestamp"] == "2026-11-23T10:37:53.527539808Z"
    assert stored[0]["client"] is None
    stats = backend_server.stats()
    assert stats["keys"]["interop_counter"] == 32
    assert stats["keys"]["interop_set_counts"] == [
        {"value": "alpha", "count": 6},
        {"value": "beta", "count": 2},
        {"value": "gamma", "count": 4},
    ]
    assert stats["keys"]["interop_set_string"] == "second"


def test_payload_without_data_and_with_numeric_offset_is_accepted(
    backend_server: Server,
) -> None:
    instance_id = str(uuid.uuid4())
    body = {"instance_id": instance_id, "timestamp": "2026-11-23T11:00:00.5+01:00"}

    response = post_raw(backend_server, json.dumps(body).encode(), instance_id=instance_id)

    assert response.status_code == 200
    assert backend_server.stats()["payloads"] == 1


def test_uppercase_instance_id_is_stored_in_canonical_form(backend_server: Server) -> None:
    instance_id = str(uuid.uuid4())
    payload = make_payload(instance_id.upper())

    assert post(backend_server, payload).status_code == 200

    listing = get(backend_server, f"/v1/instances/{instance_id}").json()
    assert listing["instance_id"] == instance_id
    assert len(listing["payloads"]) == 1


def test_repeated_payload_id_is_acknowledged_alike_and_stored_once(
    backend_server: Server,
) -> None:
    backend_server.policy.update(next_update=90, disabled_keys=["tls"])
    payload = make_payload(data={"requests": 5, "ua": [{"value": "curl", "count": 2}]})

    first = post(backend_server, payload)
    second = post(backend_server, payload)

    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.json() == {"next_update": 90 * NS, "disable_keys": ["tls"]}
    stats = backend_server.stats()
    assert stats["payloads"] == 1
    assert stats["keys"] == {"requests": 5, "ua": [{"value": "curl", "count": 2}]}
    assert len(backend_server.payloads) == 2  # both arrivals are recorded


def test_instances_lists_newest_first_with_pagination(backend_server: Server) -> None:
    instance_id = str(uuid.uuid4())
    sent = [make_payload(instance_id, {"n": n}) for n in range(5)]
    for payload in sent:
        assert post(backend_server, payload).status_code == 200
    assert post(backend_server, make_payload(data={"other": 1})).status_code == 200

    pages = []
    offset: Optional[int] = 0
    while offset is not None:
        page = get(backend_server, f"/v1/instances/{instance_id}?limit=2&offset={offset}").json()
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
    unknown = get(backend_server, f"/v1/instances/{uuid.uuid4()}").json()
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
def test_instances_rejects_bad_paging(backend_server: Server, query: str) -> None:
    assert_error(get(backend_server, f"/v1/instances/{uuid.uuid4()}?{query}"), 400)
    assert_healthy(backend_server)


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
    backend_server: Server, method: str, path: str, status: int, allow: Optional[str]
) -> None:
    response = requests.request(
        method,
        f"{backend_server.url}{path}",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )

    assert_error(response, status)
    assert response.headers.get("Allow") == allow
    assert_healthy(backend_server)


def test_head_answers_like_get_without_a_body(backend_server: Server) -> None:
    response = requests.head(f"{backend_server.url}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.content == b""


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
