"""Events on the server: validation (400s), dedup, ``/v1/events``, counts, migration.

Every test that uses ``server`` runs on in-memory SQLite and on a fresh PostgreSQL schema.
"""

from __future__ import annotations

import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import requests

from server_stub import Limits, PostgresStore, SQLiteStore, open_store, serve
from server_stub._harness import Server
from server_stub._sqlite import SQLITE_SCHEMA_VERSION

T0 = "2026-11-20T10:15:00.000000Z"


@pytest.fixture
def server(backend_server: Server) -> Server:
    """The server under test, on each storage backend (``backend_server`` in conftest)."""
    return backend_server


def event(name: str = "login", *, event_type: str = "behavioral", at: str = T0,
          event_id: Optional[str] = None, **attrs: Any) -> Dict[str, Any]:
    return {"event_id": event_id or uuid.uuid4().hex, "event_time": at,
            "event_type": event_type, "event_name": name, **attrs}


def payload(events: List[Dict[str, Any]], instance_id: Optional[str] = None,
            **extra: Any) -> Dict[str, Any]:
    return {
        "instance_id": instance_id or str(uuid.uuid4()),
        "timestamp": "2026-11-23T10:00:00.123456Z",
        "payload_id": uuid.uuid4().hex,
        "data": {},
        "events": events,
        "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": 0,
                   "dropped_events": 0},
        **extra,
    }


def post(server: Server, body: Dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.url}/v1/update/{body['instance_id']}", json=body, timeout=10)


def query(server: Server, **params: Any) -> Dict[str, Any]:
    params.setdefault("since", "2026-01-01")
    params.setdefault("until", "2027-01-01")
    response = requests.get(f"{server.url}/v1/events", params=params, timeout=10)
    assert response.status_code == 200, response.text
    answer: Dict[str, Any] = response.json()
    return answer


def test_events_are_stored_and_served_newest_first(server: Server) -> None:
    instance = str(uuid.uuid4())
    first = event("install-success", at="2026-11-20T10:00:00Z", version="1.2")
    second = event("deploy-start", at="2026-11-20T11:00:00.5+01:00", project="p", ok=True, n=3)
    third = event("info", event_type="log", at="2026-11-21T00:00:00Z", message="hi", ratio=0.5)
    assert post(server, payload([first, second, third], instance)).status_code == 200

    answer = query(server)
    assert [e["event_name"] for e in answer["events"]] == ["info", "deploy-start",
                                                          "install-success"]
    newest = answer["events"][0]
    assert newest == {
        "instance_id": instance, "event_id": third["event_id"],
        "event_time": "2026-11-21T00:00:00.000000Z", "event_type": "log", "event_name": "info",
        "attrs": {"message": "hi", "ratio": 0.5}, "received_at": newest["received_at"],
    }
    assert answer["events"][1]["event_time"] == "2026-11-20T10:00:00.500000Z"
    assert answer["events"][1]["attrs"] == {"project": "p", "ok": True, "n": 3}
    assert answer["next_offset"] is None
    assert server.stats()["events"] == {
        "behavioral": {"deploy-start": 1, "install-success": 1}, "log": {"info": 1},
    }


def test_an_event_is_stored_once_per_instance_and_event_id(server: Server) -> None:
    instance = str(uuid.uuid4())
    once = event("login")
    body = payload([once], instance)
    assert post(server, body).status_code == 200
    assert post(server, body).status_code == 200  # the same payload again
    assert post(server, payload([once, event("logout")], instance)).status_code == 200  # proxied
    other = str(uuid.uuid4())
    assert post(server, payload([once], other)).status_code == 200  # another instance's

    stored = query(server)["events"]
    assert sorted((e["instance_id"] == instance, e["event_name"]) for e in stored) == [
        (False, "login"), (True, "login"), (True, "logout"),
    ]
    assert server.stats()["events"] == {"behavioral": {"login": 2, "logout": 1}}


