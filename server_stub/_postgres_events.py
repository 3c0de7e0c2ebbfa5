"""Events in PostgreSQL: their migration, and the statements ``PostgresStore`` runs.

The same tables as in SQLite (``events``, once per ``(instance_id, event_id)``;
``event_counts`` per hour, type and name, kept up to date at ingest), with
``timestamptz`` times and ``jsonb`` attributes. A payload's events go in with
one statement; a race between two workers storing the same event is settled
by the unique constraint, and only the winner counts it.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from ._events import EventQuery, EventRecord, event_row

if TYPE_CHECKING:
    import psycopg

__all__ = ["EVENTS_MIGRATION", "event_counts", "insert_events", "query_events"]

EVENTS_MIGRATION = """
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

_TIME = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

# Rows come in as arrays (one statement for the whole payload); the counts are
# bumped in a fixed order, so two workers never wait for each other's rows crosswise.
_INSERT = """
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

_COUNTS = """
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


def insert_events(connection: psycopg.Connection[Any], events: Sequence[EventRecord]) -> None:
    """Insert the events not stored yet and count them per hour (in the caller's
    transaction, with the payload's row)."""
    if not events:
        return
    columns: Tuple[List[Any], ...] = tuple([] for _ in range(9))
    for event in events:
        for column, value in zip(columns, (
            event.instance_id, event.event_id, event.event_time, event.counted_at,
            event.event_type, event.event_name, json.dumps(event.attrs, separators=(",", ":")),
            event.payload_id, event.received_at,
        )):
            column.append(value)
    connection.execute(_INSERT, columns)


def query_events(connection: psycopg.Connection[Any], query: EventQuery) -> List[Dict[str, Any]]:
    """The page of events ``query`` asks for, newest first."""
    conditions = ["counted_at >= %s", "counted_at < %s"]
    parameters: List[Any] = [query.since, query.until]
    for column, value in (
        ("event_type", query.event_type),
        ("event_name", query.event_name),
        ("instance_id", query.instance_id),
    ):
        if value is not None:
            conditions.append(f"{column} = %s")
            parameters.append(value)
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


def event_counts(
    connection: psycopg.Connection[Any], since: str, until: str
) -> Dict[str, Dict[str, int]]:
    """``{type: {name: count}}`` of the events counted in ``[since, until)``: whole hours
    from ``event_counts``, the partial hours at the ends from the events themselves."""
    totals: Counter[Tuple[str, str]] = Counter()
    for event_type, event_name, count in connection.execute(
        _COUNTS, {"since": since, "until": until}
    ):
        totals[(event_type, event_name)] += int(count)
    result: Dict[str, Dict[str, int]] = {}
    for (event_type, event_name), count in sorted(totals.items()):
        result.setdefault(event_type, {})[event_name] = count
    return result
