"""Hourly, daily and weekly aggregates kept up to date at ingest: queries never scan payloads.

Every payload stored is pending until it is folded into the aggregates (a
repeated ``payload_id`` stores nothing, so adds nothing). On PostgreSQL the
ingest transaction records it in the ``rollup_pending`` queue; on SQLite,
whose single writer numbers payloads in commit order, pending is every
payload after the last one folded (``seq > rollup_folded.upto``), so storing a
payload writes no queue row. Pending payloads are folded in batches: by the
ingest transaction whose ``seq`` is a multiple of ``FOLD_EVERY``, and before
every query (``Store.fold_rollups()``), so answers always include every payload
stored before them. A batch is merged in memory first (payloads of one batch
share hours, days, keys and values), then written with one statement per
table: one upsert per payload and key would cost more than the ingest itself.
A database made before rollups existed is backfilled by marking every stored
payload pending. The SQL is shared by both stores through a ``_storage.Runner``
and uses only what SQLite 3.35+ and PostgreSQL 12+ both understand (``INSERT
... ON CONFLICT``, row values); only one fold runs at a time (SQLite's write
lock, a PostgreSQL advisory lock).

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
- ``rollup_long_values``: the text of values too long to index (see
  ``value_key``); the other tables hold a hash of them.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._storage import Runner, json_encoder

__all__ = [
    "FOLD_AT_ONCE_BYTES",
    "FOLD_EVERY",
    "MAX_INT64",
    "MIN_INT64",
    "ROLLUP_TABLES",
    "clamp",
    "day_of",
    "effective_micros",
    "fold_pending",
    "hour_of",
    "identity",
    "kind_of",
    "parse_rfc3339",
    "rfc3339_datetime",
    "rollup_schema",
    "value_key",
    "week_of",
]

MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)
MICROS_PER_HOUR = 3_600_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)

_encode_string: Any = json.encoder.encode_basestring_ascii  # what json.dumps uses
# json.dumps(value, sort_keys=True, separators=(",", ":")) without a new encoder per call
_encode_canonical = json_encoder(sort_keys=True)
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time with ``Z`` or a numeric offset; fractions finer than µs are truncated."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    return rfc3339_datetime(match)


def rfc3339_datetime(match: re.Match[str]) -> datetime:
    """The time an RFC 3339 pattern's ``match`` spells (groups: date, time, fraction, offset)."""
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


_SECONDS: Dict[str, int] = {}
"""``_fast_micros``: a time's text up to its whole second -> microseconds at that second
(payloads of a fold share a few seconds: each is parsed once)."""
_SECONDS_KEPT = 4096


def _fast_micros(text: str) -> int:
    """``parse_rfc3339`` for what the Python client sends (``...:SS.ffffffZ``), faster."""
    if len(text) == 27 and text[-1] == "Z" and text[19] == "." and text[10] in "Tt":
        fraction = text[20:26]
        plain = fraction.isascii() and fraction.isdigit()
        if plain:
            whole = _SECONDS.get(text[:19])
            if whole is not None:  # the same second with six other digits: parsed alike
                return whole + int(fraction)
        try:
            moment = datetime.fromisoformat(text[:-1])
        except ValueError:
            pass
        else:
            at: int = (moment - _NAIVE_EPOCH) // _MICROSECOND
            if plain:
                if len(_SECONDS) >= _SECONDS_KEPT:
                    _SECONDS.clear()
                _SECONDS[text[:19]] = at - int(fraction)
            return at
    return micros(parse_rfc3339(text))


def effective_micros(timestamp: str, received_at: str) -> int:
    """When a payload counts: its timestamp, or its arrival if the timestamp is later."""
    arrival = _fast_micros(received_at)
    try:
        sent = _fast_micros(timestamp)
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
    if MIN_INT64 <= total <= MAX_INT64:
        return total
    return MAX_INT64 if total > 0 else MIN_INT64


