"""Time-window queries answered from the rollups: stats, series, breakdown, active.

Each query reads a bounded number of rollup rows: about (buckets or days in
the window) times (keys asked), plus, for distinct instances over a whole window,
one row per instance that reported in it. None of them reads a payload.

Windows: ``since`` (inclusive) and ``until`` (exclusive), RFC 3339 or
``YYYY-MM-DD``; by default the 30 days up to now. Bucketed answers (series,
active) cover every bucket the window touches, from the start of the bucket
holding ``since``; whole-window answers (stats, breakdown) cover the whole
UTC days the window touches.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ._rollups import clamp, day_of, hour_of, identity, micros, parse_rfc3339, week_of
from ._storage import Runner

__all__ = [
    "BUCKETS",
    "DEFAULT_DAYS",
    "MAX_POINTS",
    "BadQuery",
    "Window",
    "active",
    "breakdown",
    "bucket_start",
    "csv_cell",
    "parse_bucket",
    "parse_when",
    "parse_window",
    "series",
    "stats",
    "to_csv",
]

DEFAULT_DAYS = 30
"""The window when neither ``since`` nor ``until`` is given: this many days up to now."""
MAX_POINTS = 10_000
"""Most buckets one series or active query may answer."""
BUCKETS = ("hour", "day", "week")

_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_HOURS_PER = {"hour": 1, "day": 24, "week": 24 * 7}


class BadQuery(ValueError):
    """A query parameter that cannot be answered; the message says which and why."""


def parse_when(name: str, text: str) -> int:
    """``since``/``until``: RFC 3339 or ``YYYY-MM-DD`` (00:00 UTC), as µs since the epoch."""
    text = text.strip()
    try:
        match = _DATE.fullmatch(text)
        if match is not None:
            year, month, day = (int(part) for part in match.groups())
            return micros(datetime(year, month, day, tzinfo=timezone.utc))
        return micros(parse_rfc3339(text))
    except ValueError:
        raise BadQuery(f"{name} must be an RFC 3339 time or YYYY-MM-DD, not {text!r}") from None


@dataclass(frozen=True)
class Window:
    """``[since, until)`` in µs since 1970-01-01 UTC."""

    since: int
    until: int

    def hours(self) -> Tuple[int, int]:
        """The whole hours the window touches, ``[first, end)``."""
        return hour_of(self.since), hour_of(self.until - 1) + 1

    def days(self) -> Tuple[int, int]:
        """The whole UTC days the window touches, ``[first, end)``."""
        first, end = self.hours()
        return day_of(first), day_of(end - 1) + 1

    def buckets(self, bucket: str) -> Tuple[int, int]:
        """The buckets the window touches, ``[first, end)``, in ``bucket`` units."""
        first_hour, end_hour = self.hours()
        if bucket == "hour":
            return first_hour, end_hour
        first_day, end_day = day_of(first_hour), day_of(end_hour - 1) + 1
        if bucket == "day":
            return first_day, end_day
        return week_of(first_day), week_of(end_day - 1) + 1


def parse_window(query: Mapping[str, List[str]], now: float) -> Window:
    """The window a request asks for (``now`` in seconds since the epoch)."""
    until_text = _last(query, "until")
    since_text = _last(query, "since")
    now_micros = int(now * 1_000_000)
    until = parse_when("until", until_text) if until_text is not None else now_micros
    if since_text is not None:
        since = parse_when("since", since_text)
    else:
        since = until - DEFAULT_DAYS * 86_400_000_000
    if since >= until:
        raise BadQuery("since must be earlier than until")
    return Window(since, until)


def parse_bucket(query: Mapping[str, List[str]], default: str = "day") -> str:
    bucket = _last(query, "bucket") or default
    if bucket not in BUCKETS:
        raise BadQuery(f"bucket must be one of {', '.join(BUCKETS)}, not {bucket!r}")
    return bucket


def _last(query: Mapping[str, List[str]], name: str) -> Optional[str]:
    values = query.get(name)
    return values[-1] if values else None


def bucket_start(bucket: str, number: int) -> str:
    """The RFC 3339 start of bucket ``number`` (weeks start on Monday 00:00 UTC)."""
    if bucket == "hour":
        hours = number
    elif bucket == "day":
        hours = number * 24
    else:
        hours = (number * 7 - 3) * 24
    moment = _EPOCH + timedelta(hours=hours)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _bucket_of_hour(bucket: str, hour: int) -> int:
    if bucket == "hour":
        return hour
    if bucket == "day":
        return day_of(hour)
    return week_of(day_of(hour))


def _first_hour(bucket: str, number: int) -> int:
    if bucket == "hour":
        return number
    if bucket == "day":
        return number * 24
    return (number * 7 - 3) * 24


def _check_points(first: int, end: int) -> None:
    if end - first > MAX_POINTS:
        raise BadQuery(f"the window holds {end - first} buckets; at most {MAX_POINTS} per query")


# -- series and active ----------------------------------------------------------------------


def series(run: Runner, key: str, bucket: str, window: Window) -> Dict[str, Any]:
    """``{"key", "bucket", "points": [{"t", "value", "instances"}]}``, every bucket present.

    ``value`` is the sum of the key's integer reports in the bucket (0 when none)
    when the key had an integer report anywhere in the window, else null.
    """
    first, end = window.buckets(bucket)
    _check_points(first, end)
    start_hour, end_hour = _first_hour(bucket, first), _first_hour(bucket, end)
    sums: Dict[int, int] = {}
    is_counter = False
    for hour, total in run.fetchall(
        "SELECT hour, total FROM rollup_key_hours WHERE key = ? AND hour >= ? AND hour < ?",
        (key, start_hour, end_hour),
    ):
        is_counter = True
        number = _bucket_of_hour(bucket, hour)
        sums[number] = sums.get(number, 0) + int(total)
    instances = dict(
        run.fetchall(
            "SELECT bucket, instances FROM rollup_key_instances"
            " WHERE key = ? AND res = ? AND bucket >= ? AND bucket < ?",
            (key, bucket[0], first, end),
        )
    )
    points = [
        {
            "t": bucket_start(bucket, number),
            "value": clamp(sums.get(number, 0)) if is_counter else None,
            "instances": int(instances.get(number, 0)),
        }
        for number in range(first, end)
    ]
    return {"key": key, "bucket": bucket, "points": points}


def active(run: Runner, bucket: str, window: Window) -> Dict[str, Any]:
    """``{"bucket", "points": [{"t", "instances", "payloads", "dropped"}]}``, every bucket."""
    first, end = window.buckets(bucket)
    _check_points(first, end)
    start_hour, end_hour = _first_hour(bucket, first), _first_hour(bucket, end)
    instances = dict(
        run.fetchall(
            "SELECT bucket, instances FROM rollup_active"
            " WHERE res = ? AND bucket >= ? AND bucket < ?",
            (bucket[0], first, end),
        )
    )
    payloads: Dict[int, int] = {}
    dropped: Dict[int, int] = {}
    for hour, count, lost in run.fetchall(
        "SELECT hour, payloads, dropped FROM rollup_hours WHERE hour >= ? AND hour < ?",
        (start_hour, end_hour),
    ):
        number = _bucket_of_hour(bucket, hour)
        payloads[number] = payloads.get(number, 0) + int(count)
        dropped[number] = dropped.get(number, 0) + int(lost)
    points = [
        {
            "t": bucket_start(bucket, number),
            "instances": int(instances.get(number, 0)),
            "payloads": payloads.get(number, 0),
            "dropped": clamp(dropped.get(number, 0)),
        }
        for number in range(first, end)
    ]
    return {"bucket": bucket, "points": points}


# -- whole-window answers -------------------------------------------------------------------

# Instances with a payload in [first_day, end_day): those whose last or first day
# is inside, plus those reporting before and after it that also reported inside.
# Three disjoint counts, so that each one is a plain index range (an OR would
# make PostgreSQL plan the EXISTS as a hash of every member row).
_INSTANCES_IN_WINDOW = """
SELECT
    (SELECT count(*) FROM rollup_instances WHERE last_day >= ? AND last_day < ?),
    (SELECT count(*) FROM rollup_instances
     WHERE last_day >= ? AND first_day >= ? AND first_day < ?),
    (SELECT count(*) FROM rollup_instances AS i
     WHERE i.last_day >= ? AND i.first_day < ? AND EXISTS (
        SELECT 1 FROM rollup_members AS m
        WHERE m.instance_id = i.instance_id AND m.res = 'd' AND m.bucket >= ? AND m.bucket < ?))
