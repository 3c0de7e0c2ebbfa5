"""PostgreSQL storage, for several worker processes (or machines) sharing one database.

``PostgresStore`` implements the ``Store`` seam with psycopg 3 and a
``psycopg_pool.ConnectionPool``; both are imported only when one is created, so
the server still runs on the standard library alone with SQLite. Install them
with the ``postgres`` extra.

- The schema is created or migrated when a store is created, under a
  transaction-scoped advisory lock, so several workers starting at once
  migrate it exactly once; ``schema_version`` holds the version.
- Everything the workers must share lives in the database: payloads
  (deduplicated by ``payload_id`` with ``ON CONFLICT DO NOTHING``) and the
  per-instance rate-limit windows (one atomic upsert per accepted payload).
- ``stats()`` is computed by PostgreSQL with jsonb functions and gives exactly
  what ``aggregate_keys`` gives over the same payloads (one difference that
  jsonb imposes: it has no negative zero, so ``-0.0`` is stored as ``0.0``).
- jsonb cannot hold ``\\u0000`` or an unpaired surrogate; a payload containing
  one is refused with ``UnstorablePayload``.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ._group_commit import GroupCommit
from ._rollups import FOLD_EVERY, fold_pending, rollup_schema
from ._storage import (
    INT64_MAX,
    INT64_MIN,
    RATE_WINDOW_PRUNE_INTERVAL,
    EventQuery,
    EventRecord,
    PayloadRecord,
    StoredPayload,
    UnstorablePayload,
    count_tree,
    encode_compact,
    event_filters,
    event_row,
    redact_url,
    saturate,
    stored_payload,
    value_identity,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["SCHEMA_VERSION", "PostgresRunner", "PostgresStore", "migrate"]

# pg_advisory_xact_lock key for migrations: any constant unlikely to be used by
# another application on the same database ("telemetry" in ASCII).
_MIGRATION_LOCK = 0x74656C656D657472

_EVENTS_MIGRATION = """
    CREATE TABLE events (
        seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- arrival order
        instance_id text NOT NULL,
        event_id    text NOT NULL,
        event_time  timestamptz NOT NULL,
        counted_at  timestamptz NOT NULL,  -- event_time, or the arrival if that is earlier
        event_type  text NOT NULL,
        event_name  text NOT NULL,
        attrs       jsonb NOT NULL,
        payload_id  text NOT NULL,
        received_at timestamptz NOT NULL,
        UNIQUE (instance_id, event_id)
    );
    -- /v1/events newest first: all, by type (and name), by instance.
    CREATE INDEX events_by_time ON events (counted_at, seq);
    CREATE INDEX events_by_name ON events (event_type, event_name, counted_at, seq);
    CREATE INDEX events_by_instance ON events (instance_id, counted_at, seq);
    CREATE TABLE event_counts (
        hour       timestamptz NOT NULL,
        event_type text NOT NULL,
        event_name text NOT NULL,
        count      bigint NOT NULL,
        PRIMARY KEY (hour, event_type, event_name)
    );
"""
"""Appended to ``_MIGRATIONS``: a database made before events gains their tables."""

_MIGRATIONS: Tuple[str, ...] = (
    # 1: payloads and rate-limit windows.
    """
    CREATE TABLE payloads (
        seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- received order
        payload_id  text NOT NULL UNIQUE,
        instance_id text NOT NULL,
        sent_at     text NOT NULL,         -- the client's RFC 3339 timestamp, as sent
        received_at timestamptz NOT NULL,
        data        jsonb NOT NULL,
        client      jsonb,
        dropped     bigint NOT NULL DEFAULT 0
    );
    -- /v1/instances/<uuid> (newest first, paged) and COUNT(DISTINCT instance_id).
    CREATE INDEX payloads_by_instance ON payloads (instance_id, seq);
    CREATE TABLE rate_windows (
        instance_id  text PRIMARY KEY,
        window_start double precision NOT NULL,
        count        bigint NOT NULL       -- payloads accepted in this window
    );
    """,
    # 2: the stored policy and the rollups (backfilled from stored payloads by migrate()).
    """
    CREATE TABLE policy_changes (
        seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        changed_at text NOT NULL,   -- RFC 3339 UTC
        source     text NOT NULL,   -- http, file or api
        policy     text NOT NULL    -- the whole policy after the change, as JSON
    );
    """
    + ";\n".join(rollup_schema(sqlite=False)),
    # 3: events, once per (instance_id, event_id), and their hourly counts.
    _EVENTS_MIGRATION,
)
_ROLLUPS_SINCE = 2
SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this code creates and expects."""

