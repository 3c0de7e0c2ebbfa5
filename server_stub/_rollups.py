"""Hourly, daily and weekly aggregates kept up to date at ingest: queries never scan payloads.

Both stores call ``add_rollups`` in the transaction that inserts a payload, and
only when the insert stored it (a repeated ``payload_id`` adds nothing), and
``backfill`` once for payloads stored before the rollups existed. The SQL is
shared: it runs through a ``_sql.Runner`` and uses only what SQLite 3.35+ and PostgreSQL 12+ both
understand (``INSERT ... ON CONFLICT``, row values).

A payload counts at its *effective time*: its ``timestamp``, or its arrival
when the timestamp is later than that (a clock running ahead cannot put data
in the future). Buckets are integers: hours and days since 1970-01-01 UTC,
and weeks starting on Monday (``week_of(day)``).

What is kept (sizes for N payloads from I instances over D days, K keys):

- ``rollup_hours``: payloads and dropped items per hour (24·D rows).
- ``rollup_members``: per instance and hour/day/week bucket, the keys it
  reported there (rows ≈ the instance-hours with a payload, plus
  instance-days and instance-weeks; the hour rows are at most N). Only used
  at ingest, to count each instance once per bucket and key.
- ``rollup_active``/``rollup_key_instances``: distinct instances per bucket,
  overall and per key (3 resolutions · buckets · K rows).
- ``rollup_key_hours``/``rollup_key_days``: per key and hour (day), the sum
  of its integer reports; per day also the kind and value of its latest report.
- ``rollup_instances``: per instance, the first and last day it reported.
- ``rollup_latest``/``rollup_day_values``: per set key and instance, its
  latest value overall and per day (I·K and instance-days·K rows).
- ``rollup_cset_days``/``rollup_cset_spans``/``rollup_cset_members``: per
  counting-set key and value, the count per day, and which instances
  reported it (first/last day, and each day).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ._sql import Runner

__all__ = [
    "MAX_INT64",
    "MIN_INT64",
    "ROLLUP_TABLES",
    "add_rollups",
    "backfill",
    "clamp",
    "day_of",
    "effective_micros",
    "hour_of",
    "identity",
    "kind_of",
    "parse_rfc3339",
    "rollup_schema",
    "week_of",
]

MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)
MICROS_PER_HOUR = 3_600_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time with ``Z`` or a numeric offset; fractions finer than µs are truncated."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    microsecond = int((fraction + "000000")[:6])
    if offset in ("Z", "z"):
        tz = timezone.utc
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if minutes > 59:
            raise ValueError("bad UTC offset")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=tz)


def micros(moment: datetime) -> int:
    """Microseconds since 1970-01-01 UTC (exact: no float)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def effective_micros(timestamp: str, received_at: str) -> int:
    """When a payload counts: its timestamp, or its arrival if the timestamp is later."""
    arrival = micros(parse_rfc3339(received_at))
    try:
        sent = micros(parse_rfc3339(timestamp))
    except ValueError:  # stored before validation was strict: count it on arrival
        return arrival
    return min(sent, arrival)


def hour_of(at_micros: int) -> int:
    return at_micros // MICROS_PER_HOUR


def day_of(hour: int) -> int:
    return hour // 24


def week_of(day: int) -> int:
    """The Monday-based week of ``day`` (1970-01-01 was a Thursday: day 4 is a Monday)."""
    return (day + 3) // 7


def clamp(total: int) -> int:
    """``total`` saturated to the int64 range (sums saturate rather than overflow)."""
    return max(MIN_INT64, min(MAX_INT64, total))


def identity(value: object) -> str:
    """A value's canonical JSON: the same for equal values (object member order ignored)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def kind_of(value: object) -> str:
    """``"c"`` an integer counter, ``"s"`` a counting set, ``"v"`` any other value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "c"
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(item, dict)
            and item.keys() == {"value", "count"}
            and isinstance(item["count"], int)
            and not isinstance(item["count"], bool)
            for item in value
        )
    ):
        return "s"
    return "v"


