"""Window queries from the rollups: equal to a brute-force count over the stored payloads.

The brute force below is written from the documented rules, independently of
``server_stub._rollups``: a payload counts at its timestamp, or at its arrival
when the timestamp is later; buckets are UTC hours, days and weeks from
Monday; whole-window answers cover the whole days the window touches.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sqlite3
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Union

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_stub import PayloadRecord, PostgresStore, SQLiteStore, _sqlite, serve
from server_stub import _queries as queries
from server_stub._pgtemp import TemporaryPostgres
from server_stub._postgres import _MIGRATIONS
from server_stub._rollups import fold_pending, rollup_schema

UTC = timezone.utc
BASE = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
INSTANCES = [str(uuid.UUID(int=n + 1)) for n in range(4)]
Store = Union[SQLiteStore, PostgresStore]
_schemas = itertools.count(1)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(text: str) -> datetime:
    return datetime.strptime(text.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


def identity(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


# -- the brute force ---------------------------------------------------------------------------


def floor_to(bucket: str, moment: datetime) -> datetime:
    hour = moment.replace(minute=0, second=0, microsecond=0)
    if bucket == "hour":
        return hour
    day = hour.replace(hour=0)
    if bucket == "day":
        return day
    return day - timedelta(days=day.weekday())


STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}


def effective(payload: Dict[str, Any]) -> datetime:
    return min(parse(payload["timestamp"]), parse(payload["received_at"]))


def kind(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return "c"
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(item, dict)
            and set(item) == {"value", "count"}
            and isinstance(item["count"], int)
            and not isinstance(item["count"], bool)
            for item in value
        )
    ):
        return "s"
    return "v"


def bucket_starts(bucket: str, since: datetime, until: datetime) -> List[datetime]:
    start = floor_to(bucket, since)
    last = floor_to(bucket, until - timedelta(microseconds=1))
    starts = []
    while start <= last:
        starts.append(start)
        start += STEP[bucket]
    return starts


class Stored(List[Tuple[int, datetime, Dict[str, Any]]]):
    """(seq, effective time, payload) of stored payloads, in arrival order."""


def prepare(payloads: List[Dict[str, Any]]) -> Stored:
    return Stored((seq, effective(payload), payload) for seq, payload in enumerate(payloads))


def in_range(payloads: Stored, start: datetime, end: datetime) -> List[Any]:
    """(seq, effective time, payload) of the payloads counted in ``[start, end)``."""
    return [entry for entry in payloads if start <= entry[1] < end]


def brute_series(payloads: Stored, key: str, bucket: str, since: datetime, until: datetime) -> Any:
    starts = bucket_starts(bucket, since, until)
    everything = in_range(payloads, starts[0], starts[-1] + STEP[bucket])
    is_counter = any(kind(p["data"].get(key)) == "c" for _, _, p in everything if key in p["data"])
    points = []
    for start in starts:
        inside = [p for _, t, p in everything if start <= t < start + STEP[bucket]]
        with_key = [p for p in inside if key in p["data"]]
        total = sum(p["data"][key] for p in with_key if kind(p["data"][key]) == "c")
        points.append(
            {
                "t": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "value": total if is_counter else None,
                "instances": len({p["instance_id"] for p in with_key}),
            }
        )
    return {"key": key, "bucket": bucket, "points": points}


def brute_active(payloads: Stored, bucket: str, since: datetime, until: datetime) -> Any:
    points = []
    for start in bucket_starts(bucket, since, until):
        inside = [p for _, _, p in in_range(payloads, start, start + STEP[bucket])]
        points.append(
            {
                "t": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "instances": len({p["instance_id"] for p in inside}),
                "payloads": len(inside),
                "dropped": sum(p["client"]["dropped"] for p in inside),
            }
        )
    return {"bucket": bucket, "points": points}


def window_days(since: datetime, until: datetime) -> Tuple[datetime, datetime]:
    return floor_to("day", since), floor_to("day", until - timedelta(microseconds=1)) + STEP["day"]


def reports(payloads: Stored, key: str, since: datetime, until: datetime) -> List[Any]:
    """(order, value, instance) of ``key``'s reports in the window's days, oldest first."""
    start, end = window_days(since, until)
    found = [
        ((t, seq), p["data"][key], p["instance_id"])
        for seq, t, p in in_range(payloads, start, end)
        if key in p["data"]
    ]
    return sorted(found, key=lambda report: report[0])


def merged(found: List[Any]) -> Dict[str, int]:
    totals: Counter[str] = Counter()
    for _, value, _ in found:
        if kind(value) == "s":
            for item in value:
                totals[identity(item["value"])] += item["count"]
    return dict(totals)


def brute_stats(payloads: Stored, since: datetime, until: datetime) -> Any:
    start, end = window_days(since, until)
    inside = [p for _, _, p in in_range(payloads, start, end)]
    keys: Dict[str, Any] = {}
    for key in sorted({key for p in inside for key in p["data"]}):
        found = reports(payloads, key, since, until)
        latest_kind = kind(found[-1][1])
        if latest_kind == "c":
            keys[key] = sum(value for _, value, _ in found if kind(value) == "c")
        elif latest_kind == "s":
            keys[key] = [
                {"value": json.loads(value), "count": count}
                for value, count in sorted(merged(found).items())
            ]
        else:
            keys[key] = found[-1][1]
    return {
        "instances": len({p["instance_id"] for p in inside}),
        "payloads": len(inside),
        "dropped": sum(p["client"]["dropped"] for p in inside),
        "keys": keys,
        "events": {},
    }


def brute_breakdown(
    payloads: Stored, key: str, limit: int, since: datetime, until: datetime
) -> Any:
    found = reports(payloads, key, since, until)
    if not found:
        return {"key": key, "kind": None, "values": []}
    latest_kind = kind(found[-1][1])
    if latest_kind == "c":
        return {"key": key, "kind": "counter", "values": []}
    if latest_kind == "v":
        latest: Dict[str, str] = {}
        for _, value, instance_id in found:  # oldest first: the last one wins
            if kind(value) == "v":
                latest[instance_id] = identity(value)
        counted = sorted(Counter(latest.values()).items(), key=lambda item: (-item[1], item[0]))
        values = [{"value": json.loads(v), "instances": n} for v, n in counted[:limit]]
        return {"key": key, "kind": "set", "values": values}
    reporters: Dict[str, set[str]] = {}
    for _, value, instance_id in found:
        if kind(value) == "s":
            for item in value:
                reporters.setdefault(identity(item["value"]), set()).add(instance_id)
    top = sorted(merged(found).items(), key=lambda item: (-item[1], item[0]))[:limit]
    values = [
        {"value": json.loads(v), "count": count, "instances": len(reporters[v])} for v, count in top
    ]
    return {"key": key, "kind": "counting_set", "values": values}


# -- payloads and stores -----------------------------------------------------------------------

_VALUES = st.one_of(
    st.integers(-50, 50),
    st.sampled_from(["1.0", "1.1", "2.0"]),
    st.sampled_from([True, 1.5, {"a": 1}, ["x"]]),
    st.lists(
        st.fixed_dictionaries(
            {"value": st.sampled_from(["curl", "go", 443, None]), "count": st.integers(0, 9)}
        ),
        min_size=1,
        max_size=3,
    ),
)


@st.composite
def payload_sets(draw: st.DrawFn) -> List[Dict[str, Any]]:
    count = draw(st.integers(0, 14))
    payloads: List[Dict[str, Any]] = []
    for _ in range(count):
        if payloads and draw(st.integers(0, 9)) == 0:
            payloads.append(dict(draw(st.sampled_from(payloads))))  # a resend: stored once
            continue
        sent = BASE + timedelta(minutes=draw(st.integers(0, 12 * 24 * 60)))
        arrival = sent + timedelta(minutes=draw(st.integers(-6 * 60, 3 * 24 * 60)))
        keys = draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3))
        payloads.append(
            {
                "payload_id": uuid.uuid4().hex,
                "instance_id": draw(st.sampled_from(INSTANCES)),
                "timestamp": rfc3339(sent),
                "received_at": rfc3339(arrival),
                "data": {key: draw(_VALUES) for key in keys},
                "client": {"dropped": draw(st.integers(0, 3))},
            }
        )
    return payloads


def store_all(store: Store, payloads: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add the payloads; the ones stored (a repeated payload_id is not), in arrival order."""
    stored = []
    for payload in payloads:
        record = PayloadRecord(
            payload_id=payload["payload_id"],
            instance_id=payload["instance_id"],
            timestamp=payload["timestamp"],
            received_at=payload["received_at"],
            data=payload["data"],
            client=payload["client"],
        )
        if store.add(record):
            stored.append(payload)
    assert len(stored) == len({payload["payload_id"] for payload in payloads})
    return stored