BAD_EVENTS: Dict[str, Any] = {
    "not an object": ([1], "events[1]"),
    "missing event_id": ({"event_time": T0, "event_type": "t", "event_name": "n"},
                         "events[1].event_id"),
    "uppercase event_id": (event(event_id="A" * 32), "events[1].event_id"),
    "short event_id": (event(event_id="a" * 31), "events[1].event_id"),
    "missing event_time": ({"event_id": "a" * 32, "event_type": "t", "event_name": "n"},
                           "events[1].event_time"),
    "bad event_time": (event(at="yesterday"), "events[1].event_time"),
    "numeric event_time": (event(at=12), "events[1].event_time"),  # type: ignore[arg-type]
    "empty type": (event(event_type=""), "events[1].event_type"),
    "long name": (event("n" * 257), "events[1].event_name"),
    "name with NUL": (event("a\x00"), "events[1].event_name"),
    "reserved attribute": (event(event_other=1), "events[1].event_other"),
    "nested attribute": (event(tags=["a"]), "events[1].tags"),
    "object attribute": (event(where={"a": 1}), "events[1].where"),
    "long string": (event(note="x" * 1025), "events[1].note"),
    "lone surrogate": (event(note="\ud800"), "events[1].note"),
    "huge int": (event(n=2**63), "events[1].n"),
    "too big": (event(**{f"a{i}": "\x01" * 1000 for i in range(3)}), "events[1]"),
}


# Validation happens before storage: these run on the default backend only.
@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_a_bad_event_refuses_the_payload_naming_its_index_and_field(
    telemetry_server: Server, case: str
) -> None:
    server = telemetry_server
    bad, where = BAD_EVENTS[case]
    body = payload([event("fine"), bad, event("fine too")], data={"n": 1})
    response = post(server, body)
    assert response.status_code == 400
    assert response.json()["error"].startswith(where + ":" if "." in where else where)
    assert server.stored_payloads() == []
    assert query(server)["events"] == []


def test_events_must_be_an_array(telemetry_server: Server) -> None:
    server = telemetry_server
    response = post(server, payload({"a": 1}))  # type: ignore[arg-type]
    assert response.status_code == 400
    assert "events must be an array" in response.json()["error"]


def test_a_payload_without_events_or_with_null_events_stores_none(server: Server) -> None:
    body = payload([])
    del body["events"]
    assert post(server, body).status_code == 200
    assert post(server, payload(None)).status_code == 200  # type: ignore[arg-type]
    assert query(server)["events"] == []
    assert server.stats()["payloads"] == 2


def test_client_dropped_events_must_be_a_count(telemetry_server: Server) -> None:
    server = telemetry_server
    body = payload([])
    body["client"]["dropped_events"] = -1
    response = post(server, body)
    assert response.status_code == 400
    assert "client.dropped_events" in response.json()["error"]


@pytest.fixture
def fleet(server: Server) -> Dict[str, Any]:
    """Two instances' events at known times: 30 in all."""
    alpha, beta = str(uuid.uuid4()), str(uuid.uuid4())
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    events: Dict[str, List[Dict[str, Any]]] = {alpha: [], beta: []}
    for number in range(30):
        at = (start + timedelta(hours=number)).strftime("%Y-%m-%dT%H:%M:%SZ")
        owner = alpha if number % 3 else beta
        kind, name = ("log", "error") if number % 5 == 0 else ("behavioral", f"step-{number % 2}")
        events[owner].append(event(name, event_type=kind, at=at, n=number))
    for owner, owned in events.items():
        assert post(server, payload(owned[:10], owner)).status_code == 200
        assert post(server, payload(owned[10:], owner)).status_code == 200
    return {"alpha": alpha, "beta": beta}


def numbers(answer: Dict[str, Any]) -> List[int]:
    return [e["attrs"]["n"] for e in answer["events"]]


def test_events_page_newest_first(server: Server, fleet: Dict[str, Any]) -> None:
    assert numbers(query(server)) == list(range(29, -1, -1))
    page = query(server, limit=7, offset=0)
    assert numbers(page) == list(range(29, 22, -1)) and page["next_offset"] == 7
    page = query(server, limit=7, offset=28)
    assert numbers(page) == [1, 0] and page["next_offset"] is None


