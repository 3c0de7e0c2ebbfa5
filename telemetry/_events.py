"""Events and leveled logs: validation, the bounded event buffer, ``Recorder``.

An event says what happened and when (Rill's activity events); a log is an
event of type ``"log"`` named by its level (Flow's ops logs). Events ride in
the same payloads as the buffer's data, under the same consent, bounds and
retries. Like the buffer, this module does no I/O: the wall clock is injected,
and warnings are logged after the lock is released.

An event is buffered as a tuple; its wire form (one flat JSON object) is
built when the emitter takes the events, off the application's threads. Its
``event_time`` is fixed when it is recorded; its random ``event_id`` is drawn
when it is taken (before that nothing can see it; an ``event_filter`` gets it
at record time), and neither ever changes after: retries, restarts and the
spool carry the payload as it was taken.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Set,
    Tuple,
    Union,
)

from telemetry._log import logger, report_internal_error

__all__ = [
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_MAX_EVENTS",
    "EVENT_TYPE_BEHAVIORAL",
    "EVENT_TYPE_LOG",
    "EVENT_TYPE_METRIC",
    "LEVELS",
    "NULL_EVENTS",
    "EventBuffer",
    "EventFilter",
    "EventSnapshot",
    "EventTarget",
    "NullEvents",
    "Recorder",
    "event_key_disabled",
    "format_event_time",
    "parse_log_level",
]

EVENT_TYPE_LOG = "log"
EVENT_TYPE_METRIC = "metric"
EVENT_TYPE_BEHAVIORAL = "behavioral"

LEVELS = ("error", "warn", "info", "debug", "trace")
"""Flow's log levels, most severe first."""
_LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}
DEFAULT_LOG_LEVEL = "info"
DEFAULT_MAX_EVENTS = 10_000

MAX_NAME_LENGTH = 256
MAX_STRING_LENGTH = 1024
MAX_EVENT_BYTES = 16 * 1024
EVENTS_KEY = "events"
"""The disabled key that turns off every event; ``events:<type>[:<name>]`` narrower."""

_RESERVED_PREFIX = "event_"
_REQUIRED = ("event_id", "event_time", "event_type", "event_name")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Bytes for event_id, event_time, the braces and the four field names. An event whose
# text has few characters is certainly small enough (a character encodes to at most
# 6 bytes, as \u00XX; a number to at most 24 plus quotes, colon and comma): only
# events near the limit are measured.
_ROOM_FOR_FIELDS = 120
_MAX_WARNED = 1024
_MAX_CHECKED = 4096
_DISABLED = "<disabled>"
# Putting events in wire form hands the GIL back after this long (seconds), looking
# at the clock every ``_EVENTS_PER_LOOK`` events (see ``EventBuffer.take``).
_PAUSE_INTERVAL = 0.001
_EVENTS_PER_LOOK = 32

# Patterns for ``record_raw`` only: compiled on first use (by ``re``'s cache), not
# on ``import telemetry``.
_EVENT_ID = r"[0-9a-fA-F]{32}"
_DASHED_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_CANONICAL_TIME = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z"
_TIMESTAMP = (
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)

EventFilter = Callable[[Dict[str, Any]], object]
"""``init(event_filter=...)``: called with each event in wire form; false drops it."""

# (event_id, event_time, event_type, event_name, attrs): the id is None until the
# event is taken (it is drawn then, once: nothing sees an event before), or, for a
# proxied or filtered event, already text; the time is epoch seconds, or already text.
# The last element says whether the attributes were checked already (else: at take).
_Event = Tuple[Optional[str], Union[float, str], str, str, Dict[str, Any], bool]


def parse_log_level(level: object) -> str:
    """``level`` if it is one of ``LEVELS``; raises ``ValueError`` otherwise (init)."""
    if not (isinstance(level, str) and level in _LEVEL_RANK):
        raise ValueError(f"log_level must be one of {', '.join(LEVELS)}, not {level!r}")
    return str.__str__(level)


def event_key_disabled(disabled: FrozenSet[str], event_type: str, event_name: str) -> bool:
    """Whether ``events``, ``events:<type>`` or ``events:<type>:<name>`` is in ``disabled``."""
    return (
        EVENTS_KEY in disabled
        or f"events:{event_type}" in disabled
        or f"events:{event_type}:{event_name}" in disabled
    )