# Every event ever counted: the window of stats().
_ALL_TIME = ("0001-01-01T00:00:00.000000Z", "9999-12-31T23:59:59.999999Z")

_INSERT_ONE = """
INSERT INTO payloads (payload_id, instance_id, sent_at, received_at, data, client, dropped)
VALUES (%s, %s, %s, %s::timestamptz, %s::jsonb, %s::jsonb, %s)
ON CONFLICT (payload_id) DO NOTHING
RETURNING seq
"""
# pg_advisory_xact_lock keys serialising writing() transactions (policy changes),
# and folds of pending payloads into the rollups.
_WRITE_LOCK = _MIGRATION_LOCK + 1
_FOLD_LOCK = _MIGRATION_LOCK + 2
_SELECT_PENDING = """
SELECT p.seq, p.instance_id, p.sent_at,
       to_char(p.received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       p.data, p.dropped
FROM rollup_pending AS r JOIN payloads AS p ON p.seq = r.seq ORDER BY r.seq LIMIT ?
"""
# Many payloads in one statement: one array per column, one row per payload, inserted
# in the order given (sorted by payload_id: see ``_add_batch``). One statement text
# whatever the batch size, so psycopg prepares it once.
_INSERT_MANY = """
INSERT INTO payloads (payload_id, instance_id, sent_at, received_at, data, client, dropped)
SELECT payload_id, instance_id, sent_at, received_at::timestamptz, data::jsonb,
       client::jsonb, dropped
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::bigint[])
     WITH ORDINALITY AS rows (payload_id, instance_id, sent_at, received_at, data, client,
                              dropped, position)
ORDER BY position
ON CONFLICT (payload_id) DO NOTHING
RETURNING payload_id, seq
"""
# Only PostgreSQL queues pending payloads (see _rollups).
_ADD_PENDING = "INSERT INTO rollup_pending (seq) VALUES (%s)"
_ADD_PENDING_MANY = "INSERT INTO rollup_pending (seq) SELECT unnest(%s::bigint[])"

# How aggregate_keys totals the value e.value: 'c' an integer counter (summed),
# 's' a counting set (merged), 'v' anything else (the latest wins). Integers are
# numbers written without a point: floats always have one (see _encode). Written
# out in the query rather than as an SQL function, which PostgreSQL would not
# inline (a call per value costs 5x the whole scan).
_VALUE_KIND = """CASE
    WHEN jsonb_typeof(e.value) = 'number' AND e.value::text ~ '^-?[0-9]+$' THEN 'c'
    WHEN jsonb_typeof(e.value) = 'array' AND jsonb_array_length(e.value) > 0
         AND NOT EXISTS (
             SELECT FROM jsonb_array_elements(e.value) AS item
             WHERE CASE WHEN jsonb_typeof(item) = 'object' THEN
                 item - 'value' - 'count' = '{}'::jsonb
                 AND item ? 'value' AND item ? 'count'
                 AND jsonb_typeof(item -> 'count') = 'number'
                 AND (item -> 'count')::text ~ '^-?[0-9]+$'
             ELSE false END IS NOT TRUE
         ) THEN 's'
    ELSE 'v'
END"""


def _saturated(total: str) -> str:
    """SQL for ``total`` clamped to signed 64 bits, as text (what ``saturate`` does)."""
    return f"least(greatest({total}, {INT64_MIN}), {INT64_MAX})::text"