"""


def _instances_in_window(run: Runner, first_day: int, end_day: int) -> int:
    ((inside, started, around),) = run.fetchall(
        _INSTANCES_IN_WINDOW,
        (
            first_day, end_day,
            end_day, first_day, end_day,
            end_day, first_day, first_day, end_day,
        ),
    )  # fmt: skip
    return int(inside) + int(started) + int(around)


def _values(run: Runner, keys: Sequence[str]) -> Dict[str, Any]:
    """The values that the rollups keep as ``keys`` (see ``_rollups.value_key``)."""
    long_keys = sorted({key for key in keys if key.startswith("#")})
    texts = {key: key for key in keys if not key.startswith("#")}
    if long_keys:
        marks = ", ".join("?" * len(long_keys))
        texts.update(
            run.fetchall(
                f"SELECT value_key, value FROM rollup_long_values WHERE value_key IN ({marks})",  # noqa: S608
                long_keys,
            )
        )
    return {key: json.loads(text) for key, text in texts.items()}


def _latest_kind(rows: Sequence[Tuple[Any, ...]]) -> Optional[str]:
    """The kind of the latest report among ``(kind, last_ts, last_seq)`` rows."""
    latest = max(rows, key=lambda row: (row[1], row[2]), default=None)
    return None if latest is None else str(latest[0])


def stats(run: Runner, window: Window) -> Dict[str, Any]:
    """``{"instances", "payloads", "dropped", "keys", "events"}`` within the window's days.

    ``keys``: per key, by the kind of its latest report in the window: the sum
    of its integer reports, the merged counting set, or its latest value.
    """
    first_day, end_day = window.days()
    payloads = dropped = 0
    for count, lost in run.fetchall(
        "SELECT payloads, dropped FROM rollup_hours WHERE hour >= ? AND hour < ?",
        (first_day * 24, end_day * 24),
    ):
        payloads += int(count)
        dropped += int(lost)
    instances = _instances_in_window(run, first_day, end_day)
    by_key: Dict[str, List[Tuple[Any, ...]]] = {}
    for row in run.fetchall(
        "SELECT key, kind, last_ts, last_seq, total, value, value_ts, value_seq"
        " FROM rollup_key_days WHERE day >= ? AND day < ?",
        (first_day, end_day),
    ):
        by_key.setdefault(row[0], []).append(row[1:])
    keys: Dict[str, Any] = {}
    counting_sets: List[str] = []
    for key, rows in by_key.items():
        kind = _latest_kind(rows)
        if kind == "c":
            keys[key] = clamp(sum(int(row[3]) for row in rows))
        elif kind == "s":
            counting_sets.append(key)
        else:
            valued = [row for row in rows if row[5] is not None]
            latest = max(valued, key=lambda row: (row[5], row[6]))
            keys[key] = _values(run, [latest[4]])[latest[4]]
    for key in counting_sets:
        totals = _cset_totals(run, key, first_day, end_day)
        values = _values(run, list(totals))
        # Sorted by canonical JSON, whatever the rollups keep the value as.
        merged = sorted(
            (identity(values[item]), values[item], count) for item, count in totals.items()
        )
        keys[key] = [{"value": value, "count": count} for _, value, count in merged]
    return {
        "instances": int(instances),
        "payloads": payloads,
        "dropped": clamp(dropped),
        "keys": dict(sorted(keys.items())),
        # Events per type and name: filled in by the events store when it exists.
        "events": {},
    }


def _cset_totals(run: Runner, key: str, first_day: int, end_day: int) -> Dict[str, int]:
    totals: Dict[str, int] = {}
    for value, count in run.fetchall(
        "SELECT value, count FROM rollup_cset_days WHERE key = ? AND day >= ? AND day < ?",
        (key, first_day, end_day),
    ):
        totals[value] = totals.get(value, 0) + int(count)
    return {value: clamp(total) for value, total in totals.items()}


_LATEST_VALUES = """
SELECT value, count(*) FROM (
    SELECT l.value AS value FROM rollup_latest AS l WHERE l.key = ? AND l.day >= ? AND l.day < ?
    UNION ALL
    SELECT (SELECT d.value FROM rollup_day_values AS d
            WHERE d.key = l.key AND d.instance_id = l.instance_id AND d.day >= ? AND d.day < ?
            ORDER BY d.day DESC LIMIT 1) AS value
    FROM rollup_latest AS l WHERE l.key = ? AND l.day >= ?
) AS latest WHERE value IS NOT NULL GROUP BY value
"""


def _cset_instances(
    run: Runner, key: str, values: Sequence[str], first_day: int, end_day: int
) -> Dict[str, int]:
    """As ``_instances_in_window``, per value of a counting set: how many instances
    reported each of ``values`` in the window."""
    if not values:
        return {}
    marks = ", ".join("?" * len(values))
    rows = run.fetchall(
        f"""
        SELECT value, count(*) FROM rollup_cset_spans
        WHERE key = ? AND value IN ({marks}) AND last_day >= ? AND last_day < ?
        GROUP BY value
        UNION ALL
        SELECT value, count(*) FROM rollup_cset_spans
        WHERE key = ? AND value IN ({marks}) AND last_day >= ? AND first_day >= ? AND first_day < ?
        GROUP BY value
        UNION ALL
        SELECT s.value, count(*) FROM rollup_cset_spans AS s
        WHERE s.key = ? AND s.value IN ({marks}) AND s.last_day >= ? AND s.first_day < ?
          AND EXISTS (
            SELECT 1 FROM rollup_cset_members AS m
            WHERE m.key = s.key AND m.value = s.value AND m.instance_id = s.instance_id
              AND m.day >= ? AND m.day < ?)
        GROUP BY s.value
        """,  # noqa: S608 - placeholders only
        (
            key, *values, first_day, end_day,
            key, *values, end_day, first_day, end_day,
            key, *values, end_day, first_day, first_day, end_day,
        ),
    )  # fmt: skip
    counted: Dict[str, int] = {}
    for value, count in rows:
        counted[value] = counted.get(value, 0) + int(count)
    return counted


def breakdown(run: Runner, key: str, limit: int, window: Window) -> Dict[str, Any]:
    """``{"key", "kind", "values"}`` over the window's days, at most ``limit`` values.

    For a set key (``kind`` ``"set"``): ``{"value", "instances"}``, how many
    instances' latest value in the window it is, most first. For a counting set
    (``"counting_set"``): ``{"value", "count", "instances"}``, the top values by
    total count and how many instances reported each. A counter, or a key with
    no report in the window, has no values (``kind`` ``"counter"`` or null).
    """
    first_day, end_day = window.days()
    rows = run.fetchall(
        "SELECT kind, last_ts, last_seq FROM rollup_key_days"
        " WHERE key = ? AND day >= ? AND day < ?",
        (key, first_day, end_day),
    )
    kind = _latest_kind(rows)
    values: List[Dict[str, Any]] = []
    if kind == "v":
        counted = run.fetchall(
            _LATEST_VALUES, (key, first_day, end_day, first_day, end_day, key, end_day)
        )
        found = _values(run, [row[0] for row in counted])
        ranked = sorted(
            ((identity(found[value]), found[value], int(count)) for value, count in counted),
            key=lambda entry: (-entry[2], entry[0]),
        )[:limit]
        values = [{"value": value, "instances": count} for _, value, count in ranked]
    elif kind == "s":
        totals = _cset_totals(run, key, first_day, end_day)
        found = _values(run, list(totals))
        top = sorted(
            ((identity(found[item]), item, count) for item, count in totals.items()),
            key=lambda entry: (-entry[2], entry[0]),
        )[:limit]
        reporters = _cset_instances(run, key, [item for _, item, _ in top], first_day, end_day)
        values = [
            {"value": found[item], "count": count, "instances": reporters.get(item, 0)}
            for _, item, count in top
        ]
    names = {"v": "set", "s": "counting_set", "c": "counter", None: None}
    return {"key": key, "kind": names[kind], "values": values}


# -- CSV ------------------------------------------------------------------------------------


def csv_cell(value: object) -> str:
    """How a JSON value is written in CSV: strings as they are, null empty, the rest as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def to_csv(kind: str, answer: Mapping[str, Any]) -> str:
    """The CSV form of a query's JSON answer (``kind``: stats, series, active, breakdown).

    Values that are not numbers or strings are written as JSON; null is empty.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if kind in ("series", "active"):
        columns = (
            ["t", "value", "instances"]
            if kind == "series"
            else ["t", "instances", "payloads", "dropped"]
        )
        writer.writerow(columns)
        for point in answer["points"]:
            writer.writerow([csv_cell(point[column]) for column in columns])
    elif kind == "breakdown":
        columns = (
            ["value", "count", "instances"]
            if answer["kind"] == "counting_set"
            else ["value", "instances"]
        )
        writer.writerow(columns)
        for item in answer["values"]:
            writer.writerow([csv_cell(item[column]) for column in columns])
    else:
        writer.writerow(["name", "value"])
        for name in ("instances", "payloads", "dropped"):
            writer.writerow([name, answer[name]])
        for key, value in answer["keys"].items():
            writer.writerow([f"keys.{key}", csv_cell(value)])
        for event_type, names in answer.get("events", {}).items():
            for event_name, count in names.items():
                writer.writerow([f"events.{event_type}.{event_name}", count])
    return buffer.getvalue()
