"""Events in payloads: their validation, and the ``/v1/events`` query string.

Pure functions, no SQL: they make the ``EventRecord`` rows the stores keep and
the ``EventQuery`` they answer (both in ``_storage``). An event on the wire is one flat JSON object:
``event_id`` (32 lowercase hex), ``event_time`` (RFC 3339), ``event_type``,
``event_name`` and scalar attributes. Each is stored once per
``(instance_id, event_id)``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ._storage import DEFAULT_EVENT_PAGE, EventQuery, EventRecord, format_time

__all__ = [
    "MAX_EVENT_PAGE",
    "InvalidEvent",
    "parse_event_query",
    "parse_time",
    "validate_events",
    "window",
]

MAX_NAME_LENGTH = 256
MAX_STRING_LENGTH = 1024
MAX_EVENT_BYTES = 16 * 1024
MAX_EVENT_PAGE = 1000
DEFAULT_WINDOW = timedelta(days=30)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_REQUIRED = ("event_id", "event_time", "event_type", "event_name")

_EVENT_ID = re.compile(r"[0-9a-f]{32}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
# How the client writes times (and how they are stored).
_CANONICAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
# Bytes of event_id, event_time and JSON punctuation, beyond the names and values.
_ROOM_FOR_FIELDS = 120


class InvalidEvent(ValueError):
    """An event of a payload is not acceptable: the whole payload is refused (400)."""

    def __init__(self, index: int, field: Optional[str], problem: str) -> None:
        where = f"events[{index}]" + (f".{field}" if field is not None else "")
        super().__init__(f"{where}: {problem}")
        self.index = index
        self.field = field


def parse_time(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset, any fraction, truncated to microseconds); ValueError."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    microsecond = int((fraction + "000000")[:6])
    if offset in ("Z", "z"):
        zone = timezone.utc
    else:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("bad UTC offset")
        sign = -1 if offset[0] == "-" else 1
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        moment = datetime(year, month, day, hour, minute, second, microsecond, tzinfo=zone)
        return moment.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("time out of range") from None


def _text_problem(text: str) -> Optional[str]:
    """Why ``text`` cannot be stored everywhere, or None (jsonb refuses both)."""
    if "\x00" in text:
        return "contains \\u0000"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate"
    return None


def _name_problem(value: object) -> Optional[str]:
    if not isinstance(value, str):
        return "must be a string"
    if not 0 < len(value) <= MAX_NAME_LENGTH:
        return f"must be 1 to {MAX_NAME_LENGTH} characters"
    if value.isascii() and "\x00" not in value:
        return None
    return _text_problem(value)


def _value_problem(value: object) -> Optional[str]:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT64_MIN <= value <= _INT64_MAX else "does not fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "is not a finite number"
    if isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            return f"is longer than {MAX_STRING_LENGTH} characters"
        return _text_problem(value)
    return "must be a string, number, boolean or null"


def _event_time(index: int, value: object) -> str:
    """``value`` in ``format_time``'s form; the form itself passes quickly."""
    if isinstance(value, str) and _CANONICAL_TIME.fullmatch(value):
        try:
            datetime.fromisoformat(value[:-1])  # the fields' ranges (month 1 to 12 ...)
        except ValueError as exc:
            raise InvalidEvent(index, "event_time", f"must be an RFC 3339 time ({exc})") from None
        return value
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return format_time(parse_time(value))
    except ValueError as exc:
        raise InvalidEvent(index, "event_time", f"must be an RFC 3339 time ({exc})") from None