def identity(value: object) -> str:
    """A value's canonical JSON: the same for equal values (object member order ignored)."""
    kind = type(value)
    if kind is str:
        encoded: str = _encode_string(value)
        return encoded
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else json.dumps(value)  # type: ignore[arg-type]
    if value is None:
        return "null"
    return _encode_canonical(value)


LONG_VALUE = 256
"""Values whose canonical JSON is longer than this many characters are kept in the
rollups under a hash (``value_key``), their text once in ``rollup_long_values``:
a B-tree index row must stay small (PostgreSQL refuses one over ~2.7 kB)."""


_SHORT_STRING = (LONG_VALUE - 2) // 12
"""Strings this long or shorter are never long values: their JSON takes at most 12
characters per character (a surrogate pair's two escapes), and two quotes."""


def value_key(canonical: str) -> str:
    """What the rollups keep for a value: its canonical JSON, or ``#`` and a hash of it
    when that is long (no JSON text starts with ``#``)."""
    if len(canonical) <= LONG_VALUE:
        return canonical
    return "#" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def kind_of(value: object) -> str:
    """``"c"`` an integer counter, ``"s"`` a counting set, ``"v"`` any other value."""
    kind = type(value)
    if kind is int:
        return "c"
    if kind is not list:
        return "c" if isinstance(value, int) and not isinstance(value, bool) else "v"
    if not value:
        return "v"
    for item in value:  # type: ignore[attr-defined]
        if not (
            type(item) is dict and len(item) == 2 and "value" in item
            and type(item.get("count")) is int
        ):
            return "v"
    return "s"


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
    ),    ("rollup_long_values", "value_key text NOT NULL, value text NOT NULL", "value_key"),
)
ROLLUP_TABLES = tuple(name for name, _, _ in _TABLES)


def rollup_schema(*, sqlite: bool) -> List[str]:
    """``CREATE TABLE`` statements for the rollups (SQLite: clustered on the key, and
    without the ``rollup_pending`` queue: ``_sqlite`` keeps pending payloads its own way)."""
    suffix = " WITHOUT ROWID" if sqlite else ""
    statements = [
        f"CREATE TABLE IF NOT EXISTS {name} ({columns}, PRIMARY KEY ({key})){suffix}"
        for name, columns, key in _TABLES
    ]
    if not sqlite:
        statements.append(PENDING_SCHEMA)
    # Covering indexes for the window queries: each count or breakdown over a
    # window is one index range (the last three columns serve the rare
    # instances that reported before and after the window).
    statements += [
        "CREATE INDEX IF NOT EXISTS rollup_latest_by_day ON rollup_latest (key, day, value)",
        "CREATE INDEX IF NOT EXISTS rollup_instances_by_last"
        " ON rollup_instances (last_day, first_day, instance_id)",
        "CREATE INDEX IF NOT EXISTS rollup_cset_spans_by_last"
        " ON rollup_cset_spans (key, value, last_day, first_day, instance_id)",
    ]
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
INSERT INTO rollup_hours AS r (hour, payloads, dropped) VALUES (?, ?, ?)
ON CONFLICT (hour) DO UPDATE SET
    payloads = r.payloads + excluded.payloads,
    dropped = {_saturating_sum("r.dropped", "excluded.dropped")}
