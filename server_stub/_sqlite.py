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
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ._group_commit import GroupCommit
from ._rollups import (
    FOLD_AT_ONCE_BYTES,
    FOLD_BATCH,
    FOLD_EVERY,
    PreparedFold,
    fold_pending,
    rollup_schema,
)
from ._storage import (
    RATE_WINDOW_PRUNE_INTERVAL,
    EventQuery,
    EventRecord,
    PayloadRecord,
    Runner,
    StoredPayload,
    aggregate_keys,
    count_tree,
    encode_compact,
    event_filters,
    event_row,
    format_time,
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
# 2: the stored policy and the rollups, backfilled from the stored payloads;
# 3: events, once per (instance_id, event_id), and their hourly counts;
# 4: no rollup_pending queue: pending is every payload after rollup_folded.upto.
SQLITE_SCHEMA_VERSION = 4
_EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,  -- arrival order
    instance_id TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    event_time  TEXT NOT NULL,        -- UTC, as the client sent it (normalized)
    counted_at  TEXT NOT NULL,        -- event_time, or the arrival if that is earlier
    event_type  TEXT NOT NULL,
    event_name  TEXT NOT NULL,
    attrs       TEXT NOT NULL,        -- JSON object
    payload_id  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (instance_id, event_id)
);
-- /v1/events newest first: all, by type (and name), by instance.
CREATE INDEX IF NOT EXISTS events_by_time ON events (counted_at, seq);
CREATE INDEX IF NOT EXISTS events_by_name ON events (event_type, event_name, counted_at, seq);
CREATE INDEX IF NOT EXISTS events_by_instance ON events (instance_id, counted_at, seq);
CREATE TABLE IF NOT EXISTS event_counts (
    hour       TEXT NOT NULL,         -- the hour's start, in counted_at's form
    event_type TEXT NOT NULL,
    event_name TEXT NOT NULL,
    count      INTEGER NOT NULL,
    PRIMARY KEY (hour, event_type, event_name)
);
"""
# Every event ever counted: the window of stats().
_ALL_TIME = ("0001-01-01T00:00:00.000000Z", "9999-12-31T23:59:59.999999Z")
# Payloads get their seq from SQLite's single writer, one more than the largest
# (none is ever deleted), so seqs are in commit order: every payload up to
# ``upto`` is in the rollups, and so are the few after it in
# ``rollup_folded_early`` (large ones, folded as they were stored).
_FOLDED_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rollup_folded (upto INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rollup_folded_early (seq INTEGER PRIMARY KEY)",
    # What the queue table of schema versions 2 and 3 held, for inspection.
    "CREATE VIEW IF NOT EXISTS rollup_pending AS SELECT seq FROM payloads"
    " WHERE seq > (SELECT upto FROM rollup_folded)"
    " AND seq NOT IN (SELECT seq FROM rollup_folded_early)",
)
_SELECT_PENDING = """
SELECT seq, instance_id, sent_at, received_at, data, dropped FROM payloads
WHERE seq > (SELECT upto FROM rollup_folded) AND seq NOT IN (SELECT seq FROM rollup_folded_early)
ORDER BY seq LIMIT ?
"""
# _SELECT_PENDING without the data, all rows as one JSON text: one step of the
# statement, where each row would be one (and each step lets go of the GIL).
_SELECT_PENDING_HEADS = """
SELECT json_group_array(json_array(seq, instance_id, sent_at, received_at, payload_id, dropped))
FROM (SELECT seq, instance_id, sent_at, received_at, payload_id, dropped FROM payloads
WHERE seq > (SELECT upto FROM rollup_folded) AND seq NOT IN (SELECT seq FROM rollup_folded_early)
ORDER BY seq LIMIT ?)
"""
_SEQS_PER_SELECT = 500
# Schema versions 2 and 3: the rollup_pending queue table.
_SELECT_QUEUED = """
SELECT p.seq, p.instance_id, p.sent_at, p.received_at, p.data, p.dropped
FROM rollup_pending AS r JOIN payloads AS p ON p.seq = r.seq ORDER BY r.seq LIMIT ?
"""


_MARK_WITHIN_STORED = (
    "UPDATE rollup_folded SET upto = (SELECT coalesce(max(seq), 0) FROM payloads)"
    " WHERE upto > (SELECT coalesce(max(seq), 0) FROM payloads)"
)


def _mark_folded(run: Runner, seqs: List[int]) -> None:
    """``fold_pending``'s ``mark_folded`` for SQLite: every payload up to the last of
    ``seqs`` (the oldest pending ones, in order) is now folded."""
    upto = seqs[-1]
    run.execute("UPDATE rollup_folded SET upto = ?", (upto,))
    run.execute("DELETE FROM rollup_folded_early WHERE seq <= ?", (upto,))


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
        run = SQLiteRunner(connection)
        if found < 2:
            connection.execute(_POLICY_SCHEMA)
            for statement in rollup_schema(sqlite=True):
                connection.execute(statement)
        if found < 3:
            for statement in _EVENTS_SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
        if found < 4:
            if found >= 2:
                # Fold what the queue holds: then every stored payload is folded.
                fold_pending(run, _SELECT_QUEUED)
                connection.execute("DROP TABLE rollup_pending")
                (upto,) = connection.execute(
                    "SELECT coalesce(max(seq), 0) FROM payloads"
                ).fetchone()
            else:
                upto = 0  # a database from before rollups: every payload is pending
            for statement in _FOLDED_SCHEMA:
                connection.execute(statement)
            connection.execute("DELETE FROM rollup_folded")
            connection.execute("INSERT INTO rollup_folded (upto) VALUES (?)", (upto,))
            if found < 2:
                # Backfill: every payload stored so far is folded now.
                count = fold_pending(run, _SELECT_PENDING, mark_folded=_mark_folded)
                if count:
                    logger.info("rollups built for %d stored payloads", count)
        # A new payload's seq is one more than the largest stored: if someone deleted
        # the newest payloads, the folded mark must come back down to it, or new
        # payloads would take seqs it already covers and never be folded.
        connection.execute(_MARK_WITHIN_STORED)
        connection.execute(
            "DELETE FROM rollup_folded_early"
            " WHERE seq > (SELECT coalesce(max(seq), 0) FROM payloads)"
        )
        if found < SQLITE_SCHEMA_VERSION:
            connection.execute("DELETE FROM schema_version")
            connection.execute("INSERT INTO schema_version VALUES (?)", (SQLITE_SCHEMA_VERSION,))
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return found


class _WriteTransaction:
    """``SQLiteStore.writing()``: a class, not nested generator-based context managers,
    as it is entered for every batch of payloads stored and they cost a few µs each."""

    __slots__ = ("_connection", "_store")

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def __enter__(self) -> SQLiteRunner:
        self._connection = self._store._begin_write()
        return SQLiteRunner(self._connection)

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._store._end_write(self._connection, commit=kind is None)


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
_INSERT_MANY: Dict[int, str] = {}  # rows -> one INSERT of that many rows


def _insert(connection: sqlite3.Connection, rows: Sequence[Tuple[Any, ...]]) -> List[Optional[int]]:
    """Insert ``rows`` (``_INSERT``'s parameters) in order; each one's ``seq``, or None
    where its ``payload_id`` was stored already (or earlier in ``rows``).

    Several rows go in one statement: each statement lets go of the GIL and waits to
    take it back, which costs more than the statement when other threads are busy.
    Nor does it return the new rows (``RETURNING``): each row returned would be one
    more such step. A new row's ``seq`` is one more than the largest stored (none is
    ever deleted), so when every row is new their seqs are the last ``len(rows)``
    up to the last one inserted; only a batch with repeated ids asks which are new.
    """
    if len(rows) == 1:
        cursor = connection.execute(_INSERT, rows[0])
        return [cursor.lastrowid if cursor.rowcount == 1 else None]
    sql = _INSERT_MANY.get(len(rows))
    if sql is None:
        sql = _INSERT_MANY[len(rows)] = _INSERT + ", (?, ?, ?, ?, ?, ?, ?)" * (len(rows) - 1)
    cursor = connection.execute(sql, [value for row in rows for value in row])
    added, last = cursor.rowcount, cursor.lastrowid
    if added <= 0 or last is None:
        return [None] * len(rows)
    first = last - added + 1
    if added == len(rows):
        return list(range(first, last + 1))
    # Some were stored already: the new rows are the ones at ``first`` or later.
    ids = list(dict.fromkeys(row[0] for row in rows))
    stored: Dict[str, int] = {}
    for start in range(0, len(ids), _IDS_PER_SELECT):
        chunk = ids[start : start + _IDS_PER_SELECT]
        stored.update(
            connection.execute(
                "SELECT payload_id, seq FROM payloads"  # noqa: S608 - placeholders only
                f" WHERE payload_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
        )
    # pop: a payload_id repeated within the batch is new only the first time
    seqs = [stored.pop(row[0], None) for row in rows]
    return [seq if seq is not None and seq >= first else None for seq in seqs]


_IDS_PER_SELECT = 500


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
        self._writer: Optional[sqlite3.Connection] = None  # kept by _end_write
        self._closed = False
        self._pruned_at: Optional[float] = None
        self._commits = GroupCommit(self._add_batch)
        # The data of payloads this process stored and no fold has taken in yet, as
        # the request decoded it, by seq with the payload_id stored there: the fold
        # need not read it back nor decode it again (writers only).
        self._parsed: Dict[int, Tuple[str, Mapping[str, Any]]] = {}
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

        Each new payload is pending for the rollups, which take it in with the
        next fold: every ``FOLD_EVERY`` payloads, or before the next query. A
        payload of over ``FOLD_AT_ONCE_BYTES`` of data is folded in this
        transaction instead, its values encoded before it (``PreparedFold``), so
        that no fold holds the writer (or the GIL) long to decode and encode it.
        """
        rows: List[Tuple[Any, ...]] = []
        alone = True  # nothing to write beside the rows
        for record in records:
            data = encode_compact(record.data)
            client = record.client
            rows.append((
                record.payload_id, record.instance_id, record.timestamp, record.received_at,
                data, None if client is None else encode_compact(client), record.dropped,
            ))
            if record.events or len(data) > FOLD_AT_ONCE_BYTES:
                alone = False
        if alone:
            return self._insert_alone(rows, records)
        prepared = [
            PreparedFold(record.data) if len(row[4]) > FOLD_AT_ONCE_BYTES else None
            for record, row in zip(records, rows)
        ]
        stored: List[bool] = []
        with self.writing() as run:
            connection = run.connection
            fold = False
            seqs = _insert(connection, rows)
            for record, row, at_once, seq in zip(records, rows, prepared, seqs):
                stored.append(seq is not None)
                if seq is not None:
                    if at_once is not None:
                        at_once.write(
                            run,
                            seq,
                            record.instance_id,
                            timestamp=record.timestamp,
                            received_at=record.received_at,
                            dropped=record.dropped,
                        )
                        connection.execute(
                            "INSERT INTO rollup_folded_early (seq) VALUES (?)", (seq,)
                        )
                    else:
                        self._parsed[seq] = (row[0], record.data)
                    _insert_events(connection, record.events)
                    fold = fold or seq % FOLD_EVERY == 0
            if fold:
                self._fold(run)
        if len(self._parsed) > FOLD_BATCH:  # another process folded them
            self._parsed.clear()
        return stored

    def _insert_alone(
        self, rows: Sequence[Tuple[Any, ...]], records: Sequence[PayloadRecord]
    ) -> List[bool]:
        """``_add_batch`` for payloads with nothing to write beside their rows: one
        INSERT, its own transaction (SQLite commits it before it returns), which
        spares a BEGIN and a COMMIT and the GIL hand-overs each one costs."""
        connection = self._take_writer()
        try:
            seqs = _insert(connection, rows)
        finally:
            self._give_back_writer(connection)
        fold = False
        for record, row, seq in zip(records, rows, seqs):
            if seq is not None:
                self._parsed[seq] = (row[0], record.data)
                fold = fold or seq % FOLD_EVERY == 0
        if fold:
            # Committed already: a fold that fails now is retried by the next one.
            try:
                with self.writing() as run:
                    self._fold(run)
            except Exception:
                logger.exception("folding stored payloads into the rollups failed")
        elif len(self._parsed) > FOLD_BATCH:  # another process folded them
            self._parsed.clear()
        return [seq is not None for seq in seqs]

    def _fold(self, run: SQLiteRunner) -> int:
        try:
            return fold_pending(run, self._pending, mark_folded=_mark_folded)
        finally:
            self._parsed.clear()

    def _pending(self, run: Runner, limit: int) -> List[Tuple[Any, ...]]:
        """``_SELECT_PENDING``'s rows, the data of those this process holds (``_parsed``)
        as it holds it: read in a few steps, not one per row."""
        assert isinstance(run, SQLiteRunner)
        connection = run.connection
        (heads,) = connection.execute(_SELECT_PENDING_HEADS, (limit,)).fetchone()
        rows: List[List[Any]] = json.loads(heads)
        rows.sort()  # by seq (unique): the aggregate need not keep the subquery's order
        missing: Dict[int, List[Any]] = {}
        for row in rows:
            held = self._parsed.get(row[0])
            if held is not None and held[0] == row[4]:  # the payload this process stored
                row[4] = held[1]
            else:
                missing[row[0]] = row
        seqs = list(missing)
        for start in range(0, len(seqs), _SEQS_PER_SELECT):
            chunk = seqs[start : start + _SEQS_PER_SELECT]
            for seq, data in connection.execute(
                "SELECT seq, data FROM payloads"  # noqa: S608 - placeholders only
                f" WHERE seq IN ({', '.join('?' * len(chunk))})",
                chunk,
            ):
                missing[seq][4] = data
        return [tuple(row) for row in rows]

    def fold_rollups(self) -> int:
        """Add the payloads stored since the last fold to the rollups; how many."""
        with self._connection() as connection:
            pending = connection.execute("SELECT 1 FROM rollup_pending LIMIT 1").fetchone()
        if pending is None:
            return 0
        with self.writing() as run:
            return self._fold(run)

    def writing(self) -> _WriteTransaction:
        """A write transaction (``BEGIN IMMEDIATE``), one at a time in this process."""
        return _WriteTransaction(self)

    def _begin_write(self) -> sqlite3.Connection:
        """Take the write lock and a connection, and begin a write transaction on it."""
        connection = self._take_writer()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._give_back_writer(connection)
            raise
        return connection

    def _end_write(self, connection: sqlite3.Connection, *, commit: bool) -> None:
        """Commit (or roll back) what ``_begin_write`` began, and give back what it took."""
        try:
            connection.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            self._give_back_writer(connection)

    def _take_writer(self) -> sqlite3.Connection:
        """Take the write lock and the connection to write with.

        A file database keeps the connection of the last write for the next one
        (only one write runs at a time in this process): no trip through the
        pool, and its page cache stays valid while no other process writes.
        """
        self._write_lock.acquire()
        try:
            connection = self._writer
            self._writer = None
            if connection is None:
                connection = self._acquire()
            elif self._closed:
                connection.close()
                raise RuntimeError("store is closed")
        except BaseException:
            self._write_lock.release()
            raise
        return connection

    def _give_back_writer(self, connection: sqlite3.Connection) -> None:
        """Keep (or hand back to the pool) what ``_take_writer`` took; release the lock."""
        try:
            if self._memory or self._closed or connection.in_transaction:
                self._release(connection)
            else:
                self._writer = connection
        finally:
            self._write_lock.release()

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
                events = _event_counts(connection, *_ALL_TIME)
            finally:
                connection.execute("COMMIT")
        payloads, dropped = totals
        return {
            "instances": instances,
            "payloads": payloads,
            "dropped": saturate(dropped),
            "keys": keys,
            "events": events,
        }

    def events(self, query: EventQuery) -> list[dict[str, Any]]:
        with self._connection() as connection:
            return _query_events(connection, query)

    def event_counts(self, since: str, until: str) -> dict[str, dict[str, int]]:
        with self._connection() as connection:
            return _event_counts(connection, since, until)

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
        if self._write_lock.acquire(blocking=False):  # else the writer closes it
            try:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            finally:
                self._write_lock.release()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break