@contextmanager
def postgres_store(cluster: TemporaryPostgres) -> Iterator[PostgresStore]:
    import psycopg

    schema = f"queries_{next(_schemas)}"
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        store = PostgresStore(cluster.url(search_path=schema), max_size=2)
        try:
            yield store
        finally:
            store.close()
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def answers(store: Store, window: Tuple[datetime, datetime], limit: int) -> Dict[str, Any]:
    since, until = window
    span = queries.Window(micros(since), micros(until))
    got: Dict[str, Any] = {}
    store.fold_rollups()
    with store.reading() as run:
        got["stats"] = queries.stats(run, span)
        for bucket in queries.BUCKETS:
            got[f"active/{bucket}"] = queries.active(run, bucket, span)
            for key in ("a", "b", "c"):
                got[f"series/{key}/{bucket}"] = queries.series(run, key, bucket, span)
        for key in ("a", "b", "c"):
            got[f"breakdown/{key}"] = queries.breakdown(run, key, limit, span)
    return got


def brute_answers(payloads: List[Any], window: Tuple[datetime, datetime], limit: int) -> Any:
    since, until = window
    prepared = prepare(payloads)
    expected: Dict[str, Any] = {"stats": brute_stats(prepared, since, until)}
    for bucket in queries.BUCKETS:
        expected[f"active/{bucket}"] = brute_active(prepared, bucket, since, until)
        for key in ("a", "b", "c"):
            expected[f"series/{key}/{bucket}"] = brute_series(prepared, key, bucket, since, until)
    for key in ("a", "b", "c"):
        expected[f"breakdown/{key}"] = brute_breakdown(prepared, key, limit, since, until)
    return expected