# One row per key, or per distinct value of a counting-set key, in the shape of
# aggregate_keys: a key's total is made of its run, the payloads since it last
# changed kind. Only `latest` and `bounds` (a row per key and kind) are sorted.
_KEY_TOTALS = f"""
WITH entries AS (
    SELECT p.seq, e.key, e.value, {_VALUE_KIND} AS kind
    FROM payloads AS p CROSS JOIN LATERAL jsonb_each(p.data) AS e
),
latest AS (
    SELECT key, kind, max(seq) AS seq FROM entries GROUP BY key, kind
),
bounds AS (  -- per key: its last kind, when, and when it last had another kind
    SELECT key, kind, seq AS last_seq, COALESCE(since, 0) AS since
    FROM (
        SELECT key, kind, seq, row_number() OVER w AS rank, lead(seq) OVER w AS since
        FROM latest WINDOW w AS (PARTITION BY key ORDER BY seq DESC)
    ) AS ranked
    WHERE rank = 1
),
run AS (
    SELECT e.key, e.kind, e.value
    FROM entries AS e JOIN bounds AS b ON b.key = e.key AND b.kind = e.kind
    WHERE b.kind <> 'v' AND e.seq > b.since
)
SELECT e.key, e.kind, e.value::text, NULL
FROM entries AS e JOIN bounds AS b ON b.key = e.key AND b.last_seq = e.seq
WHERE b.kind = 'v'
UNION ALL
SELECT key, kind, NULL, {_saturated("sum(value::numeric)")}
FROM run WHERE kind = 'c' GROUP BY key, kind
UNION ALL
SELECT key, kind, (item -> 'value')::text, {_saturated("sum((item -> 'count')::numeric)")}
FROM run CROSS JOIN LATERAL jsonb_array_elements(run.value) AS item
WHERE kind = 's'
GROUP BY key, kind, (item -> 'value')::text
"""  # noqa: S608 - built from constants only

# A fixed window per instance, as SQLiteStore keeps it, counted in one atomic
# statement: it returns a row only when this payload is allowed (and counted).
_EXPIRED = (
    "(excluded.window_start >= w.window_start + %(window)s"
    " OR excluded.window_start < w.window_start)"
)
_CHECK_RATE = f"""
INSERT INTO rate_windows AS w (instance_id, window_start, count)
VALUES (%(instance_id)s, %(now)s, 1)
ON CONFLICT (instance_id) DO UPDATE SET
    window_start = CASE WHEN {_EXPIRED} THEN excluded.window_start ELSE w.window_start END,
    count = CASE WHEN {_EXPIRED} THEN 1 ELSE w.count + 1 END
WHERE {_EXPIRED} OR w.count < %(limit)s
RETURNING count
"""  # noqa: S608 - built from constants only

_ROW_COLUMNS = (
    "payload_id, sent_at,"
    """ to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), data, client"""
)

_TEXT_COLUMNS = (
    "payload_id, sent_at,"
    """ to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),"""
    " data::text, client::text"
)

# A JSON string (skipped), or a number Python wrote with a positive exponent.
_STRING_OR_EXPONENT = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9]+(?:\.[0-9]+)?e\+[0-9]+)')


def _encode(value: object) -> str:
    """JSON for a jsonb column, keeping floats floats.

    jsonb keeps numbers as ``numeric``: ``1e+16`` (how Python writes floats from
    1e16 up) would come back as the integer 10000000000000000 and be summed as a
    counter. Such numbers are written out in full with a ``.0``.
    """
    text = encode_compact(value)
    if "e+" in text:
        text = _STRING_OR_EXPONENT.sub(_positional, text)
    return text


def _positional(match: re.Match[str]) -> str:
    number = match.group(1)
    if number is None:
        return match.group(0)
    return format(Decimal(number), "f") + ".0"


def _import_driver() -> Tuple[Any, Any]:
    try:
        import psycopg  # noqa: PLC0415 - only PostgreSQL deployments need the driver
        import psycopg_pool  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            "PostgreSQL storage needs psycopg 3 and psycopg_pool: pip install 'telemetry[postgres]'"
        ) from exc
    return psycopg, psycopg_pool


