"""What every store shares: the ``Store`` seam, its records, and the rules for totals.

``Store`` is deliberately small and SQL-agnostic: the WSGI app and the test
harness know storage only through it, and ``_sqlite`` and ``_postgres``
implement it. Rate-limit state lives in the store too, so that several worker
processes sharing one database share one limit. This module imports no other
module of the package: the backends, the app and the harness sit above it.
"""

from __future__ import annotations

import json
import json.encoder
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_EVENT_PAGE",
    "INT64_MAX",
    "INT64_MIN",
    "RATE_WINDOW_PRUNE_INTERVAL",
    "EventQuery",
    "EventRecord",
    "PayloadRecord",
    "Runner",
    "Store",
    "StoredPayload",
    "UnstorablePayload",
    "aggregate_keys",
    "count_tree",
    "encode_compact",
    "event_filters",
    "event_row",
    "format_time",
    "is_counting_set",
    "is_postgres_url",
    "json_encoder",
    "redact_url",
    "saturate",
    "stored_payload",
    "value_identity",
]


DEFAULT_EVENT_PAGE = 100

def json_encoder(*, sort_keys: bool) -> Callable[[Any], str]:
    """``json.dumps(value, separators=(",", ":"), sort_keys=sort_keys)``, cheaper per call.

    ``json.JSONEncoder.encode`` builds its C encoder and a dict of the objects it is
    in on every call (a few µs on a small value); this one is built once and keeps
    no such dict: values must be free of reference cycles, as decoded JSON and the
    app's answers are (a cycle raises ``RecursionError``, not ``ValueError``).
    """
    plain = json.JSONEncoder(separators=(",", ":"), sort_keys=sort_keys)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator in this Python
        return plain.encode
    encode_string = json.encoder.encode_basestring_ascii
    encoder = make(None, plain.default, encode_string, None, ":", ",", sort_keys, False, True)
    join = "".join

    def encode(value: Any) -> str:
        if type(value) is str:
            return encode_string(value)
        return join(encoder(value, 0))

    return encode


encode_compact = json_encoder(sort_keys=False)
"""``json.dumps(value, separators=(",", ":"))`` without building an encoder per call."""


def format_time(moment: datetime) -> str:
    """``moment`` in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``: how times are stored (as
    text, this sorts as time)."""
    utc = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True)
class EventRecord:
    """One validated event, as the app hands it to the store (with its payload)."""

    instance_id: str
    event_id: str
    event_time: str
    """UTC, microseconds, ``Z`` (``format_time``)."""
    counted_at: str
    """When the event counts: its ``event_time``, or its arrival if that is earlier."""
    event_type: str
    event_name: str
    attrs: Mapping[str, Any]
    payload_id: str
    received_at: str


@dataclass(frozen=True)
class EventQuery:
    """``GET /v1/events``: filters, the ``[since, until)`` window (``format_time``
    strings, on ``counted_at``), and the page."""

    since: str
    until: str
    event_type: Optional[str] = None
    event_name: Optional[str] = None
    instance_id: Optional[str] = None
    limit: int = DEFAULT_EVENT_PAGE
    offset: int = 0


def event_filters(query: EventQuery, placeholder: str) -> Tuple[List[str], List[Any]]:
    """The ``WHERE`` conditions (joined by ``AND``) and their parameters for ``query``'s
    window and filters; ``placeholder`` is the driver's (``?`` or ``%s``)."""
    conditions = [f"counted_at >= {placeholder}", f"counted_at < {placeholder}"]
    parameters: List[Any] = [query.since, query.until]
    for column, value in (
        ("event_type", query.event_type),
        ("event_name", query.event_name),
        ("instance_id", query.instance_id),
    ):
        if value is not None:
            conditions.append(f"{column} = {placeholder}")
            parameters.append(value)
    return conditions, parameters


def event_row(  # noqa: PLR0917 - one argument per column, in the tables' order
    instance_id: str, event_id: str, event_time: str, event_type: str, event_name: str,
    attrs: Mapping[str, Any], received_at: str,
) -> Dict[str, Any]:
    """One stored event as ``/v1/events`` answers it: its fields, its attributes apart."""
    return {
        "instance_id": instance_id,
        "event_id": event_id,
        "event_time": event_time,
        "event_type": event_type,
        "event_name": event_name,
        "attrs": dict(attrs),
        "received_at": received_at,
    }


def count_tree(rows: Iterable[Sequence[Any]]) -> Dict[str, Dict[str, int]]:
    """``(type, name, count)`` rows as ``{type: {name: total}}``, sorted."""
    totals: Dict[str, Dict[str, int]] = {}
    for event_type, event_name, count in rows:
        names = totals.setdefault(event_type, {})
        names[event_name] = names.get(event_name, 0) + int(count)
    return {t: dict(sorted(names.items())) for t, names in sorted(totals.items())}


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

    @classmethod
    def of(
        cls,
        *,
        payload_id: str,
        instance_id: str,
        timestamp: str,
        received_at: str,
        data: Mapping[str, Any],
        client: Optional[Mapping[str, Any]],
        events: Sequence[EventRecord],
    ) -> PayloadRecord:
        """The same record as ``PayloadRecord(...)``, made faster: a frozen dataclass's
        constructor sets each field through ``object.__setattr__`` (a few µs for all)."""
        record = object.__new__(cls)
        record.__dict__.update(
            payload_id=payload_id,
            instance_id=instance_id,
            timestamp=timestamp,
            received_at=received_at,
            data=data,
            client=client,
            events=events,
        )
        return record