@st.composite
def windows(draw: st.DrawFn) -> Tuple[datetime, datetime]:
    since = BASE + timedelta(minutes=draw(st.integers(-2 * 24 * 60, 14 * 24 * 60)))
    length = timedelta(minutes=draw(st.integers(1, 12 * 24 * 60)))
    return since, since + length


# -- the properties ----------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    payloads=payload_sets(),
    window_list=st.lists(windows(), min_size=1, max_size=2),
    limit=st.integers(1, 3),
)
def test_sqlite_queries_equal_a_brute_force_count(
    payloads: List[Dict[str, Any]], window_list: List[Tuple[datetime, datetime]], limit: int
) -> None:
    store = SQLiteStore(":memory:")
    try:
        stored = store_all(store, payloads)
        for window in window_list:
            assert answers(store, window, limit) == brute_answers(stored, window, limit)
    finally:
        store.close()


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(payloads=payload_sets(), window=windows(), limit=st.integers(1, 3))
def test_postgres_queries_equal_a_brute_force_count(
    postgres_cluster: TemporaryPostgres,
    payloads: List[Dict[str, Any]],
    window: Tuple[datetime, datetime],
    limit: int,
) -> None:
    with postgres_store(postgres_cluster) as store:
        stored = store_all(store, payloads)
        assert answers(store, window, limit) == brute_answers(stored, window, limit)


def test_a_window_ending_before_the_latest_reports_uses_the_values_then(
    backend_store: Store,
) -> None:
    """The latest value in the window, not the instance's latest value overall."""

    def at(day: int, value: str, instance: int) -> Dict[str, Any]:
        moment = BASE + timedelta(days=day, hours=3)
        return {
            "payload_id": uuid.uuid4().hex,
            "instance_id": INSTANCES[instance],
            "timestamp": rfc3339(moment),
            "received_at": rfc3339(moment),
            "data": {"version": value, "agents": [{"value": value, "count": 1}]},
            "client": {"dropped": 0},
        }

    stored = store_all(
        backend_store,
        [at(0, "1.0", 0), at(3, "1.1", 0), at(9, "2.0", 0), at(1, "1.0", 1), at(8, "2.0", 1)],
    )
    since, until = BASE + timedelta(days=2), BASE + timedelta(days=5)
    span = queries.Window(micros(since), micros(until))
    backend_store.fold_rollups()
    with backend_store.reading() as run:
        got = queries.breakdown(run, "version", 10, span)
        agents = queries.breakdown(run, "agents", 10, span)
        stats = queries.stats(run, span)
    assert got == {"key": "version", "kind": "set", "values": [{"value": "1.1", "instances": 1}]}
    assert got == brute_breakdown(prepare(stored), "version", 10, since, until)
    assert agents == brute_breakdown(prepare(stored), "agents", 10, since, until)
    assert agents["values"] == [{"value": "1.1", "count": 1, "instances": 1}]
    assert stats["instances"] == 1  # instance 1 reported before and after, not inside