def migrate(connection: psycopg.Connection[Any]) -> int:
    """Bring the schema on ``connection`` (its search path) to ``SCHEMA_VERSION``.

    Idempotent and safe to run from many processes at once: the whole check and
    migration is one transaction holding an advisory lock. Returns the version
    found before migrating (0 for an empty database). Raises ``RuntimeError``
    when the database was migrated by newer code.
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row is not None and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {found} is newer than this server's ({SCHEMA_VERSION})"
            )
        for ddl in _MIGRATIONS[found:]:
            connection.execute(ddl)
        if 0 < found < _ROLLUPS_SINCE:
            _backfill(connection)
        if found < SCHEMA_VERSION:
            connection.execute("DELETE FROM schema_version")
            connection.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
    return found


def _backfill(connection: psycopg.Connection[Any]) -> None:
    """Add the payloads stored before the rollups existed to them (inside migrate())."""
    connection.execute("INSERT INTO rollup_pending (seq) SELECT seq FROM payloads")
    fold_pending(PostgresRunner(connection), _SELECT_PENDING)


class PostgresRunner:
    """A ``Runner`` on a psycopg 3 connection (the caller holds the transaction)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        rowcount: int = self.connection.execute(sql.replace("?", "%s"), params).rowcount
        return rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        # Not prepared: a generic plan chosen without the window's bounds can be
        # far worse than planning each query (which takes about a millisecond).
        rows: List[Tuple[Any, ...]] = self.connection.execute(
            sql.replace("?", "%s"), params, prepare=False
        ).fetchall()
        return rows


