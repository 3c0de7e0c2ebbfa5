"""Events in SQLite: their tables, and the statements ``SQLiteStore`` runs for them.

``events`` holds each event once per ``(instance_id, event_id)``; ``event_counts``
keeps how many there are per hour, type and name, updated at ingest, so that
``/v1/stats`` counts them without reading every event. Times are stored as
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` text, which sorts as time.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import timedelta
from typing import Any, Dict, List, Sequence, Set, Tuple

from ._events import EventQuery, EventRecord, event_row, format_time, parse_time

__all__ = ["EVENTS_SCHEMA", "event_counts", "insert_events", "query_events"]

EVENTS_SCHEMA = """
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

_HOUR_SUFFIX = ":00:00.000000Z"
_LOOKUP_BATCH = 500  # event ids per look-up (SQLite allows 999 parameters at least)


def hour_of(moment: str) -> str:
    """The start of the hour holding ``moment`` (both in ``format_time``'s form)."""
    return moment[:13] + _HOUR_SUFFIX


def next_hour_start(moment: str) -> str:
    """The first hour start at or after ``moment``."""
    start = hour_of(moment)
    if start == moment:
        return start
    return format_time(parse_time(start) + timedelta(hours=1))


def insert_events(connection: sqlite3.Connection, events: Sequence[EventRecord]) -> int:
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
    counts = Counter((hour_of(event.counted_at), event.event_type, event.event_name)
                     for event in new)
    connection.executemany(
        "INSERT INTO event_counts (hour, event_type, event_name, count) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (hour, event_type, event_name) DO UPDATE SET count = count + excluded.count",
        [(*key, count) for key, count in sorted(counts.items())],
    )
    return len(new)


def query_events(connection: sqlite3.Connection, query: EventQuery) -> List[Dict[str, Any]]:
    """The page of events ``query`` asks for, newest first."""
    conditions = ["counted_at >= ?", "counted_at < ?"]
    parameters: List[Any] = [query.since, query.until]
    for column, value in (
        ("event_type", query.event_type),
        ("event_name", query.event_name),
        ("instance_id", query.instance_id),
    ):
        if value is not None:
            conditions.append(f"{column} = ?")
            parameters.append(value)
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


def event_counts(
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

    first_hour, last_hour = next_hour_start(since), hour_of(until)
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
    result: Dict[str, Dict[str, int]] = {}
    for (event_type, event_name), count in sorted(totals.items()):
        result.setdefault(event_type, {})[event_name] = count
    return result