@pytest.fixture(params=["sqlite", "postgres"])
def backend_store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "sqlite":
        store = SQLiteStore(":memory:")
        yield store
        store.close()
    else:
        with postgres_store(request.getfixturevalue("postgres_cluster")) as pg_store:
            yield pg_store


def test_buckets_start_on_the_hour_the_day_and_monday() -> None:
    assert queries.bucket_start("week", 2938) == "2026-04-20T00:00:00Z"
    assert datetime(2026, 4, 20).weekday() == 0
    assert queries.bucket_start("day", 0) == "1970-01-01T00:00:00Z"
    assert queries.bucket_start("hour", 25) == "1970-01-02T01:00:00Z"
    window = queries.Window(
        queries.parse_when("since", "2026-11-25T10:30:00Z"),
        queries.parse_when("until", "2026-11-30"),
    )
    first, end = window.buckets("week")
    assert [queries.bucket_start("week", n) for n in range(first, end)] == ["2026-11-23T00:00:00Z"]


def test_window_parameters() -> None:
    now = datetime(2026, 12, 1, 15, tzinfo=UTC).timestamp()
    default = queries.parse_window({}, now)
    assert default.until == micros(datetime(2026, 12, 1, 15, tzinfo=UTC))
    assert default.until - default.since == 30 * 86_400_000_000
    given_window = queries.parse_window(
        {"since": ["2026-11-01"], "until": ["2026-11-02T01:00:00+01:00"]}, now
    )
    assert given_window == queries.Window(
        micros(datetime(2026, 11, 1, tzinfo=UTC)), micros(datetime(2026, 11, 2, tzinfo=UTC))
    )
    for bad in (
        {"since": ["yesterday"]},
        {"until": ["2026-13-01"]},
        {"since": ["2026-11-02"], "until": ["2026-11-02"]},
    ):
        with pytest.raises(queries.BadQuery):
            queries.parse_window(bad, now)


# -- over HTTP: empty buckets, CSV, errors -------------------------------------------------------


def _post(url: str, instance_id: str, timestamp: str, data: Dict[str, Any]) -> None:
    body = {
        "instance_id": instance_id,
        "timestamp": timestamp,
        "payload_id": uuid.uuid4().hex,
        "data": data,
        "client": {"name": "t", "version": "1", "dropped": 1},
    }
    answer = requests.post(f"{url}/v1/update/{instance_id}", json=body, timeout=10)
    assert answer.status_code == 200, answer.text


