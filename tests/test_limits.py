"""The server against hostile clients: what one request, one address and all clients may cost.

Every test that takes ``backend_db`` runs on in-memory SQLite and on a fresh
schema of the session's PostgreSQL. Clients post from 127.0.0.1 or, where an
address matters, from another loopback address (127.0.0.2).
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import logging
import sys
import tracemalloc
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests

import server_stub._app
from server_stub import PayloadRecord, Server, open_store, serve
from server_stub._app import HTTPError, RequestBody
from server_stub._limits import (
    Admission,
    InFlightBudget,
    Limits,
    address_key,
    check_document,
    count_values,
    saturate,
    value_bound,
)

MIB = 1 << 20
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def make_payload(
    data: Optional[Dict[str, Any]] = None,
    *,
    instance_id: Optional[str] = None,
    dropped: int = 0,
) -> Dict[str, Any]:
    return {
        "instance_id": instance_id or str(uuid.uuid4()),
        "timestamp": "2026-11-23T10:00:00.123456Z",
        "payload_id": uuid.uuid4().hex,
        "data": data if data is not None else {},
        "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": dropped},
    }


def post_body(
    server: Server,
    body: bytes,
    instance_id: str,
    *,
    source: str = "127.0.0.1",
    headers: Optional[Dict[str, str]] = None,
) -> Tuple[int, Dict[str, str], Any]:
    """POST ``body`` from the loopback address ``source``; status, headers, parsed body."""
    connection = http.client.HTTPConnection(
        server.host, server.port, timeout=10, source_address=(source, 0)
    )
    try:
        connection.request(
            "POST",
            f"/v1/update/{instance_id}",
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = connection.getresponse()
        answer = response.read()
        return response.status, dict(response.getheaders()), json.loads(answer) if answer else None
    finally:
        connection.close()


def post(
    server: Server, payload: Dict[str, Any], *, source: str = "127.0.0.1"
) -> Tuple[int, Dict[str, str], Any]:
    return post_body(server, json.dumps(payload).encode(), payload["instance_id"], source=source)


def get_json(server: Server, path: str) -> Tuple[int, Any]:
    response = requests.get(f"{server.url}{path}", timeout=10)
    return response.status_code, response.json()


# -- every stored value can be aggregated and served ------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"n": 2**63},
        {"n": -(2**63) - 1},
        {"n": 10**4200},
        {"nested": {"deep": [1, 2, 2**64]}},
        {"set": [{"value": "a", "count": 2**63}]},
        {"f": float("inf")},
        {"f": [1.0, float("nan")]},
    ],
)
def test_numbers_a_store_cannot_aggregate_are_400(backend_server: Server, data: Any) -> None:
    payload = make_payload(data)
    # json.dumps writes inf/nan as Infinity/NaN; a huge exponent is what a client would send.
    body = json.dumps(payload).replace("Infinity", "1e999").replace("NaN", "-1e999").encode()

    status, _, answer = post_body(backend_server, body, payload["instance_id"])

    assert status == 400, answer
    assert "64 bits" in answer["error"] or "finite" in answer["error"]
    assert backend_server.stored_payloads() == []


def test_counters_and_dropped_at_the_int64_bound_saturate(backend_server: Server) -> None:
    for _ in range(2):
        payload = make_payload(
            {"c": INT64_MAX, "low": INT64_MIN, "set": [{"value": "a", "count": INT64_MAX}]},
            dropped=INT64_MAX,
        )
        assert post(backend_server, payload)[0] == 200

    status, stats = get_json(backend_server, "/v1/stats")

    assert status == 200
    assert stats["dropped"] == INT64_MAX
    assert stats["keys"] == {
        "c": INT64_MAX,
        "low": INT64_MIN,
        "set": [{"value": "a", "count": INT64_MAX}],
    }


def test_stats_survive_values_stored_before_validation(backend_db: str, tmp_path: Any) -> None:
    """Rows an older server stored unchecked (huge ints, int64 dropped) still aggregate,
    and keep doing so after a restart."""
    db = str(tmp_path / "old.db") if backend_db == ":memory:" else backend_db
    store = open_store(db)
    try:
        for index in range(11):
            store.add(
                PayloadRecord(
                    payload_id=uuid.uuid4().hex,
                    instance_id="i-1",
                    timestamp="2026-11-23T10:00:00Z",
                    received_at="2026-11-23T10:00:01.000000Z",
                    data={"huge": 10**4298 + index, "set": [{"value": 1, "count": 10**4000}]},
                    client={"dropped": INT64_MAX},
                )
            )
    finally:
        store.close()

    with serve(port=0, db=db) as server:  # a new process would open the same database
        status, stats = get_json(server, "/v1/stats")

    assert status == 200
    assert stats["dropped"] == INT64_MAX
    assert stats["keys"] == {"huge": INT64_MAX, "set": [{"value": 1, "count": INT64_MAX}]}


def test_saturate_clamps_to_signed_64_bits() -> None:
    assert saturate(2**70) == INT64_MAX
    assert saturate(-(2**70)) == INT64_MIN
    assert saturate(-5) == -5


# -- what one payload may hold -----------------------------------------------------------------


def test_a_million_empty_objects_gzipped_are_refused_before_parsing(
    backend_server: Server,
) -> None:
    instance_id = str(uuid.uuid4())
    head, tail = json.dumps(make_payload({"x": []}, instance_id=instance_id)).split("[]")
    document = head.encode() + b"[" + b",".join([b"{}"] * 3_000_000) + b"]" + tail.encode()
    bomb = gzip.compress(document, 9)
    assert len(bomb) < 100_000 and len(document) < 10 * MIB

    tracemalloc.start()
    try:
        status, _, answer = post_body(
            backend_server, bomb, instance_id, headers={"Content-Encoding": "gzip"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert status == 413, answer
    assert "JSON values" in answer["error"]
    # The server runs in this process; parsing it would have cost ~200 MiB.
    assert peak < 64 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert backend_server.stored_payloads() == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"s": "x" * 1025}, "longer than 1024"),
        ({"list": ["ok", "x" * 5000]}, "longer than 1024"),
        ({"k" * 257: 1}, "longer than 256"),
        ({"m": {"n" * (16 * 1024 + 1): 1}}, "member name"),
    ],
)
def test_strings_and_keys_longer_than_a_client_sends_are_400(
    backend_server: Server, data: Dict[str, Any], problem: str
) -> None:
    payload = make_payload(data)

    status, _, answer = post(backend_server, payload)

    assert status == 400
    assert problem in answer["error"]


def test_the_longest_strings_and_keys_a_client_sends_are_stored(backend_server: Server) -> None:
    data = {"k" * 256: "x" * 1024, "m": {"n" * 16000: ["y" * 1024]}}
    assert post(backend_server, make_payload(data))[0] == 200
    [stored] = backend_server.stored_payloads()
    assert stored["data"] == data


def test_count_values_counts_every_json_value_outside_strings() -> None:
    documents = [
        "[]",
        '{"a": [1, 2, {}], "b": {"c": null}}',
        '["a,b", "[{", {"x\\"]": [[], [ ]]}]',
        '{"set": [{"value": "v", "count": 3}]}',
    ]
    for document in documents:

        def values(value: Any) -> int:
            children = value.values() if isinstance(value, dict) else value
            if isinstance(value, (dict, list)):
                return 1 + sum(values(child) for child in children)
            return 1

        assert count_values(document.encode()) == values(json.loads(document)), document


def test_check_document_finds_a_problem_anywhere_in_wide_and_deep_documents() -> None:
    limits = Limits(max_depth=8)
    wide: List[Any] = [{"a": [1, "s"]}] * 50_000
    assert check_document({"data": {"list": wide}}, limits) is None
    for bad, words in [
        (2**63, "list: integer outside signed 64 bits"),
        (float("inf"), "list: number is not finite"),
        ("x" * 1025, "list: string longer than 1024"),
        ({"n" * (16 * 1024 + 1): 1}, "member name longer"),
        ([[[[[[[[]]]]]]]], "nested deeper than 8 levels"),
    ]:
        document = {"data": {"list": [*wide, {"a": [1, bad]}], "n": 1}}
        problem = check_document(document, limits)
        assert problem is not None and words in problem, (bad, problem)


def test_check_document_walks_documents_nested_deeper_than_python_recurses() -> None:
    depth = sys.getrecursionlimit() + 100
    limits = Limits(max_depth=depth + 10)
    fine: Any = 1
    bad: Any = 2**63
    for _ in range(depth):
        fine, bad = [fine], [bad]
    assert check_document({"data": {"deep": fine}}, limits) is None
    problem = check_document({"data": {"deep": bad}}, limits)
    assert problem is not None and "deep: integer outside signed 64 bits" in problem


def test_a_big_gzip_body_is_measured_without_being_kept() -> None:
    values = [{"a": n} for n in range(200_000)]
    document = json.dumps({"data": {"x": values}}).encode()
    body = gzip.compress(document)
    environ = {"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "HTTP_CONTENT_ENCODING": "gzip"}
    request = RequestBody(environ)
    assert request.measure(100_000) == (len(document), value_bound(document))
    assert request.decoded is None and request.raw == body
    small = gzip.compress(b'{"data": {"x": [1, 2]}}')
    environ = {"wsgi.input": io.BytesIO(small), "CONTENT_LENGTH": str(len(small)),
               "HTTP_CONTENT_ENCODING": "gzip"}
    request = RequestBody(environ)
    assert request.measure(100_000) == (23, value_bound(b'{"data": {"x": [1, 2]}}'))
    assert request.decoded == b'{"data": {"x": [1, 2]}}'


def test_check_document_names_the_data_key() -> None:
    problem = check_document({"data": {"bytes_sent": 2**64}}, Limits())
    assert problem is not None and "bytes_sent" in problem


# -- pages by size, storage budget --------------------------------------------------------------


def test_instance_pages_end_at_the_response_size_limit(backend_db: str) -> None:
    instance_id = str(uuid.uuid4())
    limits = Limits(per_address=0, total=0, max_response_bytes=250_000)
    with serve(port=0, db=backend_db, limits=limits) as server:
        sent = []
        for index in range(5):
            payload = make_payload({"n": index, "pad": ["x" * 1000] * 100}, instance_id=instance_id)
            sent.append(payload["payload_id"])
            assert post(server, payload)[0] == 200

        pages: List[Dict[str, Any]] = []
        offset: Optional[int] = 0
        while offset is not None and len(pages) < 10:
            response = requests.get(
                f"{server.url}/v1/instances/{instance_id}?limit=1000&offset={offset}", timeout=10
            )
            assert response.status_code == 200
            assert len(response.content) < 2 * limits.max_response_bytes
            pages.append(response.json())
            offset = pages[-1]["next_offset"]

    assert [len(page["payloads"]) for page in pages] == [2, 2, 1]
    served = [payload for page in pages for payload in page["payloads"]]
    assert [payload["payload_id"] for payload in served] == sent[::-1]
    assert served[0]["data"] == {"n": 4, "pad": ["x" * 1000] * 100}


def test_a_page_holds_at_least_one_payload(backend_server: Server) -> None:
    payload = make_payload({"pad": ["x" * 1000] * 10})
    assert post(backend_server, payload)[0] == 200
    backend_server.app.limits = Limits(max_response_bytes=1)

    status, page = get_json(backend_server, f"/v1/instances/{payload['instance_id']}")

    assert status == 200
    assert [stored["payload_id"] for stored in page["payloads"]] == [payload["payload_id"]]
    assert page["next_offset"] is None


def test_storage_budget_answers_507_and_logs(
    backend_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(backend_db)
    try:
        budget = store.storage_bytes() + 100_000
    finally:
        store.close()
    limits = Limits(per_address=0, total=0, max_storage_bytes=budget)
    with serve(port=0, db=backend_db, limits=limits) as server:
        big = make_payload({"pad": [uuid.uuid4().hex * 30 for _ in range(200)]})  # ~200 KB
        assert post(server, big)[0] == 200

        with caplog.at_level(logging.ERROR, logger="server_stub"):
            statuses = [post(server, make_payload({"n": n}))[0] for n in range(3)]

    assert statuses == [507, 507, 507]
    budget_lines = [record for record in caplog.records if "storage budget" in record.message]
    assert len(budget_lines) == 1  # said once, not once per refused payload
    assert len(server.requests) == 4


# -- admission: per address, in total, per instance and address ----------------------------------


def test_fresh_ids_from_one_address_hit_the_address_limit(backend_server: Server) -> None:
    backend_server.app.admission = Admission(per_address=3, total=0, window=60.0)

    statuses = [post(backend_server, make_payload())[0] for _ in range(5)]
    status, headers, answer = post(backend_server, make_payload())
    other = post(backend_server, make_payload(), source="127.0.0.2")[0]

    assert statuses == [200, 200, 200, 429, 429]
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert answer["next_update"] == int(headers["Retry-After"]) * 1_000_000_000
    assert other == 200
    assert len(backend_server.stored_payloads()) == 4


def test_total_admission_limit_covers_every_address(backend_server: Server) -> None:
    backend_server.app.admission = Admission(per_address=0, total=2, window=60.0)

    statuses = [
        post(backend_server, make_payload(), source=f"127.0.0.{n}")[0] for n in range(1, 5)
    ]

    assert statuses == [200, 200, 429, 429]


def test_admission_forgets_addresses_when_the_window_ends() -> None:
    now = [1000.0]
    admission = Admission(per_address=1, total=0, window=60.0, clock=lambda: now[0])
    for n in range(5000):
        assert admission.admit(f"10.0.{n // 256}.{n % 256}") is None
    assert admission.admit("10.0.0.0") == pytest.approx(60.0)
    assert admission.tracked_addresses == 5000

    now[0] += 60.0

    assert admission.admit("10.0.0.0") is None
    assert admission.tracked_addresses == 1


def test_spoofed_posts_do_not_use_up_an_instances_rate_limit(backend_server: Server) -> None:
    backend_server.policy.update(rate_limit={"payloads": 2, "window": 60})
    victim = str(uuid.uuid4())

    spoofed = [
        post(backend_server, make_payload(instance_id=victim), source="127.0.0.2")[0]
        for _ in range(3)
    ]
    real = [post(backend_server, make_payload(instance_id=victim))[0] for _ in range(3)]

    assert spoofed == [200, 200, 429]
    assert real == [200, 200, 429]


def test_expired_rate_windows_are_pruned(backend_db: str) -> None:
    store = open_store(backend_db)
    try:
        for n in range(50):
            assert store.check_rate(f"id-{n} 10.0.0.1", 5, 10.0, 1000.0) is None
        assert _rate_rows(store) == 50

        assert store.check_rate("late 10.0.0.2", 5, 10.0, 1000.0 + 120.0) is None

        assert _rate_rows(store) == 1
    finally:
        store.close()


def _rate_rows(store: Any) -> int:
    with store._connection() as connection:
        row = connection.execute("SELECT count(*) FROM rate_windows").fetchone()
    return int(row[0])


def test_policy_rate_limit_is_still_per_instance(backend_server: Server) -> None:
    backend_server.policy.update(rate_limit={"payloads": 1, "window": 60})
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    assert post(backend_server, make_payload(instance_id=first))[0] == 200
    assert post(backend_server, make_payload(instance_id=first))[0] == 429
    assert post(backend_server, make_payload(instance_id=second))[0] == 200


def test_bytes_per_address_are_limited_too(backend_server: Server) -> None:
    backend_server.app.admission = Admission(
        per_address=0, total=0, window=60.0, per_address_bytes=350_000
    )
    big = {"pad": ["x" * 1000] * 100}  # ~100 KB each

    statuses = [post(backend_server, make_payload(big))[0] for _ in range(4)]
    other = post(backend_server, make_payload(big), source="127.0.0.2")[0]

    assert statuses == [200, 200, 200, 429]
    assert other == 200


def test_an_ipv6_host_counts_by_its_slash_64() -> None:
    admission = Admission(per_address=2, total=0, window=60.0)

    answers = [admission.admit(f"2001:db8:1:2::{n:x}") for n in range(3)]

    assert answers[:2] == [None, None]
    assert answers[2] is not None
    assert admission.admit("2001:db8:1:3::1") is None
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"


def test_a_float_too_long_to_be_finite_is_refused(backend_server: Server) -> None:
    payload = make_payload({"f": 0})
    body = json.dumps(payload).replace('"f": 0', '"f": 1' + "0" * 400 + ".0").encode()

    status, _, answer = post_body(backend_server, body, payload["instance_id"])

    assert status == 400
    assert "finite" in answer["error"]


def test_decompressed_bodies_share_a_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond its first MiB, a decompressed body is held only within the shared budget."""
    monkeypatch.setattr(server_stub._app, "_DECODE_WAIT", 0.01)
    budget = InFlightBudget(3 * MIB)
    compressed = gzip.compress(b" " * (2 * MIB))

    def body() -> RequestBody:
        environ = {
            "wsgi.input": io.BytesIO(compressed),
            "CONTENT_LENGTH": str(len(compressed)),
            "HTTP_CONTENT_ENCODING": "gzip",
        }
        return RequestBody(environ, Limits(), budget)

    tiny = gzip.compress(b"{}")
    small_environ = {
        "wsgi.input": io.BytesIO(tiny),
        "CONTENT_LENGTH": str(len(tiny)),
        "HTTP_CONTENT_ENCODING": "gzip",
    }
    first, second, small = body(), body(), RequestBody(small_environ, Limits(), budget)
    assert len(first.decode()) == 2 * MIB  # holds 2 x 2 MiB - 1 MiB free = 3 MiB
    with pytest.raises(HTTPError) as refused:
        second.decode()
    assert refused.value.status == 503
    assert small.decode() == b"{}"  # small bodies never wait for the budget

    first.release()
    second.release()

    assert len(body().decode()) == 2 * MIB