def _json_or_none(text: Optional[str]) -> Any:
    return json.loads(text) if text is not None else None


_HOUR_SUFFIX = ":00:00.000000Z"
_LOOKUP_BATCH = 500  # event ids per look-up (SQLite allows 999 parameters at least)


def _hour_of(moment: str) -> str:
    """The start of the hour holding ``moment`` (both in ``format_time``'s form)."""
    return moment[:13] + _HOUR_SUFFIX


def _next_hour_start(moment: str) -> str:
    """The first hour start at or after ``moment``."""
    start = _hour_of(moment)
    if start == moment:
        return start
    return format_time(
        datetime.fromisoformat(start[:-1]).replace(tzinfo=timezone.utc) + timedelta(hours=1)
    )


def _insert_events(connection: sqlite3.Connection, events: Sequence[EventRecord]) -> int:
    """Insert the events not stored yet and count them per hour; how many were new.

    Runs inside the caller's write transaction (with the payload's row), so
    nothing can store the same events between the look-up and the insert.
    """
    if not events:
        return 0
    instance_id = events[0].instance_id
    stored: Set[str] = set()
    ids = [event.event_id for event in events]
    for start in range(0, len(ids), _LOOKUP_BATCH):
        batch = ids[start : start + _LOOKUP_BATCH]
        marks = ",".join("?" * len(batch))
        stored.update(
            event_id
            for (event_id,) in connection.execute(
                f"SELECT event_id FROM events WHERE instance_id = ? AND event_id IN ({marks})",  # noqa: S608
                (instance_id, *batch),
            )
        )
    new: List[EventRecord] = []
    for event in events:
        if event.event_id not in stored:
            stored.add(event.event_id)  # a payload may carry the same event twice
            new.append(event)
    connection.executemany(
        "INSERT INTO events (instance_id, event_id, event_time, counted_at,"
        " event_type, event_name, attrs, payload_id, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                event.instance_id, event.event_id, event.event_time, event.counted_at,
                event.event_type, event.event_name,
                json.dumps(event.attrs, separators=(",", ":")), event.payload_id,
                event.received_at,
            )
            for event in new
        ],
    )
    counts = Counter((_hour_of(event.counted_at), event.event_type, event.event_name)
                     for event in new)
    connection.executemany(
        "INSERT INTO event_counts (hour, event_type, event_name, count) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (hour, event_type, event_name) DO UPDATE SET count = count + excluded.count",
        [(*key, count) for key, count in sorted(counts.items())],
    )
    return len(new)


