"""SQLite storage (the default): WAL mode, a small connection pool, dedup by ``payload_id``.

Standard library only. Stats are computed from every stored payload on each
call with ``aggregate_keys``; rate-limit windows live in the database, so
several processes sharing one file share one limit.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence

from ._group_commit import GroupCommit
from ._storage import (
    RATE_WINDOW_PRUNE_INTERVAL,
    PayloadRecord,
    StoredPayload,
    aggregate_keys,
    saturate,
    stored_payload,
)

__all__ = ["SQLiteStore"]

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
        """Insert ``records`` in one transaction, in order; whether each was new."""
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
        with self._writing() as connection:
            if len(rows) == 1:  # one statement is a transaction of its own
                return [connection.execute(_INSERT, rows[0]).rowcount == 1]
            connection.execute("BEGIN IMMEDIATE")
            try:
                stored = [connection.execute(_INSERT, row).rowcount == 1 for row in rows]
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