def format_event_time(when: float) -> str:
    """Epoch seconds as RFC 3339 UTC with microseconds and ``Z``."""
    micros = round(when * 1_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    moment = datetime(1970, 1, 1) + timedelta(seconds=seconds, microseconds=fraction)
    return moment.isoformat(timespec="microseconds") + "Z"


def wire_event(event_id: str, event_time: str, event_type: str, event_name: str,
               attrs: Dict[str, Any]) -> Dict[str, Any]:
    """An event as the wire carries it (and as an ``event_filter`` sees it): a flat object."""
    return {"event_id": event_id, "event_time": event_time, "event_type": event_type,
            "event_name": event_name, **attrs}


def _normalize_time(text: str) -> Optional[str]:
    """An RFC 3339 time as ``format_event_time`` writes it (the same instant), or None."""
    if re.fullmatch(_CANONICAL_TIME, text):  # already in that form: check its fields only
        try:
            datetime.fromisoformat(text[:-1])
        except ValueError:
            return None
        return text
    match = re.fullmatch(_TIMESTAMP, text)
    if match is None:
        return None
    date, clock, fraction, zone = match.groups()
    micros = (fraction or "").ljust(6, "0")[:6]
    offset = "+00:00" if zone in ("Z", "z") else zone
    try:
        moment = datetime.fromisoformat(f"{date}T{clock}.{micros}{offset}")
        utc = moment.astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return None
    return utc.isoformat(timespec="microseconds") + "Z"


def _text_problem(text: str, what: str) -> Optional[str]:
    """Why ``text`` cannot be stored everywhere (``\\u0000``, a lone surrogate), or None."""
    if "\x00" in text:
        return f"{what} contains \\u0000"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"{what} contains a lone surrogate"
    return None


def _field_problem(value: object, what: str) -> Optional[str]:
    if not isinstance(value, str):
        return f"{what} must be a str, not {type(value).__name__}"
    if not 0 < len(value) <= MAX_NAME_LENGTH:
        return f"{what} must be 1 to {MAX_NAME_LENGTH} characters"
    return _text_problem(value, what)


def _attrs_problem(attrs: Dict[str, Any], event_type: str, event_name: str) -> Optional[str]:
    """Why ``attrs`` cannot go on the wire with this type and name, or None; turns
    subclasses of str, int and float (enums ...) into the plain values they stand
    for, in place."""
    chars = len(event_type) + len(event_name)
    for name, value in attrs.items():
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LENGTH:
            return f"attribute name {name!r:.60} must be a str of 1 to {MAX_NAME_LENGTH} characters"
        if name.startswith(_RESERVED_PREFIX):
            return f"attribute name {name!r:.60} must not start with {_RESERVED_PREFIX!r}"
        if "\x00" in name or not name.isascii():
            problem = _text_problem(name, "attribute name")
            if problem is not None:
                return problem
        chars += len(name)
        kind = type(value)
        if kind is str:
            if len(value) > MAX_STRING_LENGTH:
                return f"attribute {name!r:.60} is longer than {MAX_STRING_LENGTH} characters"
            chars += len(value)
            if "\x00" in value or not value.isascii():
                problem = _text_problem(value, f"attribute {name!r:.60}")
                if problem is not None:
                    return problem
        elif kind is int:
            if not _INT64_MIN <= value <= _INT64_MAX:
                return f"attribute {name!r:.60} does not fit in 64 bits"
        elif kind is float:
            if not math.isfinite(value):
                return f"attribute {name!r:.60} is not a finite number"
        elif value is not None and kind is not bool:
            if not isinstance(value, (str, int, float)):
                return (
                    f"attribute {name!r:.60} is a {kind.__name__}; attribute values are "
                    "str, int, float, bool or None"
                )
            # Rare (an enum member ...): store the plain value, then check again.
            attrs[name] = (
                str.__str__(value) if isinstance(value, str)
                else int(value) if isinstance(value, int)
                else float(value)
            )
            return _attrs_problem(attrs, event_type, event_name)
    if 6 * chars + 30 * len(attrs) + _ROOM_FOR_FIELDS > MAX_EVENT_BYTES:
        # Might be too big: measure it (rare; short events never get here).
        whole = {**attrs, "event_type": event_type, "event_name": event_name}
        text = json.dumps(whole, ensure_ascii=False, separators=(",", ":"))
        if len(text.encode("utf-8")) + _ROOM_FOR_FIELDS > MAX_EVENT_BYTES:
            return f"event is larger than {MAX_EVENT_BYTES} bytes once encoded"
    return None


def _describe(value: object) -> str:
    """``value`` for a log line: its first 60 characters, quoted and escaped as ``repr``
    escapes them (no raw line break, terminal escape or lone surrogate reaches the log);
    never calls its ``__str__``."""
    return repr(str.__str__(value)[:60]) if isinstance(value, str) else f"<{type(value).__name__}>"


class EventSnapshot(NamedTuple):
    """What ``EventBuffer.take`` removed: events in wire form, in recording order;
    events rejected (invalid, a filter that raised) and events dropped for want of room."""

    events: Sequence[Dict[str, Any]]
    """An ``EncodedEvents``: the events kept as their JSON text."""
    rejected: int
    dropped_events: int


class EventTarget(Protocol):
    """Where event calls go: an ``EventBuffer`` when on, ``NULL_EVENTS`` when off.

    ``bound`` holds a ``Recorder``'s attributes (call attributes win over them).
    """

    def record(self, event_type: object, event_name: object, attrs: Dict[str, Any],
               bound: Optional[Mapping[str, Any]]) -> None: ...

    def log(self, level: object, message: object, attrs: Dict[str, Any],
            bound: Optional[Mapping[str, Any]]) -> None: ...

    def record_raw(self, event: object, bound: Optional[Mapping[str, Any]]) -> bool: ...


class NullEvents:
    """Telemetry is off (or not initialised): every event call does nothing."""

    def record(self, event_type: object, event_name: object, attrs: Dict[str, Any],
               bound: Optional[Mapping[str, Any]]) -> None:
        pass

    def log(self, level: object, message: object, attrs: Dict[str, Any],
            bound: Optional[Mapping[str, Any]]) -> None:
        pass

    def record_raw(self, event: object, bound: Optional[Mapping[str, Any]]) -> bool:
        return True  # nothing to check: off is a no-op, not a rejection


NULL_EVENTS = NullEvents()


class EventBuffer:
    """Thread-safe, bounded buffer of events, with the checks every event passes.

    In order: the event is valid (else rejected: counted, one warning per type and
    name); its key is not disabled (else dropped silently); ``event_filter`` keeps
    it (false: dropped silently; raising: rejected); there is room (else counted
    in ``dropped_events``).
    """

    def __init__(
        self,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        log_level: str = DEFAULT_LOG_LEVEL,
        event_filter: Optional[EventFilter] = None,
        wall_clock: Callable[[], float] = time.time,
        disabled_keys: Iterable[str] = (),
    ) -> None:
        self.max_events = max_events
        self.log_level = parse_log_level(log_level)
        self._threshold = _LEVEL_RANK[self.log_level]
        self._filter = event_filter
        self._wall_clock = wall_clock
        self._disabled: FrozenSet[str] = frozenset()
        self._lock = threading.Lock()
        self._events: List[_Event] = []
        self._rejected = 0
        self._dropped_events = 0
        self._warned: Set[Tuple[str, str]] = set()
        self._warned_full = False
        # Types and names that passed every check, when there is no filter (see ``record``).
        self._checked_pairs: Set[Tuple[str, str]] = set()
        self.set_disabled_keys(disabled_keys)

    # -- the event calls -------------------------------------------------------

    def record(self, event_type: object, event_name: object, attrs: Dict[str, Any],
               bound: Optional[Mapping[str, Any]] = None) -> None:
        """Buffer one event; ``attrs`` must be the caller's private dict (it is kept).

        The common case takes no lock: a type and name that passed every check
        before (``_checked_pairs``, which also means "not disabled" and "no
        ``event_filter``") appends one tuple to ``_events`` (``list.append`` is
        atomic) while there is room. Threads racing past the room check may
        overshoot ``max_events`` by a few; ``take`` keeps the first
        ``max_events`` and counts the rest as dropped. Its attributes are checked
        when the event is taken, on the emitter's thread (a bad one is rejected
        then, counted and warned about as here). Anything else is checked now, in
        ``_slow_problem``.
        """
        try:
            if bound:
                attrs = {**bound, **attrs}
            try:
                known = (event_type, event_name) in self._checked_pairs
            except TypeError:  # unhashable: certainly not a str
                known = False
            if known:
                events = self._events
                if len(events) < self.max_events:
                    events.append(
                        (None, self._wall_clock(), event_type, event_name, attrs, False))  # type: ignore[arg-type]
                    return
                self._add(None, self._wall_clock(), event_type, event_name, attrs,  # type: ignore[arg-type]
                          checked=False)
                return
            when = self._wall_clock()
            problem = self._slow_problem(event_type, event_name, attrs)
            if problem is _DISABLED:
                return
            if problem is not None:
                self._reject(event_type, event_name, problem)
                return
            self._add(None, when, event_type, event_name, attrs)  # type: ignore[arg-type]
        except Exception as exc:
            report_internal_error("record", exc)

    def _slow_problem(self, event_type: object, event_name: object,
                      attrs: Dict[str, Any]) -> Optional[str]:
        """Every check of an event; ``_DISABLED`` when its key is disabled. Remembers a
        type and name that passed, so that their next events take ``record``'s quick
        path (never with an ``event_filter``: it sees each event at once)."""
        problem = _field_problem(event_type, "event_type") or _field_problem(
            event_name, "event_name"
        )
        if problem is not None:
            return problem
        assert isinstance(event_type, str) and isinstance(event_name, str)
        event_type, event_name = str.__str__(event_type), str.__str__(event_name)
        if self._disabled and event_key_disabled(self._disabled, event_type, event_name):
            return _DISABLED
        problem = _attrs_problem(attrs, event_type, event_name)
        if problem is not None:
            return problem
        if self._filter is None and len(self._checked_pairs) < _MAX_CHECKED:
            self._checked_pairs.add((event_type, event_name))
        return None

    def log(self, level: object, message: object, attrs: Dict[str, Any],
            bound: Optional[Mapping[str, Any]] = None) -> None:
        """A log event: type ``"log"``, named by its level, with a ``message`` attribute."""
        try:
            rank = _LEVEL_RANK[level]  # type: ignore[index]
        except (KeyError, TypeError):
            self._reject(EVENT_TYPE_LOG, level, f"unknown level; use one of {', '.join(LEVELS)}")
            return
        if rank > self._threshold:
            return
        try:
            if bound:
                attrs = {**bound, **attrs}
            attrs["message"] = message
            self.record(EVENT_TYPE_LOG, level, attrs)
        except Exception as exc:
            report_internal_error("log", exc)

    def record_raw(self, event: object, bound: Optional[Mapping[str, Any]] = None) -> bool:
        """Buffer an event built elsewhere, keeping its ``event_id`` and ``event_time``.

        Returns False (the event is counted as rejected, and warned about once per
        type and name) when it is not a mapping, a required field is missing or
        bad, or an attribute is not acceptable. ``bound`` attributes are added
        where the event has none of that name.
        """
        try:
            if not isinstance(event, Mapping):
                self._reject("?", "?", f"record_raw() takes a mapping, not {type(event).__name__}")
                return False
            fields = dict(event)
            event_type, event_name = fields.get("event_type"), fields.get("event_name")
            event_id, event_time = fields.get("event_id"), fields.get("event_time")
            problem = _field_problem(event_type, "event_type") or _field_problem(
                event_name, "event_name"
            )
            if problem is None:
                problem, event_id = _raw_id(event_id)
            if problem is None:
                normalized = _normalize_time(event_time) if isinstance(event_time, str) else None
                if normalized is None:
                    problem = f"event_time must be an RFC 3339 time, not {event_time!r:.60}"
                event_time = normalized
            for name in _REQUIRED:
                fields.pop(name, None)
            if bound:
                fields = {**bound, **fields}
            if problem is None:
                problem = _attrs_problem(fields, event_type, event_name)  # type: ignore[arg-type]
            if problem is not None:
                self._reject(event_type, event_name, problem)
                return False
            return self._add(event_id, event_time, event_type, event_name, fields)  # type: ignore[arg-type]
        except Exception as exc:
            report_internal_error("record_raw", exc)
            return False

    def _add(self, event_id: Optional[str], when: Union[float, str], event_type: str,
             event_name: str, attrs: Dict[str, Any], *, checked: bool = True) -> bool:
        """Keep a valid event unless disabled, filtered out or out of room; False when a
        filter raised (rejected). ``checked``: its attributes were checked already."""
        if self._disabled and event_key_disabled(self._disabled, event_type, event_name):
            return True
        if self._filter is not None:
            if event_id is None:
                event_id = os.urandom(16).hex()
            when = when if isinstance(when, str) else format_event_time(when)
            wire = wire_event(event_id, when, event_type, event_name, attrs)
            try:
                keep = bool(self._filter(wire))
            except Exception as exc:
                self._reject(event_type, event_name,
                             f"event_filter raised {type(exc).__name__}: {exc}", filtered=True)
                return False
            if not keep:
                return True
        with self._lock:
            if len(self._events) < self.max_events:
                self._events.append((event_id, when, event_type, event_name, attrs, checked))
                return True
            self._dropped_events += 1
            warn = not self._warned_full
            self._warned_full = True
        if warn:
            self._warn_full()
        return True

    def _warn_full(self) -> None:
        logger.warning(
            "telemetry: the event buffer is full (max_events=%d); new events are dropped "
            "and counted until the next send", self.max_events,
        )

    def _reject(self, event_type: object, event_name: object, problem: str,
                filtered: bool = False) -> None:
        with self._lock:
            self._rejected += 1
        self._warn(event_type, event_name, problem, filtered)

    def _warn(self, event_type: object, event_name: object, problem: str,
              filtered: bool = False) -> None:
        pair = (_describe(event_type), _describe(event_name))
        if pair in self._warned or len(self._warned) >= _MAX_WARNED:
            return
        self._warned.add(pair)
        what = "dropped by event_filter" if filtered else "rejected"
        logger.warning("telemetry event %s/%s %s: %s (further warnings for it are muted)",
                       pair[0], pair[1], what, problem)

    # -- the emitter's side ------------------------------------------------------

    def take(self) -> EventSnapshot:
        """Remove every buffered event (O(1) under the lock) and put them in wire form.

        The wire form is built off the lock (on the emitter's thread) and hands
        the GIL back at least every millisecond, so 10,000 events do not stall
        the application's threads.
        """
        # Not at module level: ``_wire`` needs attrs, which ``import telemetry`` does not load.
        from telemetry._wire import EncodedEvents, encode_event, hand_off  # noqa: PLC0415

        with self._lock:
            # ``record`` appends without the lock: the first ``taken`` events are
            # these until they are removed here (C speed, never a new list), and
            # events appended meanwhile stay for the next take.
            queued = self._events
            taken = len(queued)
            events = queued[:taken]
            del queued[:taken]
            rejected, self._rejected = self._rejected, 0
            dropped, self._dropped_events = self._dropped_events, 0
            warned, self._warned_full = self._warned_full, False
        excess = len(events) - self.max_events
        if excess > 0:  # threads raced past ``record``'s room check: the first ones stay
            del events[self.max_events :]
            dropped += excess
            if not warned:
                self._warn_full()
        invalid = [0]  # events found invalid now (their attributes, their time)
        encoded = EncodedEvents(self._wire_texts(events, invalid, encode_event, hand_off))
        return EventSnapshot(encoded, rejected + invalid[0], dropped)

    def _wire_texts(self, events: List[_Event], invalid: List[int],
                    encode_event: Callable[[Dict[str, Any]], str],
                    hand_off: Callable[[], None]) -> Iterator[str]:
        """Each taken event's JSON text, in order; counts in ``invalid[0]`` the events
        that cannot be sent. Empties ``events`` as it goes, handing the GIL back at
        least every ``_PAUSE_INTERVAL``."""
        # Taken from the end, a few at a time, so that each chunk is let go of as the
        # next is taken: freeing 100,000 events at once, at the end, would hold the GIL
        # for tens of milliseconds.
        events.reverse()
        clock = time.perf_counter
        pause_at = clock() + _PAUSE_INTERVAL
        last_second, second_text = None, ""
        while events:
            if clock() >= pause_at:
                hand_off()
                pause_at = clock() + _PAUSE_INTERVAL
            chunk = events[-_EVENTS_PER_LOOK:]
            del events[-_EVENTS_PER_LOOK:]
            chunk.reverse()
            # One read of the system's random source per chunk: 32 hex digits for each
            # id drawn here (an id is drawn now unless the event came with one).
            random_hex = os.urandom(16 * len(chunk)).hex()
            drawn = 0
            for event_id, when, event_type, event_name, attrs, checked in chunk:
                if not checked:
                    problem = _attrs_problem(attrs, event_type, event_name)
                    if problem is not None:
                        invalid[0] += 1
                        self._warn(event_type, event_name, problem)
                        continue
                try:
                    if type(when) is str:
                        formatted_time: str = when
                    else:  # ``format_event_time``, its date and clock formatted once a second
                        second, micros = divmod(round(when * 1_000_000), 1_000_000)  # type: ignore[arg-type]
                        if second != last_second:
                            second_text = format_event_time(second)[:-7]  # up to the "."
                            last_second = second
                        formatted_time = f"{second_text}{micros:06d}Z"
                except (OverflowError, ValueError, TypeError):
                    invalid[0] += 1  # a wall clock out of range: nothing to send
                    continue
                if event_id is None:
                    wire_id = random_hex[drawn : drawn + 32]
                    drawn += 32
                else:
                    wire_id = event_id
                yield encode_event(
                    wire_event(wire_id, formatted_time, event_type, event_name, attrs))

    def has_events(self) -> bool:
        """Whether a snapshot now would carry anything (events or counts)."""
        return bool(self._events) or self._rejected > 0 or self._dropped_events > 0

    def count_dropped_events(self, events: int) -> None:
        """Add ``events`` lost outside the buffer to the next report's ``dropped_events``."""
        with self._lock:
            self._dropped_events += events

    def set_disabled_keys(self, keys: Iterable[str]) -> None:
        """The disabled keys now in force (the application's and the server's); events
        they cover are dropped from the buffer and refused from now on."""
        disabled = frozenset(k for k in keys if k == EVENTS_KEY or k.startswith("events:"))
        self._disabled = disabled
        self._checked_pairs = set()  # they were checked against the old keys
        if disabled:
            with self._lock:
                events = self._events  # in place: ``record`` appends without the lock
                taken = len(events)
                events[:taken] = [
                    event for event in events[:taken]
                    if not event_key_disabled(disabled, event[2], event[3])
                ]

    def reset(self) -> None:
        """Forget the buffered events (counts still reach the server)."""
        with self._lock:
            self._events.clear()  # in place: ``record`` appends without the lock
            self._warned_full = False

    @property
    def event_count(self) -> int:
        return len(self._events)

    def after_fork_in_child(self) -> None:
        """Start empty, with a fresh lock: the parent's threads may have held the old one.

        Ids come from the system's random source when events are taken, so the
        child's never repeat the parent's.
        """
        self._lock = threading.Lock()
        self._events = []
        self._rejected = 0
        self._dropped_events = 0
        self._warned_full = False


def _raw_id(event_id: object) -> Tuple[Optional[str], Optional[str]]:
    """A proxied ``event_id`` as 32 lowercase hex digits (a dashed UUID is accepted)."""
    if isinstance(event_id, str):
        if re.fullmatch(_EVENT_ID, event_id):
            return None, event_id.lower()
        if re.fullmatch(_DASHED_UUID, event_id):
            return None, event_id.replace("-", "").lower()
    return f"event_id must be 32 hex digits or a UUID, not {event_id!r:.60}", None


_new_object = object.__new__
_set_attribute = object.__setattr__


class _HasEvents(Protocol):
    @property
    def event_target(self) -> EventTarget: ...


class Recorder:
    """Records events that all carry the attributes it was made with.

    Made by ``with_attrs``; immutable and cheap, so make one per request or
    component. Attributes given at a call win over the bound ones. A recorder
    follows its client: made while telemetry is off, it records once it is on.
    """

    __slots__ = ("_attrs", "_client")

    _client: _HasEvents
    _attrs: Dict[str, Any]

    def __init__(self, client: _HasEvents, attrs: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_attrs", dict(attrs))

    @classmethod
    def _owning(cls, client: _HasEvents, attrs: Dict[str, Any]) -> Recorder:
        """A recorder that keeps ``attrs`` itself: a new dict nobody else holds."""
        recorder = _new_object(cls)
        _set_attribute(recorder, "_client", client)
        _set_attribute(recorder, "_attrs", attrs)
        return recorder

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Recorder is immutable; with_attrs() makes a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a Recorder is immutable")

    def __repr__(self) -> str:
        return f"Recorder({self._attrs!r})"

    @property
    def attrs(self) -> Mapping[str, Any]:
        """The bound attributes (read-only)."""
        return MappingProxyType(self._attrs)

    def record(self, event_type: str, event_name: str, /, **attrs: Any) -> None:
        """Buffer one event with the bound attributes and ``attrs``."""
        self._client.event_target.record(event_type, event_name, attrs, self._attrs)

    def log(self, level: str, message: Any, /, **attrs: Any) -> None:
        """A log event at ``level`` (error, warn, info, debug, trace)."""
        self._client.event_target.log(level, message, attrs, self._attrs)

    def record_raw(self, event: Mapping[str, Any]) -> bool:
        """Proxy an event built elsewhere; the bound attributes fill in what it lacks."""
        return self._client.event_target.record_raw(event, self._attrs)

    def with_attrs(self, **attrs: Any) -> Recorder:
        """A recorder with these attributes added to (and winning over) the bound ones."""
        return Recorder._owning(self._client, {**self._attrs, **attrs})