@dataclass(frozen=True)
class StoredPayload:
    """One stored payload as a page of ``/v1/instances/<id>`` serves it: JSON kept as text."""

    payload_id: str
    timestamp: str
    received_at: str
    data: str
    """The ``data`` object as JSON text."""
    client: Optional[str]
    """The ``client`` object as JSON text, or None."""

    @property
    def size(self) -> int:
        return len(self.data) + len(self.client or "") + 200


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

RATE_WINDOW_PRUNE_INTERVAL = 60.0
"""Seconds between two sweeps of expired rate-limit windows (per store object)."""


def saturate(number: int) -> int:
    """``number`` clamped to signed 64 bits: what every sum the server answers with becomes."""
    return INT64_MAX if number > INT64_MAX else INT64_MIN if number < INT64_MIN else number


class UnstorablePayload(ValueError):
    """The store cannot represent this (valid) payload, e.g. ``\\u0000`` in PostgreSQL's jsonb."""


class Runner(Protocol):
    """One open transaction on a store, with ``?`` placeholders whatever the backend.

    The rollups, the window queries and the stored policy are written once
    against it; each backend adapts its connection (PostgreSQL's rewrites
    ``?`` to ``%s``: none of that SQL uses a literal ``?`` or ``%``).
    """

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]: ...


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
        (``format_time`` strings), from hourly counts kept at ingest."""
        ...

    def instance_payloads(self, instance_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        """That instance's payloads, newest first: dicts with ``payload_id``, ``timestamp``,
        ``received_at``, ``data``, ``client`` (see ``stored_payload``)."""
        ...

    def instance_page(
        self, instance_id: str, limit: int, offset: int, max_bytes: int
    ) -> tuple[list[StoredPayload], bool]:
        """Up to ``limit`` of that instance's payloads from ``offset``, newest first, ending
        early once they hold ``max_bytes`` (at least one is given); and whether more follow.

        Never holds more than about ``max_bytes`` (plus one payload) in memory.
        """
        ...

    def storage_bytes(self) -> int:
        """How much space the stored data takes in the database, in bytes (cheap to call)."""
        ...

    def all_payloads(self) -> list[dict[str, Any]]:
        """Every stored payload in arrival order, each also with its ``instance_id``;
        for tests and tools."""
        ...

    def check_rate(
        self, instance_id: str, limit: int, window_s: float, now: float
    ) -> Optional[float]:
        """Count one payload against ``limit`` per ``window_s`` for ``instance_id`` (any key).

        Returns None when it is allowed (and counted), else the seconds until it
        would be allowed (and nothing is counted). Windows that ended are deleted
        now and then, so the table holds only recent keys.
        """
        ...

    def fold_rollups(self) -> int:
        """Add every payload stored so far to the rollups (queries call it first); how many."""
        ...

    def reading(self) -> AbstractContextManager[Runner]:
        """A read-only transaction on one snapshot (queries, the stored policy)."""
        ...

    def writing(self) -> AbstractContextManager[Runner]:
        """A write transaction, serialised with every other one (across processes too)."""
        ...

    def close(self) -> None: ...


def stored_payload(
    payload_id: str,
    timestamp: str,
    received_at: str,
    data: Any,
    client: Any,
    *,
    instance_id: Optional[str] = None,
) -> dict[str, Any]:
    """A stored payload as the stores hand it out (``instance_id`` only when given)."""
    row: dict[str, Any] = {"payload_id": payload_id}
    if instance_id is not None:
        row["instance_id"] = instance_id
    row.update(timestamp=timestamp, received_at=received_at, data=data, client=client)
    return row


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


def value_identity(value: object) -> str:
    """What makes two counting-set values one, and the order they are listed in."""
    return json.dumps(value, sort_keys=True)


def aggregate_keys(datas: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-key totals over payload ``data`` objects given in arrival order.

    Integers (not bools) are summed; counting sets are merged with their counts
    summed, sorted by the JSON encoding of the value; anything else is the
    latest value. When a key changes kind, the latest value replaces the total
    and accumulation starts again from it. Sums are exact, then saturated to
    signed 64 bits, so they always fit any JSON reader and any store.
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
                    identity = value_identity(item["value"])
                    merged.setdefault(identity, [item["value"], 0])[1] += item["count"]
            else:
                counters.pop(key, None)
                counting_sets.pop(key, None)
                latest[key] = value
    totals: dict[str, Any] = {**latest}
    for key, total in counters.items():
        totals[key] = saturate(total)
    for key, merged in counting_sets.items():
        totals[key] = [
            {"value": merged[k][0], "count": saturate(merged[k][1])} for k in sorted(merged)
        ]
    return dict(sorted(totals.items()))


def is_postgres_url(db: str) -> bool:
    """Whether ``--db``/``create_app(db=...)`` names a PostgreSQL database."""
    return db.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))