def _query_events(connection: sqlite3.Connection, query: EventQuery) -> List[Dict[str, Any]]:
    """The page of events ``query`` asks for, newest first."""
    conditions, parameters = event_filters(query, "?")
    # The conditions are constants; values are parameters.
    sql = (
        "SELECT instance_id, event_id, event_time, event_type, event_name, attrs, received_at"  # noqa: S608
        f" FROM events WHERE {' AND '.join(conditions)}"
        " ORDER BY counted_at DESC, seq DESC LIMIT ? OFFSET ?"
    )
    rows = connection.execute(sql, (*parameters, query.limit, query.offset)).fetchall()
    return [
        event_row(instance_id, event_id, event_time, event_type, event_name, json.loads(attrs),
                  received_at)
        for instance_id, event_id, event_time, event_type, event_name, attrs, received_at in rows
    ]


def _event_counts(
    connection: sqlite3.Connection, since: str, until: str
) -> Dict[str, Dict[str, int]]:
    """``{type: {name: count}}`` of the events counted in ``[since, until)``.

    Whole hours come from ``event_counts``; the parts of an hour at either end
    of the window, from the events themselves (at most an hour's worth each).
    """
    totals: Counter[Tuple[str, str]] = Counter()

    def from_events(start: str, end: str) -> None:
        for event_type, event_name, count in connection.execute(
            "SELECT event_type, event_name, count(*) FROM events"
            " WHERE counted_at >= ? AND counted_at < ? GROUP BY event_type, event_name",
            (start, end),
        ):
            totals[(event_type, event_name)] += count

    first_hour, last_hour = _next_hour_start(since), _hour_of(until)
    if first_hour < last_hour:
        for event_type, event_name, count in connection.execute(
            "SELECT event_type, event_name, sum(count) FROM event_counts"
            " WHERE hour >= ? AND hour < ? GROUP BY event_type, event_name",
            (first_hour, last_hour),
        ):
            totals[(event_type, event_name)] += count
        from_events(since, first_hour)
        from_events(last_hour, until)
    else:
        from_events(since, until)
    return count_tree((t, n, c) for (t, n), c in totals.items())
