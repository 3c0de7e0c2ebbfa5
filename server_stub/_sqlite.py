"""SQLite storage (the default): WAL mode, a small connection pool, dedup by ``payload_id``.

Standard library only. Stats are computed from every stored payload on each
call with ``aggregate_keys``; rate-limit windows live in the database, so
several processes sharing one file share one limit.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from ._group_commit import GroupCommit
from ._rollups import ADD_PENDING, FOLD_EVERY, fold_pending, rollup_schema
from ._storage import (
    RATE_WINDOW_PRUNE_INTERVAL,
    PayloadRecord,
    StoredPayload,
    aggregate_keys,
    saturate,
    stored_payload,
)

__all__ = ["SQLiteRunner", "SQLiteStore"]

logger = logging.getLogger("server_stub")

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
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""
_POLICY_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_changes (
    seq        INTEGER PRIMARY KEY,
    changed_at TEXT NOT NULL,   -- RFC 3339 UTC
    source     TEXT NOT NULL,   -- http, file or api
    policy     TEXT NOT NULL    -- the whole policy after the change, as JSON
)
"""
# 1: payloads and rate-limit windows (a database without schema_version is one);
# 2: the stored policy and the rollups, backfilled from the stored payloads.
SQLITE_SCHEMA_VERSION = 2
_SELECT_PENDING = """
SELECT p.seq, p.instance_id, p.sent_at, p.received_at, p.data, p.dropped
FROM rollup_pending AS r JOIN payloads AS p ON p.seq = r.seq ORDER BY r.seq LIMIT ?
"""