class PostgresStore:
    """PostgreSQL storage through a connection pool, shared by threads of one process.

    The pool is created on first use in each process: a server that forks its
    workers after ``create_app()`` (``gunicorn --preload``) gives each worker
    its own connections. ``url`` is a libpq URL (``postgresql://user@host/db``;
    ``?options=-csearch_path%3Dname`` selects a schema).
    """

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 10.0
    ) -> None:
        """Connect once to create or migrate the schema (errors surface here, at start)."""
        self.url = url
        self._min_size = min_size
        self._max_size = max(min_size, max_size)
        self._timeout = timeout
        self._psycopg, self._psycopg_pool = _import_driver()
        self._lock = threading.Lock()
        self._pool: Optional[psycopg_pool.ConnectionPool[Any]] = None
        self._pool_pid = 0
        self._closed = False
        self._pruned_at: Optional[float] = None
        self._commits = GroupCommit(self._add_batch)
        with self._psycopg.connect(
            url, autocommit=True, connect_timeout=max(1, round(timeout))
        ) as connection:
            migrate(connection)

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    def _get_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        pid = os.getpid()
        with self._lock:
            if self._closed:
                raise RuntimeError("store is closed")
            if self._pool is None or self._pool_pid != pid:
                # A pool inherited through fork() is the parent's: its connections
                # and threads are not this process's to use (nor to close).
                self._pool = self._psycopg_pool.ConnectionPool(
                    self.url,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    kwargs={"autocommit": True},
                    timeout=self._timeout,
                    name="server_stub",
                    open=True,
                )
                self._pool_pid = pid
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._get_pool().connection() as connection:
            yield connection

    def add(self, record: PayloadRecord) -> bool:
        return self._commits.submit(record)

    def _add_batch(self, records: Sequence[PayloadRecord]) -> List[bool]:
        """Insert ``records`` in one transaction; whether each was new.

        Rows go in sorted by ``payload_id``: two workers inserting overlapping
        batches then take the unique index's row locks in the same order, and
        cannot deadlock. A ``payload_id`` twice in one batch is inserted once;
        the second is "already stored", as it would be one request later.
        """
        if len(records) == 1:  # the common case on a quiet server: no arrays to build
            return [self._add_one(records[0])]
        first: Dict[str, int] = {}  # payload_id -> where it first comes in ``records``
        for position, record in enumerate(records):
            first.setdefault(record.payload_id, position)
        batch = sorted((records[position] for position in first.values()),
                       key=lambda record: record.payload_id)
        columns = (
            [record.payload_id for record in batch],
            [record.instance_id for record in batch],
            [record.timestamp for record in batch],
            [record.received_at for record in batch],
            [_encode(record.data) for record in batch],
            [_encode(record.client) if record.client is not None else None for record in batch],
            [record.dropped for record in batch],
        )
        try:
            with self._connection() as connection, connection.transaction():
                inserted = dict(connection.execute(_INSERT_MANY, columns).fetchall())
                if inserted:
                    # The rollups take them in with the next fold (see _rollups).
                    seqs = sorted(inserted.values())
                    connection.execute(_ADD_PENDING_MANY, (seqs,))
                    # The events of the payloads stored now, in the batch's order
                    # (sorted by payload_id, so two workers take locks alike).
                    _insert_events(connection, [
                        event for record in batch if record.payload_id in inserted
                        for event in record.events
                    ])
                    if any(seq % FOLD_EVERY == 0 for seq in seqs):
                        self._fold(connection)
        except self._psycopg.DataError as exc:
            # \u0000 or an unpaired surrogate: jsonb cannot hold them.
            raise UnstorablePayload(str(exc).splitlines()[0]) from None
        return [
            record.payload_id in inserted and first[record.payload_id] == position
            for position, record in enumerate(records)
        ]

    def _add_one(self, record: PayloadRecord) -> bool:
        row = (
            record.payload_id,
            record.instance_id,
            record.timestamp,
            record.received_at,
            _encode(record.data),
            _encode(record.client) if record.client is not None else None,
            record.dropped,
        )
        try:
            with self._connection() as connection, connection.transaction():
                stored = connection.execute(_INSERT_ONE, row).fetchone()
                if stored is None:
                    return False
                seq = stored[0]
                # The rollups take it in with the next fold (see _rollups).
                connection.execute(_ADD_PENDING, (seq,))
                _insert_events(connection, record.events)
                if seq % FOLD_EVERY == 0:
                    self._fold(connection)
        except self._psycopg.DataError as exc:
            # \u0000 or an unpaired surrogate: jsonb cannot hold them.
            raise UnstorablePayload(str(exc).splitlines()[0]) from None
        return True

    def _fold(self, connection: psycopg.Connection[Any]) -> int:
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_FOLD_LOCK,))
        return fold_pending(PostgresRunner(connection), _SELECT_PENDING)

    def fold_rollups(self) -> int:
        """Add the payloads stored since the last fold to the rollups; how many."""
        with self._connection() as connection:
            if connection.execute("SELECT 1 FROM rollup_pending LIMIT 1").fetchone() is None:
                return 0
            with connection.transaction():
                return self._fold(connection)

    @contextmanager
    def writing(self) -> Iterator[PostgresRunner]:
        """A write transaction, one at a time across every process (an advisory lock)."""
        with self._connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            yield PostgresRunner(connection)

    @contextmanager
    def reading(self) -> Iterator[PostgresRunner]:
        """A read-only transaction on one snapshot."""
        with self._connection() as connection, connection.transaction():
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            connection.execute("SET LOCAL jit = off")
            yield PostgresRunner(connection)

    def stats(self) -> dict[str, Any]:
        with self._connection() as connection, connection.transaction():
            # One snapshot, so that the counts and the key totals agree.
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # jsonb_each's row estimates make the planner expect a huge query and
            # compile it (JIT): half a second lost on every call.
            connection.execute("SET LOCAL jit = off")
            row = connection.execute(
                "SELECT count(DISTINCT instance_id), count(*), COALESCE(sum(dropped), 0)"
                " FROM payloads"
            ).fetchone()
            assert row is not None
            instances, payloads, dropped = row
            key_rows = connection.execute(_KEY_TOTALS).fetchall()
            events = _event_counts(connection, *_ALL_TIME)
        return {
            "instances": instances,
            "payloads": payloads,
            "dropped": saturate(int(dropped)),
            "keys": _key_totals(key_rows),
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
                f"SELECT {_ROW_COLUMNS} FROM payloads"  # noqa: S608 - constants only
                " WHERE instance_id = %s ORDER BY seq DESC LIMIT %s OFFSET %s",
                (instance_id, limit, offset),
            ).fetchall()
        return [
            stored_payload(payload_id, sent_at, received_at, data, client)
            for payload_id, sent_at, received_at, data, client in rows
        ]

    def instance_page(
        self, instance_id: str, limit: int, offset: int, max_bytes: int
    ) -> tuple[list[StoredPayload], bool]:
        page: list[StoredPayload] = []
        size = 0
        # Fetched a few rows at a time, as text (never parsed): a page of big
        # payloads stops in time, and at most a batch of them is held at once.
        with self._connection() as connection:
            wanted = limit + 1
            while True:
                batch = min(wanted - len(page), 4)
                rows = connection.execute(
                    f"SELECT {_TEXT_COLUMNS} FROM payloads"  # noqa: S608 - constants only
                    " WHERE instance_id = %s ORDER BY seq DESC LIMIT %s OFFSET %s",
                    (instance_id, batch, offset + len(page)),
                ).fetchall()
                for row in rows:
                    stored = StoredPayload(*row)
                    if len(page) == limit or (page and size + stored.size > max_bytes):
                        return page, True
                    page.append(stored)
                    size += stored.size
                if len(rows) < batch:
                    return page, False

    def storage_bytes(self) -> int:
        with self._connection() as connection:
            row = connection.execute(
                "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c"
                " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')"
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def all_payloads(self) -> list[dict[str, Any]]:
        with self._connection() as connection:
            rows = connection.execute(
                f"SELECT instance_id, {_ROW_COLUMNS} FROM payloads ORDER BY seq"  # noqa: S608
            ).fetchall()
        return [
            stored_payload(payload_id, sent_at, received_at, data, client, instance_id=instance_id)
            for instance_id, payload_id, sent_at, received_at, data, client in rows
        ]

    def check_rate(
        self, instance_id: str, limit: int, window_s: float, now: float
    ) -> Optional[float]:
        parameters = {"instance_id": instance_id, "now": now, "window": window_s, "limit": limit}
        with self._connection() as connection:
            with self._lock:
                prune = self._pruned_at is None or not 0 <= now - self._pruned_at < max(
                    window_s, RATE_WINDOW_PRUNE_INTERVAL
                )
                if prune:
                    self._pruned_at = now
            if prune:
                connection.execute(
                    "DELETE FROM rate_windows"
                    " WHERE window_start + %(window)s <= %(now)s OR window_start > %(now)s",
                    parameters,
                )
            if connection.execute(_CHECK_RATE, parameters).fetchone() is not None:
                return None
            # Refused: the only case that needs a second statement.
            row = connection.execute(
                "SELECT window_start FROM rate_windows WHERE instance_id = %s", (instance_id,)
            ).fetchone()
        window_start = float(row[0]) if row is not None else now
        return max(0.0, window_start + window_s - now)

    def close(self) -> None:
        """Close this process's pool (connections in use are closed when handed back)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()


def _key_totals(rows: list[Tuple[str, str, Optional[str], Optional[str]]]) -> dict[str, Any]:
    """``aggregate_keys``'s result from the rows of ``_KEY_TOTALS``."""
    totals: dict[str, Any] = {}
    counting_sets: dict[str, list[Tuple[str, Any, int]]] = {}
    for key, kind, value, total in rows:
        if kind == "c":
            assert total is not None
            totals[key] = int(total)
        elif kind == "s":
            assert value is not None and total is not None
            item = json.loads(value)
            counting_sets.setdefault(key, []).append((value_identity(item), item, int(total)))
        else:
            assert value is not None
            totals[key] = json.loads(value)
    for key, items in counting_sets.items():
        items.sort(key=lambda entry: entry[0])
        totals[key] = [{"value": item, "count": count} for _, item, count in items]
    return dict(sorted(totals.items()))


_TIME = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

# Rows come in as arrays (one statement for the whole payload); the counts are
# bumped in a fixed order, so two workers never wait for each other's rows crosswise.
_INSERT_EVENTS = """
WITH new AS (
    INSERT INTO events (instance_id, event_id, event_time, counted_at, event_type, event_name,
                        attrs, payload_id, received_at)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[],
                         %s::text[], %s::text[], %s::jsonb[], %s::text[], %s::timestamptz[])
    ON CONFLICT (instance_id, event_id) DO NOTHING
    RETURNING date_trunc('hour', counted_at, 'UTC') AS hour, event_type, event_name
)
INSERT INTO event_counts AS c (hour, event_type, event_name, count)
SELECT hour, event_type, event_name, count(*) FROM new
GROUP BY hour, event_type, event_name ORDER BY hour, event_type, event_name
ON CONFLICT (hour, event_type, event_name) DO UPDATE SET count = c.count + excluded.count
"""

_EVENT_COUNTS = """
WITH bounds AS (
    SELECT %(since)s::timestamptz AS since, %(until)s::timestamptz AS until,
           date_trunc('hour', %(until)s::timestamptz, 'UTC') AS last_hour,
           CASE WHEN date_trunc('hour', %(since)s::timestamptz, 'UTC') = %(since)s::timestamptz
                THEN %(since)s::timestamptz
                ELSE date_trunc('hour', %(since)s::timestamptz, 'UTC') + interval '1 hour'
           END AS first_hour
)
SELECT c.event_type, c.event_name, sum(c.count)
FROM event_counts AS c, bounds AS b
WHERE b.first_hour < b.last_hour AND c.hour >= b.first_hour AND c.hour < b.last_hour
GROUP BY c.event_type, c.event_name
UNION ALL
SELECT e.event_type, e.event_name, count(*)
FROM events AS e, bounds AS b
WHERE e.counted_at >= b.since AND e.counted_at < b.until
  AND (b.first_hour >= b.last_hour OR e.counted_at < b.first_hour OR e.counted_at >= b.last_hour)
GROUP BY e.event_type, e.event_name
"""


def _insert_events(connection: psycopg.Connection[Any], events: Sequence[EventRecord]) -> None:
    """Insert the events not stored yet and count them per hour (in the caller's
    transaction, with the payload's row)."""
    if not events:
        return
    columns: Tuple[List[Any], ...] = tuple([] for _ in range(9))
    for event in events:
        for column, value in zip(columns, (
            event.instance_id, event.event_id, event.event_time, event.counted_at,
            event.event_type, event.event_name, _encode(event.attrs),
            event.payload_id, event.received_at,
        )):
            column.append(value)
    connection.execute(_INSERT_EVENTS, columns)


def _query_events(connection: psycopg.Connection[Any], query: EventQuery) -> List[Dict[str, Any]]:
    """The page of events ``query`` asks for, newest first."""
    conditions, parameters = event_filters(query, "%s")
    # The conditions are constants; values are parameters.
    sql = (
        f"SELECT instance_id, event_id, {_TIME.format('event_time')}, event_type,"  # noqa: S608
        f" event_name, attrs, {_TIME.format('received_at')}"
        f" FROM events WHERE {' AND '.join(conditions)}"
        " ORDER BY counted_at DESC, seq DESC LIMIT %s OFFSET %s"
    )
    rows = connection.execute(sql, (*parameters, query.limit, query.offset)).fetchall()
    return [
        event_row(instance_id, event_id, event_time, event_type, event_name, attrs, received_at)
        for instance_id, event_id, event_time, event_type, event_name, attrs, received_at in rows
    ]


def _event_counts(
    connection: psycopg.Connection[Any], since: str, until: str
) -> Dict[str, Dict[str, int]]:
    """``{type: {name: count}}`` of the events counted in ``[since, until)``: whole hours
    from ``event_counts``, the partial hours at the ends from the events themselves."""
    rows = connection.execute(_EVENT_COUNTS, {"since": since, "until": until}).fetchall()
    return count_tree(rows)