def _validate_event(
    index: int, event: object, instance_id: str, payload_id: str, received_at: str
) -> EventRecord:
    if not isinstance(event, dict):
        raise InvalidEvent(index, None, "must be an object")
    for field in _REQUIRED:
        if field not in event:
            raise InvalidEvent(index, field, "is missing")
    event_id = event["event_id"]
    if not isinstance(event_id, str) or not _EVENT_ID.fullmatch(event_id):
        raise InvalidEvent(index, "event_id", "must be 32 lowercase hex digits")
    event_time = _event_time(index, event["event_time"])
    chars = 0
    for field in ("event_type", "event_name"):
        problem = _name_problem(event[field])
        if problem is not None:
            raise InvalidEvent(index, field, problem)
        chars += len(event[field])
    attrs: Dict[str, Any] = {}
    for name, value in event.items():
        if name in _REQUIRED:
            continue
        problem = _name_problem(name)
        if problem is not None:
            raise InvalidEvent(index, name[:60], f"attribute name {problem}")
        if name.startswith("event_"):
            raise InvalidEvent(index, name[:60], "attribute names must not start with event_")
        problem = _value_problem(value)
        if problem is not None:
            raise InvalidEvent(index, name[:60], problem)
        attrs[name] = value
        chars += len(name) + (len(value) if isinstance(value, str) else 24)
    # Measured only when it might be too big (a character encodes to at most 6 bytes).
    if 6 * chars + 8 * len(event) + _ROOM_FOR_FIELDS > MAX_EVENT_BYTES:
        size = len(json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        if size > MAX_EVENT_BYTES:
            raise InvalidEvent(index, None, f"is larger than {MAX_EVENT_BYTES} bytes")
    return EventRecord(
        instance_id=instance_id,
        event_id=event_id,
        event_time=event_time,
        counted_at=min(event_time, received_at),
        event_type=event["event_type"],
        event_name=event["event_name"],
        attrs=attrs,
        payload_id=payload_id,
        received_at=received_at,
    )


def validate_events(
    events: object, instance_id: str, payload_id: str, received_at: str
) -> List[EventRecord]:
    """The stored form of a payload's ``events`` (absent or null: none).

    Raises ``InvalidEvent`` (naming the event's index and field) for the first
    bad one. ``received_at`` must be in ``format_time``'s form.
    """
    if events is None:
        return []
    if not isinstance(events, list):
        raise ValueError("events must be an array")
    return [
        _validate_event(index, event, instance_id, payload_id, received_at)
        for index, event in enumerate(events)
    ]


def _query_time(name: str, text: str) -> str:
    """A ``since``/``until`` bound: RFC 3339, or ``YYYY-MM-DD`` meaning 00:00 UTC."""
    match = _DATE.fullmatch(text)
    try:
        if match is not None:
            year, month, day = (int(part) for part in match.groups())
            return format_time(datetime(year, month, day, tzinfo=timezone.utc))
        return format_time(parse_time(text))
    except ValueError as exc:
        raise ValueError(f"{name} must be RFC 3339 or YYYY-MM-DD ({exc})") from None


def _last(query: Mapping[str, Sequence[str]], name: str) -> Optional[str]:
    values = query.get(name)
    return values[-1] if values else None


def _count(query: Mapping[str, Sequence[str]], name: str, default: int, high: int) -> int:
    text = _last(query, name)
    if text is None:
        return default
    text = text.strip()
    if not (0 < len(text) <= 18 and text.isascii() and text.isdigit()) or int(text) > high:
        raise ValueError(f"{name} must be an integer from 0 to {high}")
    return int(text)


def window(query: Mapping[str, Sequence[str]], now: datetime) -> Tuple[str, str]:
    """``[since, until)`` from the query; by default the 30 days up to ``now``."""
    until_text, since_text = _last(query, "until"), _last(query, "since")
    until = _query_time("until", until_text) if until_text else format_time(now)
    if since_text:
        since = _query_time("since", since_text)
    else:
        since = format_time(parse_time(until) - DEFAULT_WINDOW)
    return since, until


def parse_event_query(query: Mapping[str, Sequence[str]], now: datetime) -> EventQuery:
    """The ``GET /v1/events`` query string's meaning; ``ValueError`` says what is wrong."""
    since, until = window(query, now)
    instance = _last(query, "instance")
    if instance is not None:
        instance = instance.lower()
        if not _UUID.fullmatch(instance):
            raise ValueError("instance must be a UUID")
    limit = _count(query, "limit", DEFAULT_EVENT_PAGE, MAX_EVENT_PAGE)
    if limit == 0:
        raise ValueError(f"limit must be an integer from 1 to {MAX_EVENT_PAGE}")
    return EventQuery(
        since=since,
        until=until,
        event_type=_last(query, "type") or None,
        event_name=_last(query, "name") or None,
        instance_id=instance,
        limit=limit,
        offset=_count(query, "offset", 0, _INT64_MAX),
    )
