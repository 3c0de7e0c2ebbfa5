"""Storage of received payloads: the ``Store`` seam and its SQLite implementation.

``Store`` is deliberately small and SQL-agnostic so that another backend (e.g.
PostgreSQL for multi-worker deployments) can implement it; the WSGI app knows
storage only through it. Rate-limit state lives in the store too, so that
several worker processes sharing one database share one limit.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from . import _sqlite_events
from ._events import EventQuery, EventRecord

if TYPE_CHECKING:
    from ._postgres import PostgresStore

__all__ = [
    "PayloadRecord",
    "SQLiteStore",
    "Store",
    "UnstorablePayload",
    "aggregate_keys",
    "open_store",
]

logger = logging.getLogger("server_stub")


@dataclass(frozen=True)
class PayloadRecord:
    """One validated payload, as the app hands it to the store."""

    payload_id: str
    instance_id: str
    timestamp: str
    """The client's RFC 3339 timestamp, exactly as sent."""
    received_at: str
    """When the server received it, RFC 3339 UTC."""
    data: Mapping[str, Any]
    client: Optional[Mapping[str, Any]] = None
    events: Sequence[EventRecord] = ()
    """Its events, validated; stored once per ``(instance_id, event_id)``."""

    @property
    def dropped(self) -> int:
        dropped = (self.client or {}).get("dropped", 0)
        return dropped if isinstance(dropped, int) else 0


class UnstorablePayload(ValueError):
    """The store cannot represent this (valid) payload, e.g. ``\\u0000`` in PostgreSQL's jsonb."""