_TABLES: Tuple[Tuple[str, str, str], ...] = (
    # (name, columns, primary key)
    (
        "rollup_hours",
        "hour bigint NOT NULL, payloads bigint NOT NULL, dropped bigint NOT NULL",
        "hour",
    ),
    (
        "rollup_members",
        "instance_id text NOT NULL, res text NOT NULL, bucket bigint NOT NULL, keys text NOT NULL",
        "instance_id, res, bucket",
    ),
    (
        "rollup_active",
        "res text NOT NULL, bucket bigint NOT NULL, instances bigint NOT NULL",
        "res, bucket",
    ),
    (
        "rollup_key_instances",
        "key text NOT NULL, res text NOT NULL, bucket bigint NOT NULL, instances bigint NOT NULL",
        "key, res, bucket",
    ),
    (
        "rollup_key_hours",
        "key text NOT NULL, hour bigint NOT NULL, total bigint NOT NULL",
        "key, hour",
    ),
    (
        "rollup_key_days",
        "key text NOT NULL, day bigint NOT NULL, kind text NOT NULL,"
        " last_ts bigint NOT NULL, last_seq bigint NOT NULL, total bigint NOT NULL,"
        " value text, value_ts bigint, value_seq bigint",
        "key, day",
    ),
    (
        "rollup_instances",
        "instance_id text NOT NULL, first_day bigint NOT NULL, last_day bigint NOT NULL",
        "instance_id",
    ),
    (
        "rollup_latest",
        "key text NOT NULL, instance_id text NOT NULL, day bigint NOT NULL,"
        " ts bigint NOT NULL, seq bigint NOT NULL, value text NOT NULL",
        "key, instance_id",
    ),
    (
        "rollup_day_values",
        "key text NOT NULL, instance_id text NOT NULL, day bigint NOT NULL,"
        " ts bigint NOT NULL, seq bigint NOT NULL, value text NOT NULL",
        "key, instance_id, day",
    ),
    (
        "rollup_cset_days",
        "key text NOT NULL, day bigint NOT NULL, value text NOT NULL, count bigint NOT NULL",
        "key, day, value",
    ),
    (
        "rollup_cset_spans",
        "key text NOT NULL, value text NOT NULL, instance_id text NOT NULL,"
        " first_day bigint NOT NULL, last_day bigint NOT NULL",
        "key, value, instance_id",
    ),
    (
        "rollup_cset_members",
        "key text NOT NULL, value text NOT NULL, instance_id text NOT NULL, day bigint NOT NULL",
        "key, value, instance_id, day",
    ),
)
ROLLUP_TABLES = tuple(name for name, _, _ in _TABLES)


def rollup_schema(*, sqlite: bool) -> List[str]:
    """``CREATE TABLE`` statements for the rollups (SQLite: clustered on the key)."""
    suffix = " WITHOUT ROWID" if sqlite else ""
    statements = [
        f"CREATE TABLE IF NOT EXISTS {name} ({columns}, PRIMARY KEY ({key})){suffix}"
        for name, columns, key in _TABLES
    ]
    statements.append("CREATE INDEX IF NOT EXISTS rollup_latest_by_day ON rollup_latest (key, day)")
    statements.append(
        "CREATE INDEX IF NOT EXISTS rollup_instances_by_last ON rollup_instances (last_day)"
    )
    return statements


def _saturating_sum(a: str, b: str) -> str:
    return (
        f"CASE WHEN {b} > 0 AND {a} > {MAX_INT64} - {b} THEN {MAX_INT64}"
        f" WHEN {b} < 0 AND {a} < {MIN_INT64} - {b} THEN {MIN_INT64}"
        f" ELSE {a} + {b} END"
    )


def _later(new: str, old: str) -> str:
    """Whether report ``new`` (``new_ts``/``new_seq`` columns) is later than ``old``."""
    return f"({new}_ts > {old}_ts OR ({new}_ts = {old}_ts AND {new}_seq > {old}_seq))"