"""  # noqa: S608 - constants only
_UPSERT_MEMBER = """
INSERT INTO rollup_members AS r (instance_id, res, bucket, keys) VALUES (?, ?, ?, ?)
ON CONFLICT (instance_id, res, bucket) DO UPDATE SET keys = excluded.keys
"""
_UPSERT_ACTIVE = """
INSERT INTO rollup_active AS r (res, bucket, instances) VALUES (?, ?, ?)
ON CONFLICT (res, bucket) DO UPDATE SET instances = r.instances + excluded.instances
"""
_UPSERT_KEY_INSTANCES = """
INSERT INTO rollup_key_instances AS r (key, res, bucket, instances) VALUES (?, ?, ?, ?)
ON CONFLICT (key, res, bucket) DO UPDATE SET instances = r.instances + excluded.instances
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
_LATER_LAST = _later("excluded.last", "r.last")
_LATER_VALUE = (
    "excluded.value_ts IS NOT NULL AND"
    f" (r.value_ts IS NULL OR {_later('excluded.value', 'r.value')})"
)
_UPSERT_KEY_DAY = f"""
INSERT INTO rollup_key_days AS r
    (key, day, kind, last_ts, last_seq, total, value, value_ts, value_seq)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, day) DO UPDATE SET
    kind = CASE WHEN {_LATER_LAST} THEN excluded.kind ELSE r.kind END,
    last_ts = CASE WHEN {_LATER_LAST} THEN excluded.last_ts ELSE r.last_ts END,
    last_seq = CASE WHEN {_LATER_LAST} THEN excluded.last_seq ELSE r.last_seq END,
    total = {_saturating_sum("r.total", "excluded.total")},
    value = CASE WHEN {_LATER_VALUE} THEN excluded.value ELSE r.value END,
    value_ts = CASE WHEN {_LATER_VALUE} THEN excluded.value_ts ELSE r.value_ts END,
    value_seq = CASE WHEN {_LATER_VALUE} THEN excluded.value_seq ELSE r.value_seq END
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
_INSERT_LONG_VALUE = (
    "INSERT INTO rollup_long_values (value_key, value) VALUES (?, ?) ON CONFLICT DO NOTHING"
)
_MEMBERS_PER_SELECT = 300
_ALWAYS_SHORT = frozenset((bool, float, type(None)))
"""Types whose canonical JSON is never a long value (a float's at most 24 characters)."""
_PLAIN_VALUES = frozenset((str, bool, float, dict, type(None)))
"""Types whose values ``kind_of`` calls ``"v"``, whatever they hold."""

PENDING_SCHEMA = "CREATE TABLE IF NOT EXISTS rollup_pending (seq bigint PRIMARY KEY)"
"""Payloads stored but not yet added to the rollups (their ``seq``)."""
FOLD_EVERY = 256
"""An ingest whose ``seq`` is a multiple of this folds every pending payload."""
FOLD_BATCH = 2000
FOLD_AT_ONCE_BYTES = 1 << 20
"""A payload whose stored data is longer than this is folded as it is stored (``PreparedFold``)."""

Report = Tuple[int, int]
"""When a report was made, for "latest" comparisons: (effective µs, seq)."""


class _Batch:
    """The rollup changes of a batch of payloads, merged in memory before one write per table.

    Many payloads of a batch share hours, days and keys: merged first, they
    cost one row each instead of one statement per payload and key.
    """

    def __init__(self) -> None:
        self.hours: Dict[int, List[int]] = {}
        # (instance_id, hour) -> the keys it reported in that hour
        self.members: Dict[Tuple[str, int], set[str]] = {}
        self.instances: Dict[str, List[int]] = {}
        # Keyed first by what a payload's keys share (its hour, day, instance): a
        # payload looks that up once, and each of its keys by the key alone.
        # hour -> key -> total
        self.key_hours: Dict[int, Dict[str, int]] = {}
        # day -> key -> [kind, last_ts, last_seq, total, value, value_ts, value_seq]
        self.key_days: Dict[int, Dict[str, List[Any]]] = {}
        # (instance_id, day) -> key -> (ts, seq, value); the latest of them per
        # instance and key is the batch's change to rollup_latest (``write``)
        self.day_values: Dict[Tuple[str, int], Dict[str, Tuple[int, int, str]]] = {}
        self.cset_days: Dict[Tuple[str, int, str], int] = {}
        self.cset_spans: Dict[Tuple[str, str, str], List[int]] = {}
        self.cset_members: set[Tuple[str, str, str, int]] = set()
        self.long_values: Dict[str, str] = {}
        # id(value) -> its canonical JSON, computed ahead by ``prepare`` (the caller keeps
        # the values alive)
        self._canonical: Dict[int, str] = {}

    def prepare(self, data: Mapping[str, Any]) -> None:
        """Encode the values of ``data`` that ``add`` will encode, ahead of time."""
        for value in data.values():
            kind = kind_of(value)
            if kind == "v":
                self._canonical[id(value)] = identity(value)
            elif kind == "s":
                for item in value:
                    self._canonical[id(item["value"])] = identity(item["value"])

    def _key_of(self, value: object) -> str:
        kind = type(value)
        if kind is str and len(value) <= _SHORT_STRING:  # type: ignore[arg-type]
            encoded: str = _encode_string(value)  # what identity() does, first
            return encoded
        if kind in _ALWAYS_SHORT:  # what identity() gives, never a long value
            return identity(value)
        canonical = self._canonical.get(id(value))
        if canonical is None:
            canonical = identity(value)
        key = value_key(canonical)
        if key is not canonical:
            self.long_values[key] = canonical
        return key

    def add(
        self,
        seq: int,
        instance_id: str,
        *,
        timestamp: str,
        received_at: str,
        data: Mapping[str, Any],
        dropped: int,
    ) -> None:
        at = effective_micros(timestamp, received_at)
        hour = at // MICROS_PER_HOUR
        day = hour // 24
        hourly = self.hours.get(hour)
        if hourly is None:
            self.hours[hour] = [1, clamp(dropped)]
        else:
            hourly[0] += 1
            hourly[1] = clamp(hourly[1] + dropped)
        # Per instance and hour; the day's and the week's are unions of these (``write``).
        keys = self.members.get((instance_id, hour))
        if keys is None:
            self.members[(instance_id, hour)] = set(data)
        else:
            keys.update(data)
        span = self.instances.get(instance_id)
        if span is None:
            self.instances[instance_id] = [day, day]
        elif day < span[0]:
            span[0] = day
        elif day > span[1]:
            span[1] = day
        key_days = self.key_days.get(day)
        if key_days is None:
            key_days = self.key_days[day] = {}
        key_hours = self.key_hours.get(hour)
        if key_hours is None:
            key_hours = self.key_hours[hour] = {}
        day_values = self.day_values.get((instance_id, day))
        if day_values is None:
            day_values = self.day_values[(instance_id, day)] = {}
        for key, value in data.items():
            of_type = type(value)
            kind = "c" if of_type is int else "v" if of_type in _PLAIN_VALUES else kind_of(value)
            daily = key_days.get(key)
            if daily is None:
                daily = key_days[key] = [kind, at, seq, 0, None, None, None]
            elif at > daily[1] or (at == daily[1] and seq > daily[2]):
                daily[0], daily[1], daily[2] = kind, at, seq
            if kind == "c":
                total = value if MIN_INT64 <= value <= MAX_INT64 else clamp(value)
                # clamp() written out for the sums that stay in range (nearly all)
                summed = key_hours.get(key, 0) + total
                key_hours[key] = summed if MIN_INT64 <= summed <= MAX_INT64 else clamp(summed)
                summed = daily[3] + total
                daily[3] = summed if MIN_INT64 <= summed <= MAX_INT64 else clamp(summed)
            elif kind == "v":
                encoded = self._key_of(value)
                if daily[5] is None or at > daily[5] or (at == daily[5] and seq > daily[6]):
                    daily[4], daily[5], daily[6] = encoded, at, seq
                of_day = day_values.get(key)
                if of_day is None or at > of_day[0] or (at == of_day[0] and seq > of_day[1]):
                    day_values[key] = (at, seq, encoded)
            else:
                cset_days, cset_spans = self.cset_days, self.cset_spans
                add_member = self.cset_members.add
                for item in value:
                    item_id = self._key_of(item["value"])
                    counted = (key, day, item_id)
                    cset_days[counted] = clamp(cset_days.get(counted, 0) + item["count"])
                    spanned = (key, item_id, instance_id)
                    item_span = cset_spans.get(spanned)
                    if item_span is None:
                        cset_spans[spanned] = [day, day]
                    elif day < item_span[0]:
                        item_span[0] = day
                    elif day > item_span[1]:
                        item_span[1] = day
                    add_member((key, item_id, instance_id, day))

    def write(self, run: Runner) -> None:
        """Apply the merged changes to the rollup tables (the caller holds the fold lock)."""
        run.executemany(_UPSERT_HOUR, [(hour, n, lost) for hour, (n, lost) in self.hours.items()])
        if self.long_values:
            run.executemany(_INSERT_LONG_VALUE, sorted(self.long_values.items()))
        self._write_members(run)
        run.executemany(
            _UPSERT_INSTANCE, [(instance, *span) for instance, span in self.instances.items()]
        )
        key_hours = [
            (key, hour, total)
            for hour, totals in self.key_hours.items()
            for key, total in totals.items()
        ]
        if key_hours:
            run.executemany(_UPSERT_KEY_HOUR, key_hours)
        key_days = [
            (key, day, *row) for day, rows in self.key_days.items() for key, row in rows.items()
        ]
        if key_days:
            run.executemany(_UPSERT_KEY_DAY, key_days)
        day_values = [
            (key, instance, day, at, seq, value)
            for (instance, day), values in self.day_values.items()
            for key, (at, seq, value) in values.items()
        ]
        if day_values:
            latest: Dict[Tuple[str, str], Tuple[str, str, int, int, int, str]] = {}
            for row in day_values:
                slot = (row[0], row[1])
                known = latest.get(slot)
                if known is None or row[3:5] > known[3:5]:  # (ts, seq)
                    latest[slot] = row
            run.executemany(_UPSERT_LATEST, list(latest.values()))
            run.executemany(_UPSERT_DAY_VALUE, day_values)
        if self.cset_days:
            run.executemany(
                _UPSERT_CSET_DAY, [(*slot, count) for slot, count in self.cset_days.items()]
            )
            run.executemany(
                _UPSERT_CSET_SPAN, [(*slot, *span) for slot, span in self.cset_spans.items()]
            )
            run.executemany(_INSERT_CSET_MEMBER, sorted(self.cset_members))

    def _write_members(self, run: Runner) -> None:
        """Which instances and keys are new to each bucket: counted once per bucket."""
        members: Dict[Tuple[str, str, int], set[str]] = {}
        for (instance, hour), keys in self.members.items():
            day = hour // 24
            members[(instance, "h", hour)] = keys
            for slot in ((instance, "d", day), (instance, "w", week_of(day))):
                union = members.get(slot)
                if union is None:
                    members[slot] = set(keys)
                else:
                    union |= keys
        slots = sorted(members)
        known: Dict[Tuple[str, str, int], set[str]] = {}
        for start in range(0, len(slots), _MEMBERS_PER_SELECT):
            chunk = slots[start : start + _MEMBERS_PER_SELECT]
            values = ", ".join(["(?, ?, ?)"] * len(chunk))
            # A join, not "IN (VALUES ...)": SQLite would scan the table for that.
            rows = run.fetchall(
                "SELECT m.instance_id, m.res, m.bucket, m.keys"  # noqa: S608
                f" FROM (VALUES {values}) AS wanted JOIN rollup_members AS m"
                " ON m.instance_id = wanted.column1 AND m.res = wanted.column2"
                " AND m.bucket = wanted.column3",
                [part for slot in chunk for part in slot],
            )
            for instance, res, bucket, keys in rows:
                known[(instance, res, int(bucket))] = set(json.loads(keys))
        active: Dict[Tuple[str, int], int] = {}
        key_instances: Dict[Tuple[str, str, int], int] = {}
        changed = []
        for slot in slots:
            instance, res, bucket = slot
            before = known.get(slot)
            if before is None:
                active[(res, bucket)] = active.get((res, bucket), 0) + 1
                before = set()
            new_keys = members[slot] - before
            if before and not new_keys:
                continue
            for key in new_keys:
                key_instances[(key, res, bucket)] = key_instances.get((key, res, bucket), 0) + 1
            changed.append((*slot, json.dumps(sorted(before | new_keys))))
        if changed:
            run.executemany(_UPSERT_MEMBER, changed)
        if active:
            run.executemany(_UPSERT_ACTIVE, [(*slot, n) for slot, n in active.items()])
        if key_instances:
            run.executemany(
                _UPSERT_KEY_INSTANCES, [(*slot, n) for slot, n in key_instances.items()]
            )


class PreparedFold:
    """The rollup changes of one large payload, for folding it in the transaction that stores it.

    Encoding the values of a payload of a million JSON values takes a large
    fraction of a second: done here, before the write transaction, it does not
    hold the database's single writer (nor, in the serving process, the GIL
    during a later fold of pending payloads). Folding is order-independent, so
    folding this payload before older pending ones gives the same rollups.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data
        self._batch = _Batch()
        self._batch.prepare(data)

    def write(
        self, run: Runner, seq: int, instance_id: str, *, timestamp: str, received_at: str,
        dropped: int,
    ) -> None:
        """Add the payload stored as ``seq`` to the rollups (inside its write transaction)."""
        self._batch.add(
            seq, instance_id, timestamp=timestamp, received_at=received_at, data=self._data,
            dropped=dropped,
        )
        self._batch.write(run)


PendingPayload = Tuple[int, str, str, str, Mapping[str, Any], int]
"""(seq, instance_id, timestamp, received_at, data, dropped) of a stored payload."""


ParsedPayloads = Mapping[int, Tuple[str, Mapping[str, Any]]]
"""Payloads still in memory: ``seq`` -> (the data's stored JSON text, that text decoded)."""


def _dequeue(run: Runner, seqs: List[int]) -> None:
    run.executemany("DELETE FROM rollup_pending WHERE seq = ?", [(seq,) for seq in seqs])


def fold_pending(
    run: Runner,
    select_pending: Union[str, Callable[[Runner, int], Sequence[Tuple[Any, ...]]]],
    parsed: Optional[ParsedPayloads] = None,
    *,
    mark_folded: Callable[[Runner, List[int]], None] = _dequeue,
) -> int:
    """Add every pending payload to the rollups and mark it folded.

    ``select_pending`` selects up to ``?`` pending payloads as ``PendingPayload``
    rows (``data`` as JSON text or already decoded), oldest first (by ``seq``); or
    it is a function of the runner and that limit that returns those rows.
    ``mark_folded(run, seqs)`` makes each batch folded no longer pending; by
    default it takes them out of ``rollup_pending``. The caller holds a write
    transaction that no other fold runs beside. Returns how many payloads were
    added.

    ``parsed`` spares decoding the data of payloads the caller still holds: an
    entry is used only when its text is the text stored, so a stale one (another
    process folded that payload, a rolled-back ``seq`` was reused) costs nothing
    but the comparison.
    """
    parsed = parsed or {}
    folded = 0
    while True:
        rows: Sequence[Tuple[Any, ...]]
        if isinstance(select_pending, str):
            rows = run.fetchall(select_pending, (FOLD_BATCH,))
        else:
            rows = select_pending(run, FOLD_BATCH)
        if not rows:
            return folded
        batch = _Batch()
        for seq, instance_id, timestamp, received_at, stored_data, dropped in rows:
            if isinstance(stored_data, str):
                held = parsed.get(seq)
                if held is not None and held[0] == stored_data:
                    data = held[1]
                else:
                    data = json.loads(stored_data)
            else:
                data = stored_data
            batch.add(
                int(seq),
                instance_id,
                timestamp=timestamp,
                received_at=received_at,
                data=data,
                dropped=int(dropped),
            )
        batch.write(run)
        mark_folded(run, [int(row[0]) for row in rows])
        folded += len(rows)
        if len(rows) < FOLD_BATCH:
            return folded