def _migrate(connection: sqlite3.Connection) -> int:
    """Bring a SQLite database to ``SQLITE_SCHEMA_VERSION``; the version found before."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row[0] is not None else 1
        if found > SQLITE_SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {found} is newer than this server's"
                f" ({SQLITE_SCHEMA_VERSION})"
            )
        if found < 2:
            connection.execute(_POLICY_SCHEMA)
            for statement in rollup_schema(sqlite=True):
                connection.execute(statement)
            # Backfill: every payload stored so far is pending, and folded now.
            connection.execute("INSERT INTO rollup_pending (seq) SELECT seq FROM payloads")
            count = fold_pending(SQLiteRunner(connection), _SELECT_PENDING)
            if count:
                logger.info("rollups built for %d stored payloads", count)
        if found < SQLITE_SCHEMA_VERSION:
            connection.execute("DELETE FROM schema_version")
            connection.execute("INSERT INTO schema_version VALUES (?)", (SQLITE_SCHEMA_VERSION,))
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return found


class SQLiteRunner:
    """A ``Runner`` on a ``sqlite3`` connection (the caller holds the transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.connection.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.connection.executemany(sql, rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()

_INSERT = (
    "INSERT OR IGNORE INTO payloads"
    " (payload_id, instance_id, sent_at, received_at, data, client, dropped)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


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
        self._pruned_at: Optional[float] = None
        self._commits = GroupCommit(self._add_batch)
        connection = self._connect()
        connection.executescript(_SCHEMA)
        _migrate(connection)
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
        return self._commits.submit(record)

    def _add_batch(self, records: Sequence[PayloadRecord]) -> List[bool]:
        """Insert ``records`` in one transaction, in order; whether each was new.

        Each new payload is also queued for the rollups, which take it in with the
        next fold: every ``FOLD_EVERY`` payloads, or before the next query.
        """
        rows = [
            (
                record.payload_id,
                record.instance_id,
                record.timestamp,
                record.received_at,
                json.dumps(record.data, separators=(",", ":")),
                json.dumps(record.client, separators=(",", ":"))
                if record.client is not None
                else None,
                record.dropped,
            )
            for record in records
        ]
        stored: List[bool] = []
        with self.writing() as run:
            connection = run.connection
            fold = False
            for row in rows:
                cursor = connection.execute(_INSERT, row)
                stored.append(cursor.rowcount == 1)
                if cursor.rowcount == 1:
                    seq = cursor.lastrowid
                    assert seq is not None
                    connection.execute(ADD_PENDING, (seq,))
                    fold = fold or seq % FOLD_EVERY == 0
            if fold:
                fold_pending(run, _SELECT_PENDING)
        return stored

    def fold_rollups(self) -> int:
        """Add the payloads stored since the last fold to the rollups; how many."""
        with self._connection() as connection:
            pending = connection.execute("SELECT 1 FROM rollup_pending LIMIT 1").fetchone()
        if pending is None:
            return 0
        with self.writing() as run:
            return fold_pending(run, _SELECT_PENDING)

    @contextmanager
    def writing(self) -> Iterator[SQLiteRunner]:
        """A write transaction (``BEGIN IMMEDIATE``), one at a time in this process."""
        with self._writing() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield SQLiteRunner(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[SQLiteRunner]:
        """A read transaction: every statement in it sees one snapshot."""
        with self._connection() as connection:
            connection.execute("BEGIN")
            try:
                yield SQLiteRunner(connection)
            finally:
                connection.execute("COMMIT")

    def stats(self) -> dict[str, Any]:
        # Computed from every stored payload on each call: exact and simple, and
        # fast enough for a reference server (a few seconds per million rows).
        with self._connection() as connection:
            # One read transaction, so the counts and the key totals agree.
            connection.execute("BEGIN")
            try:
                (instances,) = connection.execute(
                    "SELECT COUNT(DISTINCT instance_id) FROM payloads"
                ).fetchone()
                rows = connection.execute("SELECT data, dropped FROM payloads ORDER BY seq")
                # Summed here, not by SQLite's SUM(), which fails on int64 overflow.
                totals = [0, 0]

                def datas() -> Iterator[dict[str, Any]]:
                    for data, dropped in rows:
                        totals[0] += 1
                        totals[1] += dropped
                        yield json.loads(data)

                keys = aggregate_keys(datas())
            finally:
                connection.execute("COMMIT")
        payloads, dropped = totals
        return {
            "instances": instances,
            "payloads": payloads,
            "dropped": saturate(dropped),
            "keys": keys,
        }

    def instance_payloads(self, instance_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT payload_id, sent_at, received_at, data, client FROM payloads"
                " WHERE instance_id = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                (instance_id, limit, offset),
            ).fetchall()
        return [
            stored_payload(
                payload_id, sent_at, received_at, json.loads(data), _json_or_none(client)
            )
            for payload_id, sent_at, received_at, data, client in rows
        ]

    def instance_page(
        self, instance_id: str, limit: int, offset: int, max_bytes: int
    ) -> tuple[list[StoredPayload], bool]:
        page: list[StoredPayload] = []
        size = 0
        with self._connection() as connection:
            # Rows are fetched one at a time, so a page of big payloads stops in time.
            rows = connection.execute(
                "SELECT payload_id, sent_at, received_at, data, client FROM payloads"
                " WHERE instance_id = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                (instance_id, limit + 1, offset),
            )
            for row in rows:
                stored = StoredPayload(*row)
                if len(page) == limit or (page and size + stored.size > max_bytes):
                    return page, True
                page.append(stored)
                size += stored.size
        return page, False

    def storage_bytes(self) -> int:
        with self._connection() as connection:
            (pages,) = connection.execute("PRAGMA page_count").fetchone()
            (page_size,) = connection.execute("PRAGMA page_size").fetchone()
            (free,) = connection.execute("PRAGMA freelist_count").fetchone()
        return int((pages - free) * page_size)

    def all_payloads(self) -> list[dict[str, Any]]:
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT payload_id, instance_id, sent_at, received_at, data, client"
                " FROM payloads ORDER BY seq"
            ).fetchall()
        return [
            stored_payload(
                payload_id,
                sent_at,
                received_at,
                json.loads(data),
                _json_or_none(client),
                instance_id=instance_id,
            )
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
                if self._pruned_at is None or not 0 <= now - self._pruned_at < max(
                    window_s, RATE_WINDOW_PRUNE_INTERVAL
                ):
                    self._pruned_at = now
                    connection.execute(
                        "DELETE FROM rate_windows WHERE window_start + ? <= ? OR window_start > ?",
                        (window_s, now, now),
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


def _json_or_none(text: Optional[str]) -> Any:
    return json.loads(text) if text is not None else None