class Store(Protocol):
    """Where payloads go. Implementations must be safe to call from many threads."""

    def add(self, record: PayloadRecord) -> bool:
        """Store ``record``; False when its ``payload_id`` was already stored (nothing changes).

        Raises ``UnstorablePayload`` when the backend cannot hold its content.
        """
        ...

    def stats(self) -> dict[str, Any]:
        """``{"instances", "payloads", "dropped", "keys", "events"}``, see ``aggregate_keys``;
        ``events`` is ``{type: {name: count}}``."""
        ...

    def events(self, query: EventQuery) -> list[dict[str, Any]]:
        """The events ``query`` selects, newest first (``event_row`` dicts)."""
        ...

    def event_counts(self, since: str, until: str) -> dict[str, dict[str, int]]:
        """``{type: {name: count}}`` of the events counted in ``[since, until)``
        (``format_time`` strings), from the hourly counts kept at ingest."""
        ...

    def instance_payloads(self, instance_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        """That instance's payloads, newest first: dicts with ``payload_id``, ``timestamp``,
        ``received_at``, ``data``, ``client``."""
        ...

    def check_rate(
        self, instance_id: str, limit: int, window_s: float, now: float
    ) -> Optional[float]:
        """Count one payload against ``limit`` per ``window_s`` for this instance.

        Returns None when it is allowed (and counted), else the seconds until it
        would be allowed (and nothing is counted).
        """
        ...

    def close(self) -> None: ...


def is_counting_set(value: object) -> bool:
    """An ``append_unique`` encoding: a non-empty array of ``{"value": v, "count": int}``."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(item, dict)
            and item.keys() == {"value", "count"}
            and isinstance(item["count"], int)
            and not isinstance(item["count"], bool)
            for item in value
        )
    )


def _is_counter(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def aggregate_keys(datas: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-key totals over payload ``data`` objects given in arrival order.

    Integers (not bools) are summed; counting sets are merged with their counts
    summed, sorted by the JSON encoding of the value; anything else is the
    latest value. When a key changes kind, the latest value replaces the total
    and accumulation starts again from it.
    """
    counters: dict[str, int] = {}
    counting_sets: dict[str, dict[str, list[Any]]] = {}
    latest: dict[str, Any] = {}
    for data in datas:
        for key, value in data.items():
            if _is_counter(value):
                counting_sets.pop(key, None)
                latest.pop(key, None)
                counters[key] = counters.get(key, 0) + value
            elif is_counting_set(value):
                counters.pop(key, None)
                latest.pop(key, None)
                merged = counting_sets.setdefault(key, {})
                for item in value:
                    identity = json.dumps(item["value"], sort_keys=True)
                    merged.setdefault(identity, [item["value"], 0])[1] += item["count"]
            else:
                counters.pop(key, None)
                counting_sets.pop(key, None)
                latest[key] = value
    totals: dict[str, Any] = {**latest, **counters}
    for key, merged in counting_sets.items():
        totals[key] = [{"value": merged[k][0], "count": merged[k][1]} for k in sorted(merged)]
    return dict(sorted(totals.items()))


def open_store(db: str) -> Union[SQLiteStore, PostgresStore]:
    """The store ``db`` names: a ``postgresql://`` (or ``postgres://``) URL is PostgreSQL
    (psycopg 3, imported now), anything else a SQLite file, or ``":memory:"``."""
    from ._postgres import PostgresStore, is_postgres_url  # noqa: PLC0415 - it imports this module

    if is_postgres_url(db):
        return PostgresStore(db)
    return SQLiteStore(db)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS payloads (
    -- arrival order; an explicit INTEGER PRIMARY KEY so VACUUM cannot renumber it
    seq         INTEGER PRIMARY KEY,
    payload_id  TEXT NOT NULL UNIQUE,
    instance_id TEXT NOT NULL,
    sent_at     TEXT NOT NULL,
    received_at TEXT NOT NULL,
    data        TEXT NOT NULL,   -- JSON object
    client      TEXT,            -- JSON object or NULL
    dropped     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS payloads_by_instance ON payloads (instance_id, seq);
CREATE TABLE IF NOT EXISTS rate_windows (
    instance_id  TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    count        INTEGER NOT NULL
);
"""

_MIGRATIONS: Tuple[str, ...] = (
    _SCHEMA,  # 1: payloads and rate-limit windows
    _sqlite_events.EVENTS_SCHEMA,  # 2: events and their hourly counts
)
SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this code creates and expects (``PRAGMA user_version``)."""

# Every event ever counted: the window of stats() until it takes one.
_ALL_TIME = ("0001-01-01T00:00:00.000000Z", "9999-12-31T23:59:59.999999Z")


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; returns the version found (0: a new
    database, or one made before versions were kept, whose tables all exist).

    One ``BEGIN IMMEDIATE`` transaction, so concurrent starts migrate once.
    Raises ``RuntimeError`` when the database was migrated by newer code.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        (found,) = connection.execute("PRAGMA user_version").fetchone()
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {found} is newer than this server's ({SCHEMA_VERSION})"
            )
        for script in _MIGRATIONS[found:]:
            for statement in re.sub(r"--[^\n]*", "", script).split(";"):
                if statement.strip():
                    connection.execute(statement)
        if found < SCHEMA_VERSION:
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return int(found)


class SQLiteStore:
    """SQLite storage: WAL mode, a small pool of connections shared by request threads.

    The threading WSGI server runs one short-lived thread per connection, so
    connections are pooled rather than per-thread (which would mean one connect
    per request). Writes are serialised by an in-process lock; across processes
    SQLite's own locking with a busy timeout applies. ``":memory:"`` gives a
    private in-memory database on a single connection.
    """

    def __init__(
        self, path: str = ":memory:", *, pool_size: int = 8, timeout: float = 10.0
    ) -> None:
        self.path = path
        self._memory = path in ("", ":memory:")
        self._timeout = timeout
        self._pool_size = 1 if self._memory else max(1, pool_size)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._opened = 0
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        connection = self._connect()
        migrate(connection)
        if self._memory:
            self._idle.put(connection)
            self._opened = 1
        else:
            # Not kept: a server that forks workers after create_app() must not share it.
            connection.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        if not self._memory:
            connection.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL is durable against application crashes and only
            # syncs at checkpoints, not on every commit.
            connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        connection = self._acquire()
        try:
            yield connection
        finally:
            self._release(connection)

    def _acquire(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("store is closed")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._pool_lock:
            can_open = self._opened < self._pool_size
            if can_open:
                self._opened += 1
        if not can_open:
            return self._idle.get(timeout=self._timeout)
        try:
            return self._connect()
        except BaseException:
            with self._pool_lock:
                self._opened -= 1
            raise

    def _release(self, connection: sqlite3.Connection) -> None:
        if self._closed:
            connection.close()
        else:
            self._idle.put(connection)

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, self._connection() as connection:
            yield connection

    def add(self, record: PayloadRecord) -> bool:
        row = (
            record.payload_id,
            record.instance_id,
            record.timestamp,
            record.received_at,
            json.dumps(record.data, separators=(",", ":")),
            json.dumps(record.client, separators=(",", ":")) if record.client is not None else None,
            record.dropped,
        )
        with self._writing() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                cursor = connection.execute(
                    "INSERT OR IGNORE INTO payloads"
                    " (payload_id, instance_id, sent_at, received_at, data, client, dropped)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                stored = cursor.rowcount == 1
                if stored:
                    _sqlite_events.insert_events(connection, record.events)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return stored

    def stats(self) -> dict[str, Any]:
        # Computed from every stored payload on each call: exact and simple, and
        # fast enough for a reference server (a few seconds per million rows).
        with self._connection() as connection:
            # One read transaction, so the counts and the key totals agree.
            connection.execute("BEGIN")
            try:
                instances, payloads, dropped = connection.execute(
                    "SELECT COUNT(DISTINCT instance_id), COUNT(*), COALESCE(SUM(dropped), 0)"
                    " FROM payloads"
                ).fetchone()
                rows = connection.execute("SELECT data FROM payloads ORDER BY seq")
                keys = aggregate_keys(json.loads(data) for (data,) in rows)
                events = _sqlite_events.event_counts(connection, *_ALL_TIME)
            finally:
                connection.execute("COMMIT")
        return {
            "instances": instances, "payloads": payloads, "dropped": dropped, "keys": keys,
            "events": events,
        }

    def events(self, query: EventQuery) -> list[dict[str, Any]]:
        with self._connection() as connection:
            return _sqlite_events.query_events(connection, query)

    def event_counts(self, since: str, until: str) -> dict[str, dict[str, int]]:
        with self._connection() as connection:
            return _sqlite_events.event_counts(connection, since, until)

    def instance_payloads(self, instance_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT payload_id, sent_at, received_at, data, client FROM payloads"
                " WHERE instance_id = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                (instance_id, limit, offset),
            ).fetchall()
        return [
            {
                "payload_id": payload_id,
                "timestamp": sent_at,
                "received_at": received_at,
                "data": json.loads(data),
                "client": json.loads(client) if client is not None else None,
            }
            for payload_id, sent_at, received_at, data, client in rows
        ]

    def all_payloads(self) -> list[dict[str, Any]]:
        """Every stored payload in arrival order (with ``instance_id``); for tests and tools."""
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT payload_id, instance_id, sent_at, received_at, data, client"
                " FROM payloads ORDER BY seq"
            ).fetchall()
        return [
            {
                "payload_id": payload_id,
                "instance_id": instance_id,
                "timestamp": sent_at,
                "received_at": received_at,
                "data": json.loads(data),
                "client": json.loads(client) if client is not None else None,
            }
            for payload_id, instance_id, sent_at, received_at, data, client in rows
        ]

    def check_rate(
        self, instance_id: str, limit: int, window_s: float, now: float
    ) -> Optional[float]:
        # A fixed window per instance: simple, and one row per instance.
        with self._writing() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                row = connection.execute(
                    "SELECT window_start, count FROM rate_windows WHERE instance_id = ?",
                    (instance_id,),
                ).fetchone()
                if row is None or now >= row[0] + window_s or now < row[0]:
                    window_start, count = now, 0
                else:
                    window_start, count = row
                if count >= limit:
                    retry_after: Optional[float] = window_start + window_s - now
                else:
                    retry_after = None
                    connection.execute(
                        "INSERT OR REPLACE INTO rate_windows (instance_id, window_start, count)"
                        " VALUES (?, ?, ?)",
                        (instance_id, window_start, count + 1),
                    )
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        return retry_after

    def close(self) -> None:
        """Close every idle connection; ones in use are closed when handed back."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