_UPSERT_HOUR = f"""
INSERT INTO rollup_hours AS r (hour, payloads, dropped) VALUES (?, 1, ?)
ON CONFLICT (hour) DO UPDATE SET
    payloads = r.payloads + 1, dropped = {_saturating_sum("r.dropped", "excluded.dropped")}
"""  # noqa: S608 - constants only
_INSERT_MEMBER = (
    "INSERT INTO rollup_members (instance_id, res, bucket, keys) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
_SELECT_MEMBER = "SELECT keys FROM rollup_members WHERE instance_id = ? AND res = ? AND bucket = ?"
_UPDATE_MEMBER = (
    "UPDATE rollup_members SET keys = ? WHERE instance_id = ? AND res = ? AND bucket = ?"
)
_UPSERT_ACTIVE = """
INSERT INTO rollup_active AS r (res, bucket, instances) VALUES (?, ?, 1)
ON CONFLICT (res, bucket) DO UPDATE SET instances = r.instances + 1
"""
_UPSERT_KEY_INSTANCES = """
INSERT INTO rollup_key_instances AS r (key, res, bucket, instances) VALUES (?, ?, ?, 1)
ON CONFLICT (key, res, bucket) DO UPDATE SET instances = r.instances + 1
"""
_UPSERT_INSTANCE = """
INSERT INTO rollup_instances AS r (instance_id, first_day, last_day) VALUES (?, ?, ?)
ON CONFLICT (instance_id) DO UPDATE SET
    first_day = CASE WHEN excluded.first_day < r.first_day THEN excluded.first_day
                ELSE r.first_day END,
    last_day = CASE WHEN excluded.last_day > r.last_day THEN excluded.last_day ELSE r.last_day END
"""
_UPSERT_KEY_HOUR = f"""
INSERT INTO rollup_key_hours AS r (key, hour, total) VALUES (?, ?, ?)
ON CONFLICT (key, hour) DO UPDATE SET total = {_saturating_sum("r.total", "excluded.total")}
"""  # noqa: S608 - constants only
_UPSERT_KEY_DAY = f"""
INSERT INTO rollup_key_days AS r
    (key, day, kind, last_ts, last_seq, total, value, value_ts, value_seq)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, day) DO UPDATE SET
    kind = CASE WHEN {_later("excluded.last", "r.last")} THEN excluded.kind ELSE r.kind END,
    last_ts = CASE WHEN {_later("excluded.last", "r.last")} THEN excluded.last_ts
              ELSE r.last_ts END,
    last_seq = CASE WHEN {_later("excluded.last", "r.last")} THEN excluded.last_seq
               ELSE r.last_seq END,
    total = {_saturating_sum("r.total", "excluded.total")},
    value = CASE WHEN excluded.value_ts IS NOT NULL
                  AND (r.value_ts IS NULL OR {_later("excluded.value", "r.value")})
            THEN excluded.value ELSE r.value END,
    value_ts = CASE WHEN excluded.value_ts IS NOT NULL
                  AND (r.value_ts IS NULL OR {_later("excluded.value", "r.value")})
            THEN excluded.value_ts ELSE r.value_ts END,
    value_seq = CASE WHEN excluded.value_ts IS NOT NULL
                  AND (r.value_ts IS NULL OR {_later("excluded.value", "r.value")})
            THEN excluded.value_seq ELSE r.value_seq END
"""  # noqa: S608 - constants only


def _upsert_value(table: str, key: str) -> str:
    return f"""
INSERT INTO {table} AS r (key, instance_id, day, ts, seq, value) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT ({key}) DO UPDATE SET
    day = excluded.day, ts = excluded.ts, seq = excluded.seq, value = excluded.value
WHERE excluded.ts > r.ts OR (excluded.ts = r.ts AND excluded.seq > r.seq)
"""  # noqa: S608 - constants only


_UPSERT_LATEST = _upsert_value("rollup_latest", "key, instance_id")
_UPSERT_DAY_VALUE = _upsert_value("rollup_day_values", "key, instance_id, day")
_UPSERT_CSET_DAY = f"""
INSERT INTO rollup_cset_days AS r (key, day, value, count) VALUES (?, ?, ?, ?)
ON CONFLICT (key, day, value) DO UPDATE SET count = {_saturating_sum("r.count", "excluded.count")}
"""  # noqa: S608 - constants only
_UPSERT_CSET_SPAN = """
INSERT INTO rollup_cset_spans AS r (key, value, instance_id, first_day, last_day)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (key, value, instance_id) DO UPDATE SET
    first_day = CASE WHEN excluded.first_day < r.first_day THEN excluded.first_day
                ELSE r.first_day END,
    last_day = CASE WHEN excluded.last_day > r.last_day THEN excluded.last_day ELSE r.last_day END
"""
_INSERT_CSET_MEMBER = (
    "INSERT INTO rollup_cset_members (key, value, instance_id, day) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)


def _new_keys(
    run: Runner, instance_id: str, res: str, bucket: int, keys: List[str]
) -> Tuple[bool, List[str]]:
    """Record that ``instance_id`` reported ``keys`` in this bucket.

    Returns whether the instance is new to the bucket, and the keys new to it there.
    """
    if run.execute(_INSERT_MEMBER, (instance_id, res, bucket, json.dumps(keys))) == 1:
        return True, keys
    if not keys:
        return False, []
    rows = run.fetchall(_SELECT_MEMBER, (instance_id, res, bucket))
    known = set(json.loads(rows[0][0])) if rows else set()
    new = [key for key in keys if key not in known]
    if new:
        run.execute(
            _UPDATE_MEMBER, (json.dumps(sorted(known.union(new))), instance_id, res, bucket)
        )
    return False, new


def add_rollups(
    run: Runner,
    *,
    seq: int,
    instance_id: str,
    timestamp: str,
    received_at: str,
    data: Mapping[str, Any],
    dropped: int,
) -> None:
    """Add one newly stored payload (``seq``: its arrival order) to every rollup."""
    at = effective_micros(timestamp, received_at)
    hour = hour_of(at)
    day = day_of(hour)
    week = week_of(day)
    run.execute(_UPSERT_HOUR, (hour, clamp(dropped)))
    keys = sorted(data)
    for res, bucket in (("h", hour), ("d", day), ("w", week)):
        new_instance, new_keys = _new_keys(run, instance_id, res, bucket, keys)
        if new_instance:
            run.execute(_UPSERT_ACTIVE, (res, bucket))
        if new_keys:
            run.executemany(_UPSERT_KEY_INSTANCES, [(key, res, bucket) for key in new_keys])
    run.execute(_UPSERT_INSTANCE, (instance_id, day, day))

    key_hours: List[Tuple[Any, ...]] = []
    key_days: List[Tuple[Any, ...]] = []
    values: List[Tuple[Any, ...]] = []
    cset_days: List[Tuple[Any, ...]] = []
    cset_spans: List[Tuple[Any, ...]] = []
    cset_members: List[Tuple[Any, ...]] = []
    for key in keys:
        value = data[key]
        kind = kind_of(value)
        total = clamp(value) if kind == "c" else 0
        if kind == "c":
            key_hours.append((key, hour, total))
        encoded: Optional[str] = None
        if kind == "v":
            encoded = identity(value)
            values.append((key, instance_id, day, at, seq, encoded))
        elif kind == "s":
            merged: Dict[str, int] = {}
            for item in value:
                item_id = identity(item["value"])
                merged[item_id] = clamp(merged.get(item_id, 0) + item["count"])
            for item_id, count in merged.items():
                cset_days.append((key, day, item_id, count))
                cset_spans.append((key, item_id, instance_id, day, day))
                cset_members.append((key, item_id, instance_id, day))
        value_ts = at if encoded is not None else None
        value_seq = seq if encoded is not None else None
        key_days.append((key, day, kind, at, seq, total, encoded, value_ts, value_seq))
    if key_hours:
        run.executemany(_UPSERT_KEY_HOUR, key_hours)
    if key_days:
        run.executemany(_UPSERT_KEY_DAY, key_days)
    if values:
        run.executemany(_UPSERT_LATEST, values)
        run.executemany(_UPSERT_DAY_VALUE, values)
    if cset_days:
        run.executemany(_UPSERT_CSET_DAY, cset_days)
        run.executemany(_UPSERT_CSET_SPAN, cset_spans)
        run.executemany(_INSERT_CSET_MEMBER, cset_members)


def backfill(
    run: Runner, payloads: Iterable[Tuple[int, str, str, str, Mapping[str, Any], int]]
) -> int:
    """Add stored payloads (``seq, instance_id, timestamp, received_at, data, dropped``, in
    arrival order) to the rollups; the number added. For a database made before rollups."""
    count = 0
    for seq, instance_id, timestamp, received_at, data, dropped in payloads:
        add_rollups(
            run,
            seq=seq,
            instance_id=instance_id,
            timestamp=timestamp,
            received_at=received_at,
            data=data,
            dropped=dropped,
        )
        count += 1
    return count