def test_events_filter_by_type_name_instance_and_window(
    server: Server, fleet: Dict[str, Any]
) -> None:
    assert numbers(query(server, type="log")) == [25, 20, 15, 10, 5, 0]
    assert numbers(query(server, type="behavioral", name="step-1")) == [
        n for n in range(29, -1, -1) if n % 5 and n % 2
    ]
    assert numbers(query(server, name="error")) == [25, 20, 15, 10, 5, 0]
    assert numbers(query(server, instance=fleet["beta"].upper())) == list(range(27, -1, -3))
    assert numbers(query(server, since="2026-11-01T05:00:00Z", until="2026-11-01T08:00:00Z")) == [
        7, 6, 5,
    ]
    assert numbers(query(server, since="2026-11-02", until="2026-11-03")) == list(
        range(29, 23, -1)
    )
    assert numbers(query(server, type="log", instance=fleet["alpha"], until="2026-11-01T12:00:00Z")
                   ) == [10, 5]


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"offset": "-1"},
     {"since": "yesterday"}, {"until": "2026-13-01"}, {"instance": "nope"}],
)
def test_a_bad_events_query_is_a_400(telemetry_server: Server, params: Dict[str, str]) -> None:
    server = telemetry_server
    response = requests.get(f"{server.url}/v1/events", params=params, timeout=10)
    assert response.status_code == 400
    assert next(iter(params)) in response.json()["error"]