def _rows(text: str) -> List[List[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_http_queries_answer_json_and_the_same_csv(backend_db: str) -> None:
    with serve(port=0, db=backend_db) as server:
        _post(
            server.url,
            INSTANCES[0],
            "2026-11-23T10:00:00Z",
            {"requests": 3, "version": "1.4", "agents": [{"value": "curl", "count": 2}]},
        )
        _post(
            server.url,
            INSTANCES[1],
            "2026-11-25T10:00:00Z",
            {"requests": 4, "version": "1.5", "agents": [{"value": "go", "count": 1}]},
        )
        window = "since=2026-11-22&until=2026-11-27"
        series = requests.get(f"{server.url}/v1/series?key=requests&{window}", timeout=10)
        assert series.status_code == 200
        assert series.json() == {
            "key": "requests",
            "bucket": "day",
            "points": [
                {"t": "2026-11-22T00:00:00Z", "value": 0, "instances": 0},
                {"t": "2026-11-23T00:00:00Z", "value": 3, "instances": 1},
                {"t": "2026-11-24T00:00:00Z", "value": 0, "instances": 0},
                {"t": "2026-11-25T00:00:00Z", "value": 4, "instances": 1},
                {"t": "2026-11-26T00:00:00Z", "value": 0, "instances": 0},
            ],
        }
        for path, kind in [
            (f"/v1/series?key=requests&bucket=hour&{window}", "series"),
            (f"/v1/series?key=version&bucket=week&{window}", "series"),
            (f"/v1/active?bucket=day&{window}", "active"),
            (f"/v1/breakdown?key=version&{window}", "breakdown"),
            (f"/v1/breakdown?key=agents&limit=1&{window}", "breakdown"),
            (f"/v1/stats?{window}", "stats"),
        ]:
            as_json = requests.get(f"{server.url}{path}", timeout=10)
            as_csv = requests.get(f"{server.url}{path}&format=csv", timeout=10)
            assert as_json.status_code == as_csv.status_code == 200
            assert as_csv.headers["Content-Type"] == "text/csv; charset=utf-8"
            assert _rows(as_csv.text) == _csv_rows(kind, as_json.json()), path
        hourly = requests.get(f"{server.url}/v1/active?bucket=hour&{window}", timeout=10).json()
        assert len(hourly["points"]) == 5 * 24  # every hour, the empty ones too
        assert sum(point["payloads"] for point in hourly["points"]) == 2
        version = requests.get(f"{server.url}/v1/series?key=version&{window}", timeout=10).json()
        assert [point["value"] for point in version["points"]] == [None] * 5


def _csv_rows(kind: str, answer: Dict[str, Any]) -> List[List[str]]:
    """The CSV rows expected for a JSON answer, written out independently."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    if kind == "series":
        return [["t", "value", "instances"]] + [
            [p["t"], cell(p["value"]), str(p["instances"])] for p in answer["points"]
        ]
    if kind == "active":
        return [["t", "instances", "payloads", "dropped"]] + [
            [p["t"], str(p["instances"]), str(p["payloads"]), str(p["dropped"])]
            for p in answer["points"]
        ]
    if kind == "breakdown":
        if answer["kind"] == "counting_set":
            return [["value", "count", "instances"]] + [
                [cell(v["value"]), str(v["count"]), str(v["instances"])] for v in answer["values"]
            ]
        return [["value", "instances"]] + [
            [cell(v["value"]), str(v["instances"])] for v in answer["values"]
        ]
    rows = [["name", "value"]] + [
        [name, str(answer[name])] for name in ("instances", "payloads", "dropped")
    ]
    rows += [[f"keys.{key}", cell(value)] for key, value in answer["keys"].items()]
    return rows


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("/v1/series", "key is required"),
        ("/v1/series?key=a&bucket=month", "bucket must be one of"),
        ("/v1/active?since=2026-11-02&until=2026-11-01", "since must be earlier"),
        ("/v1/active?bucket=hour&since=2000-01-01", "at most 10000"),
        ("/v1/breakdown?key=a&limit=0", "limit must be"),
        ("/v1/stats?until=soon", "until must be"),
        ("/v1/stats?format=xml", "format must be"),
    ],
)
def test_bad_query_parameters_are_400_saying_what_is_wrong(query: str, message: str) -> None:
    with serve(port=0) as server:
        answer = requests.get(f"{server.url}{query}", timeout=10)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


# -- backfill ----------------------------------------------------------------------------------

# A database as the server made it before rollups existed: these two tables, no
# schema_version, payloads inserted by this statement.
_VERSION_1_SQLITE = """
CREATE TABLE payloads (
    seq INTEGER PRIMARY KEY, payload_id TEXT NOT NULL UNIQUE, instance_id TEXT NOT NULL,
    sent_at TEXT NOT NULL, received_at TEXT NOT NULL, data TEXT NOT NULL, client TEXT,
    dropped INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX payloads_by_instance ON payloads (instance_id, seq);
CREATE TABLE rate_windows (
    instance_id TEXT PRIMARY KEY, window_start REAL NOT NULL, count INTEGER NOT NULL
);
"""
_VERSION_1_INSERT = (
    "INSERT OR IGNORE INTO payloads"
    " (payload_id, instance_id, sent_at, received_at, data, client, dropped)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _version_1_row(payload: Dict[str, Any]) -> Tuple[Any, ...]:
    return (
        payload["payload_id"],
        payload["instance_id"],
        payload["timestamp"],
        payload["received_at"],
        json.dumps(payload["data"]),
        json.dumps(payload["client"]),
        payload["client"]["dropped"],
    )


def _sample_payloads() -> List[Dict[str, Any]]:
    payloads = []
    for n in range(40):
        sent = BASE + timedelta(hours=7 * n)
        payloads.append(
            {
                "payload_id": uuid.uuid4().hex,
                "instance_id": INSTANCES[n % 3],
                "timestamp": rfc3339(sent),
                "received_at": rfc3339(sent + timedelta(hours=(n % 5) - 2)),
                "data": {"a": n, "b": f"v{n % 4}", "c": [{"value": n % 3, "count": 1}]},
                "client": {"dropped": n % 2},
            }
        )
    return payloads


def test_sqlite_database_from_before_rollups_is_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    payloads = _sample_payloads()
    with sqlite3.connect(path) as connection:
        connection.executescript(_VERSION_1_SQLITE)
        connection.executemany(_VERSION_1_INSERT, [_version_1_row(p) for p in payloads])
    connection.close()
    window = (BASE, BASE + timedelta(days=14))
    store = SQLiteStore(str(path))
    try:
        assert answers(store, window, 5) == brute_answers(payloads, window, 5)
        again = SQLiteStore(str(path))  # migrated once: not counted twice
        assert answers(again, window, 5) == brute_answers(payloads, window, 5)
        again.close()
    finally:
        store.close()


def test_sqlite_database_with_the_rollup_queue_is_migrated(tmp_path: Path) -> None:
    """Schema version 3 queued each payload in a rollup_pending table; version 4
    folds what the queue holds, drops it, and counts on seq order instead."""
    path = tmp_path / "v3.db"
    payloads = _sample_payloads()
    with sqlite3.connect(path) as connection:
        connection.executescript(_VERSION_1_SQLITE)
        connection.executescript(_sqlite._POLICY_SCHEMA + ";" + _sqlite._EVENTS_SCHEMA)
        for statement in rollup_schema(sqlite=True):
            connection.execute(statement)
        connection.execute("CREATE TABLE rollup_pending (seq bigint PRIMARY KEY)")
        connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (3)")
        # The first half folded as version 3 did (queued, folded, dequeued); the rest queued.
        connection.executemany(_VERSION_1_INSERT, [_version_1_row(p) for p in payloads[:20]])
        connection.execute("INSERT INTO rollup_pending (seq) SELECT seq FROM payloads")
        assert fold_pending(_sqlite.SQLiteRunner(connection), _sqlite._SELECT_QUEUED) == 20
        connection.executemany(_VERSION_1_INSERT, [_version_1_row(p) for p in payloads[20:]])
        connection.execute("INSERT INTO rollup_pending SELECT seq FROM payloads WHERE seq > 20")
    connection.close()
    window = (BASE, BASE + timedelta(days=14))
    store = SQLiteStore(str(path))
    try:
        with store.reading() as run:
            assert run.fetchall("SELECT type FROM sqlite_master WHERE name = 'rollup_pending'") == [
                ("view",)
            ]
            assert run.fetchall("SELECT count(*) FROM rollup_pending") == [(0,)]
            assert run.fetchall("SELECT version FROM schema_version") == [(4,)]
        assert answers(store, window, 5) == brute_answers(payloads, window, 5)
        later = {**payloads[3], "payload_id": uuid.uuid4().hex, "data": {"a": 7, "b": "v9"}}
        stored = store_all(store, [later])
        with store.reading() as run:
            assert run.fetchall("SELECT count(*) FROM rollup_pending") == [(1,)]
        assert answers(store, window, 5) == brute_answers(payloads + stored, window, 5)
    finally:
        store.close()


def test_sqlite_deleting_the_newest_payloads_does_not_hide_later_ones(tmp_path: Path) -> None:
    """Pending payloads are those after the folded mark; a new payload takes the seq
    after the largest stored. Deleting the newest folded payloads by hand must not
    leave the mark ahead of the seqs that later payloads get."""
    path = str(tmp_path / "t.db")
    payloads = _sample_payloads()
    window = (BASE, BASE + timedelta(days=14))
    store = SQLiteStore(path)
    try:
        stored = store_all(store, payloads)
        assert answers(store, window, 5) == brute_answers(stored, window, 5)  # folded
    finally:
        store.close()
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM payloads WHERE seq > 30")
    connection.close()
    store = SQLiteStore(path)
    try:
        later = {**payloads[3], "payload_id": uuid.uuid4().hex, "data": {"a": 7, "b": "v9"}}
        assert store_all(store, [later]) == [later]
        with store.reading() as run:
            assert run.fetchall("SELECT count(*) FROM rollup_pending") == [(1,)]
        # The rollups still count the deleted payloads (they were folded) and the new one.
        assert answers(store, window, 5) == brute_answers([*stored, later], window, 5)
    finally:
        store.close()


def test_postgres_database_from_before_rollups_is_backfilled(postgres_url: str) -> None:
    import psycopg

    payloads = _sample_payloads()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(_MIGRATIONS[0])
        connection.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        connection.execute("INSERT INTO schema_version VALUES (1)")
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO payloads"
                " (payload_id, instance_id, sent_at, received_at, data, client, dropped)"
                " VALUES (%s, %s, %s, %s::timestamptz, %s::jsonb, %s::jsonb, %s)",
                [_version_1_row(p) for p in payloads],
            )
    window = (BASE, BASE + timedelta(days=14))
    store = PostgresStore(postgres_url)
    try:
        assert answers(store, window, 5) == brute_answers(payloads, window, 5)
    finally:
        store.close()


def test_a_resent_payload_adds_nothing_to_the_rollups(backend_store: Store) -> None:
    payload = _sample_payloads()[0]
    stored = store_all(backend_store, [payload, dict(payload), dict(payload)])
    window = (BASE - timedelta(days=1), BASE + timedelta(days=1))
    assert answers(backend_store, window, 5) == brute_answers(stored, window, 5)
    assert answers(backend_store, window, 5)["stats"]["payloads"] == 1


def test_huge_counters_saturate_instead_of_failing(backend_store: Store) -> None:
    payloads = [
        {**_sample_payloads()[0], "payload_id": uuid.uuid4().hex, "data": {"n": 2**63 + n}}
        for n in range(3)
    ]
    store_all(backend_store, payloads)
    backend_store.fold_rollups()
    with backend_store.reading() as run:
        since, until = micros(BASE - timedelta(days=1)), micros(BASE + timedelta(days=1))
        stats = queries.stats(run, queries.Window(since, until))
    assert stats["keys"] == {"n": 2**63 - 1}


def test_ingest_folds_pending_payloads_every_256(backend_store: Store) -> None:
    payloads = []
    for n in range(300):
        moment = BASE + timedelta(minutes=n)
        payloads.append(
            {
                "payload_id": uuid.uuid4().hex,
                "instance_id": INSTANCES[n % 4],
                "timestamp": rfc3339(moment),
                "received_at": rfc3339(moment),
                "data": {"a": 1},
                "client": {"dropped": 0},
            }
        )
    store_all(backend_store, payloads)
    with backend_store.reading() as run:
        ((pending,),) = run.fetchall("SELECT count(*) FROM rollup_pending")
        ((folded,),) = run.fetchall("SELECT sum(payloads) FROM rollup_hours")
    assert (pending, folded) == (300 - 256, 256)
    assert backend_store.fold_rollups() == 300 - 256
    assert backend_store.fold_rollups() == 0


def test_values_too_long_to_index_are_kept_whole(backend_store: Store) -> None:
    """A long value (a big object, a long counting-set item) is kept under a hash in
    the indexed rollups and comes back whole."""
    big = {"members": ["x" * 900] * 4, "n": 1}
    long_item = "é" * 1024
    payloads = [
        {
            "payload_id": uuid.uuid4().hex,
            "instance_id": INSTANCES[n],
            "timestamp": rfc3339(BASE + timedelta(hours=n)),
            "received_at": rfc3339(BASE + timedelta(hours=n)),
            "data": {"a": big, "c": [{"value": long_item, "count": 2}, {"value": "x", "count": 1}]},
            "client": {"dropped": 0},
        }
        for n in range(2)
    ]
    stored = store_all(backend_store, payloads)
    window = (BASE, BASE + timedelta(days=1))
    got = answers(backend_store, window, 5)
    assert got == brute_answers(stored, window, 5)
    assert got["breakdown/a"]["values"] == [{"value": big, "instances": 2}]
    assert got["breakdown/c"]["values"][0] == {"value": long_item, "count": 4, "instances": 2}