def test_events_default_to_the_last_30_days(server: Server) -> None:
    now = datetime.now(timezone.utc)
    recent = event("recent", at=(now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    old = event("old", at=(now - timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    future = event("future", at=(now + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert post(server, payload([recent, old, future])).status_code == 200
    response = requests.get(f"{server.url}/v1/events", timeout=10)
    # A time later than the arrival counts as the arrival: the future event is now.
    assert [e["event_name"] for e in response.json()["events"]] == ["future", "recent"]
    assert response.json()["events"][0]["event_time"] == future["event_time"][:-1] + ".000000Z"


def test_event_counts_cover_whole_and_partial_hours(server: Server) -> None:
    times = ["2026-11-01T09:59:59.999999Z", "2026-11-01T10:00:00Z", "2026-11-01T10:30:00Z",
             "2026-11-01T11:15:00Z", "2026-11-01T12:00:00Z", "2026-11-01T12:45:00Z"]
    assert post(server, payload([event("tick", at=at) for at in times])).status_code == 200
    store = server.store

    def ticks(since: str, until: str) -> int:
        counts = store.event_counts(since, until)
        return int(counts.get("behavioral", {}).get("tick", 0))

    assert ticks("2026-11-01T00:00:00.000000Z", "2026-11-02T00:00:00.000000Z") == 6
    assert ticks("2026-11-01T10:00:00.000000Z", "2026-11-01T12:00:00.000000Z") == 3
    assert ticks("2026-11-01T10:15:00.000000Z", "2026-11-01T12:30:00.000000Z") == 3
    assert ticks("2026-11-01T10:15:00.000000Z", "2026-11-01T10:45:00.000000Z") == 1
    assert ticks("2026-11-01T09:59:59.999999Z", "2026-11-01T10:00:00.000001Z") == 2
    assert ticks("2026-11-01T13:00:00.000000Z", "2026-11-01T14:00:00.000000Z") == 0


# -- migration from a database made by the code before events ---------------------------

# The schema as the server created it before events existed (SQLite kept no version).
_SQLITE_BEFORE_EVENTS = """
CREATE TABLE IF NOT EXISTS payloads (
    seq         INTEGER PRIMARY KEY,
    payload_id  TEXT NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    sent_at     TEXT NOT NULL,
    received_at TEXT NOT NULL,
    data        TEXT NOT NULL,
    client      TEXT,
    dropped     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS payloads_by_instance ON payloads (instance_id, seq);
CREATE TABLE IF NOT EXISTS rate_windows (
    instance_id  TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    count        INTEGER NOT NULL
);
"""


def _check_migrated(db: str, instance: str) -> None:
    with serve(port=0, db=db) as migrated:
        assert migrated.stats()["keys"] == {"old": 5}
        body = payload([event("after-migration")], instance)
        assert post(migrated, body).status_code == 200
        assert [e["event_name"] for e in query(migrated)["events"]] == ["after-migration"]
        assert migrated.stats()["payloads"] == 2


def test_a_sqlite_database_from_before_events_is_migrated(tmp_path: Path) -> None:
    db = str(tmp_path / "old.db")
    instance = str(uuid.uuid4())
    with sqlite3.connect(db) as connection:
        connection.executescript(_SQLITE_BEFORE_EVENTS)
        connection.execute(
            "INSERT INTO payloads (payload_id, instance_id, sent_at, received_at, data)"
            " VALUES (?, ?, ?, ?, ?)",
            (uuid.uuid4().hex, instance, T0, T0, '{"old": 5}'),
        )
    connection.close()
    _check_migrated(db, instance)
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT max(version) FROM schema_version").fetchone() == (
            SQLITE_SCHEMA_VERSION,
        )
    connection.close()
    SQLiteStore(db).close()  # opening a current database again changes nothing


def test_a_sqlite_database_from_newer_code_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "new.db")
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (99)")
    connection.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteStore(db)


def test_a_postgres_database_from_before_events_is_migrated(postgres_url: str) -> None:
    import psycopg

    from server_stub import _postgres

    instance = str(uuid.uuid4())
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        # What the code before events created: migration 1 and version 1.
        connection.execute(_postgres._MIGRATIONS[0])
        connection.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (1)")
        connection.execute(
            "INSERT INTO payloads (payload_id, instance_id, sent_at, received_at, data)"
            " VALUES (%s, %s, %s, %s, %s)",
            (uuid.uuid4().hex, instance, T0, T0, '{"old": 5}'),
        )
    _check_migrated(postgres_url, instance)
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        assert row is not None and row[0] == _postgres.SCHEMA_VERSION >= 2
    store = open_store(postgres_url)
    assert isinstance(store, PostgresStore)
    store.close()


def test_the_same_event_twice_in_one_payload_is_stored_once(server: Server) -> None:
    twice = event("login")
    assert post(server, payload([twice, event("other"), twice])).status_code == 200
    assert sorted(e["event_name"] for e in query(server)["events"]) == ["login", "other"]
    assert server.stats()["events"] == {"behavioral": {"login": 1, "other": 1}}


def test_attribute_values_come_back_with_their_types(server: Server) -> None:
    attrs: Dict[str, Any] = {
        "big_float": 1e16, "tiny": 5e-324, "int": 2**62, "neg": -1, "flag": False,
        "none": None, "text": "é \u2603",
    }
    assert post(server, payload([event("typed", **attrs)])).status_code == 200
    [stored] = query(server)["events"]
    assert {k: (type(v).__name__, v) for k, v in stored["attrs"].items()} == {
        k: (type(v).__name__, v) for k, v in attrs.items()
    }


def test_a_page_of_events_stays_within_the_response_budget(backend_db: str) -> None:
    with serve(port=0, db=backend_db, limits=Limits(max_response_bytes=3000)) as small:
        body = payload([event(f"e{i}", note="x" * 1000, at=T0, n=i) for i in range(5)])
        assert post(small, body).status_code == 200
        first = query(small, limit=5)
        assert 1 <= len(first["events"]) < 5 and first["next_offset"] == len(first["events"])
        rest = query(small, limit=5, offset=first["next_offset"])
        seen = [e["attrs"]["n"] for e in first["events"] + rest["events"]]
        assert len(rest["events"]) >= 1
        while rest["next_offset"] is not None:
            rest = query(small, limit=5, offset=rest["next_offset"])
            seen += [e["attrs"]["n"] for e in rest["events"]]
        assert sorted(seen) == list(range(5))


def test_stats_count_events_within_the_window(server: Server) -> None:
    body = payload([event("login", at="2026-11-20T10:15:00Z"), event("login", at=T0),
                    event("info", event_type="log", at="2026-11-22T23:59:59Z")])
    assert post(server, body).status_code == 200

    def counted(**window: str) -> Any:
        response = requests.get(f"{server.url}/v1/stats", params=window, timeout=10)
        assert response.status_code == 200
        return response.json()["events"]

    assert counted(since="2026-11-01", until="2026-12-01") == {
        "behavioral": {"login": 2}, "log": {"info": 1},
    }
    assert counted(since="2026-11-21", until="2026-12-01") == {"log": {"info": 1}}
    assert counted(since="2026-11-01", until="2026-11-02") == {}
