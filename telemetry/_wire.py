"""The wire protocol v1, end to end: data shapes, payload, JSON, gzip, size limits.

``Payload`` is what the client sends, ``Request`` that payload encoded for the
transport, ``Response`` what the server answers (see ``docs/protocol.md``).
Everything here is a function of its arguments: no I/O, no clock, no logging
except the warnings owed to the user (a misbehaving server, a key dropped
because it cannot be sent). The encoder hands the GIL back between chunks, so
a big payload does not stall the application's threads.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
import secrets
import time
import zlib
from array import array
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from json.encoder import encode_basestring
from typing import Any, Dict, List, Optional, Tuple, Union, overload

import attrs

from telemetry._version import __version__

logger = logging.getLogger("telemetry")

JSONValue = Union[None, bool, int, float, str, List["JSONValue"], Dict[str, "JSONValue"]]
"""A value that encodes to JSON as it is."""
DataValue = Union[JSONValue, "CountingSet"]
"""A value of a payload's ``data``: JSON, or a counting set the encoder writes itself."""

CLIENT_NAME = "telemetry-python"
NANOSECONDS_PER_SECOND = 1_000_000_000

# Matched with ``fullmatch`` (``$`` would let a trailing newline through) and ASCII
# digits only (``\d`` also matches other scripts' digits).
_PAYLOAD_ID = re.compile(r"[0-9a-f]{32}")
# Up to nine fraction digits (Go sends nanoseconds) and `Z` or a numeric offset.
_TIMESTAMP = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DELTA_SECONDS = re.compile(r"[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Keys, and elements of list and mapping values, encoded per piece when encoding
# incrementally (see ``iter_encoded_payload``).
ENCODE_CHUNK_KEYS = 256
ENCODE_CHUNK_ELEMENTS = 512
ENCODE_CHUNK_EVENTS = 64
# Keys of the buffer's tables merged into one between two GIL hand-offs (see ``wire_data``).
WIRE_ITEMS_PER_PAUSE = 1000
# Longest the encoder runs before it hands the GIL back (seconds). A hand-off costs
# a system call, and up to the interpreter's switch interval (5 ms) before this
# thread gets the GIL back from a busy application thread: not after every piece.
ENCODE_PAUSE_INTERVAL = 0.001
# How long a hand-off lets go of the GIL (seconds; see ``hand_off``).
HAND_OFF_S = 0.0001
# Parts a payload too big is split into, per time it is over the limits (see
# ``split_to_fit``): parts are not all the same size, nor compress alike.
_SPLIT_MARGIN = 1.15
MAX_DURATION_NS = 2**63 - 1
"""The longest Go duration: a longer ``next_update`` means this."""


def new_payload_id() -> str:
    """A random 128-bit payload id as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return value.astimezone(timezone.utc)


def estimate_items(data: Mapping[str, Any]) -> int:
    """Item count of wire data: one per key plus one per element of a container."""
    return sum(
        1 + len(value) if _container_of(value) is not None else 1 for value in data.values()
    )


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})
_CONTAINER_TYPES = frozenset({list, tuple, dict})


def _container_of(
    value: object,
) -> Optional[Union[CountingSet, List[Any], Tuple[Any, ...], Dict[str, Any]]]:
    """``value`` when it is a list, tuple, mapping or counting set, else None.

    By exact type first: ``isinstance`` against ``CountingSet``, an abstract
    ``Sequence``, costs half a microsecond, once per key of a 100,000-key payload.
    """
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return None
    if kind is CountingSet or kind in _CONTAINER_TYPES or isinstance(
        value, (CountingSet, list, tuple, dict)
    ):
        return value  # type: ignore[return-value]
    return None


def _items_of_data(payload: Payload) -> int:
    return estimate_items(payload.data) + len(payload.events)


def _event_tuple(
    events: Iterable[Mapping[str, JSONValue]],
) -> Sequence[Mapping[str, JSONValue]]:
    """``events`` as an immutable sequence: ``EncodedEvents`` as they are, else a tuple."""
    return events if isinstance(events, EncodedEvents) else tuple(events)


@attrs.frozen
class Payload:
    """One update sent to the server: a snapshot of the buffer, fixed for life.

    ``events`` are flat event objects in recording order (absent on the wire
    when there are none); ``dropped_events`` counts events the client had no
    room for. ``items`` is the payload's weight in buffer items (an event is
    one): what is counted as dropped when the payload is lost or rejected. The
    buffer knows it exactly; by default it is estimated from ``data`` and
    ``events``. It is local bookkeeping, not part of the wire format.
    """

    instance_id: str
    timestamp: datetime = attrs.field(converter=_utc)
    payload_id: str = attrs.field(factory=new_payload_id)
    data: Mapping[str, DataValue] = attrs.field(factory=dict)
    dropped: int = 0
    client_name: str = CLIENT_NAME
    client_version: str = __version__
    events: Sequence[Mapping[str, JSONValue]] = attrs.field(default=(), converter=_event_tuple)
    dropped_events: int = 0
    items: int = attrs.field(
        default=attrs.Factory(_items_of_data, takes_self=True), eq=False
    )

    @payload_id.validator
    def _check_payload_id(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not (isinstance(value, str) and _PAYLOAD_ID.fullmatch(value)):
            raise ValueError(f"payload_id must be 32 lowercase hex digits, got {value!r}")

    @property
    def carries_data(self) -> bool:
        """Whether it says anything (data, events or counts): else it is a check-in."""
        return bool(self.data or self.dropped or self.events or self.dropped_events)


@attrs.frozen
class Response:
    """What the server asked for; defaults mean "no instruction".

    ``next_update`` is in nanoseconds, as on the wire (a Go duration).
    """

    next_update: Optional[int] = None
    stop: bool = False
    error: Optional[str] = None
    disable_keys: Tuple[str, ...] = ()
    enable_keys: Tuple[str, ...] = ()
    ignored: Tuple[str, ...] = attrs.field(default=(), eq=False)
    """Known fields that came with the wrong type and were ignored (not on the wire)."""


@attrs.frozen
class Request:
    """An encoded payload ready to send (``body`` is gzip-compressed when ``gzipped``)."""

    payload: Payload
    body: bytes
    gzipped: bool = False


@attrs.frozen
class WireLimits:
    """What the server accepts in one request, and when the client compresses."""

    max_body_bytes: int = 1024 * 1024
    """Largest body as sent (compressed when gzipped)."""
    max_raw_bytes: int = 10 * 1024 * 1024
    """Largest JSON document once decompressed."""
    gzip_threshold: int = 1024
    """Bodies larger than this are gzip-compressed."""


SERVER_LIMITS = WireLimits()
"""The limits of protocol v1 (``docs/protocol.md``, "Sizes")."""


class CountingSet(Sequence[Dict[str, JSONValue]]):
    """A counting set in wire form, ``[{"value": v, "count": n}, ...]``, read-only.

    A view of the buffer's member counts, not a copy: a snapshot allocates no
    object per member, and the encoder writes the members straight to JSON text.
    (A dict per member, alive until the payload is delivered, is one more object
    for the cyclic garbage collector to count: 100,000 of them start collections
    that walk the application's whole heap while holding the GIL, stalling its
    threads for tens of milliseconds.) Iterating it builds each ``{"value",
    "count"}`` object as it goes; it compares equal to a list of the same objects.
    """

    __slots__ = ("_counts", "_member_value")

    def __init__(
        self, counts: Mapping[Hashable, int], member_value: Callable[[Hashable], JSONValue]
    ) -> None:
        self._counts = counts
        self._member_value = member_value

    def counts(self) -> Iterator[Tuple[JSONValue, int]]:
        """Each distinct value and how many times it was appended."""
        member_value = self._member_value
        for member, count in self._counts.items():
            yield member_value(member), count

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[Dict[str, JSONValue]]:
        for value, count in self.counts():
            yield {"value": value, "count": count}

    @overload
    def __getitem__(self, index: int) -> Dict[str, JSONValue]: ...

    @overload
    def __getitem__(self, index: slice) -> List[Dict[str, JSONValue]]: ...

    def __getitem__(
        self, index: Union[int, slice]
    ) -> Union[Dict[str, JSONValue], List[Dict[str, JSONValue]]]:
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (CountingSet, list)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment] # unhashable, like the list it stands for

    def __repr__(self) -> str:
        return f"CountingSet({list(self)!r})"


def _not_json(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _event_encoder() -> Callable[[Any], str]:
    """Compact JSON text of one event (a flat object of plain values).

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs three
    times the encoding of a small event: this one is built once. It does not look
    for circular references (an event is flat).
    """
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:  # no C accelerator: the pure-Python encoder
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    encode = make_encoder(None, _not_json, encode_basestring, None, ":", ",", False, False, False)
    return lambda event: "".join(encode(event, 0))


_encode_event = _event_encoder()


class EncodedEvents(Sequence[Dict[str, JSONValue]]):
    """Events in wire form, kept as JSON text in a few long strings: read-only.

    Each string (a chunk) holds the comma-separated texts of up to
    ``ENCODE_CHUNK_EVENTS`` consecutive events, and an ``array`` says where each
    event's text ends in its chunk. Neither a ``str`` nor an ``array`` is tracked by
    the cyclic garbage collector, a dict is; and a list of one string per event
    (100,000 of them) would make every young collection while the list is young
    look at each string, a cache miss each (milliseconds with the GIL held). The
    encoder writes the chunks as they are (no encoding again when a payload is
    split); reading an event decodes it. It compares equal to a list or tuple of
    the same events.
    """

    __slots__ = ("_chunks", "_ends", "_firsts")

    _chunks: List[str]
    _firsts: array[int]
    _ends: array[int]

    def __init__(self, texts: Iterable[str] = ()) -> None:
        """From each event's JSON text, in order (consumed as it comes: a generator's
        texts are joined ``ENCODE_CHUNK_EVENTS`` at a time, never all held at once)."""
        self._chunks = []
        self._firsts = array("q", [0])  # each chunk's first event, then the count
        self._ends = array("q")  # where each event's text ends in its chunk
        group: List[str] = []
        for text in texts:
            group.append(text)
            if len(group) == ENCODE_CHUNK_EVENTS:
                self._add_chunk(group)
                group = []
        if group:
            self._add_chunk(group)

    def _add_chunk(self, texts: List[str]) -> None:
        self._chunks.append(",".join(texts))
        self._firsts.append(self._firsts[-1] + len(texts))
        ends = self._ends
        end = -1
        for text in texts:
            end += len(text) + 1
            ends.append(end)

    @classmethod
    def of(cls, events: Iterable[Mapping[str, Any]]) -> EncodedEvents:
        """Encode ``events`` (JSON objects with plain values, no lone surrogate)."""
        return cls(encode_event(event) for event in events)

    @property
    def chunks(self) -> Sequence[str]:
        """The events' JSON texts, comma-separated, a chunk of consecutive events each."""
        return self._chunks

    @property
    def texts(self) -> List[str]:
        """Each event's JSON text (UTF-8 safe: no lone surrogate); built when asked for."""
        return [self._text(index) for index in range(len(self))]

    def _text(self, index: int) -> str:
        chunk = bisect.bisect_right(self._firsts, index) - 1
        start = 0 if index == self._firsts[chunk] else self._ends[index - 1] + 1
        return self._chunks[chunk][start : self._ends[index]]

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[Dict[str, JSONValue]]:
        for chunk in self._chunks:
            yield from json.loads(f"[{chunk}]")

    @overload
    def __getitem__(self, index: int) -> Dict[str, JSONValue]: ...

    @overload
    def __getitem__(self, index: slice) -> EncodedEvents: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Dict[str, JSONValue], EncodedEvents]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return EncodedEvents(self._text(at) for at in range(start, stop, step))
            return self._slice(start, stop)
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError("event index out of range")
        return json.loads(self._text(position))  # type: ignore[no-any-return]

    def _slice(self, start: int, stop: int) -> EncodedEvents:
        """Events ``start`` to ``stop``: whole chunks are shared, the two ends cut."""
        part = EncodedEvents()
        firsts, ends = self._firsts, self._ends
        for chunk_index in range(
            max(bisect.bisect_right(firsts, start) - 1, 0), len(self._chunks)
        ):
            first, after = firsts[chunk_index], firsts[chunk_index + 1]
            low, high = max(start, first), min(stop, after)
            if low >= high:
                if first >= stop:
                    break
                continue
            chunk = self._chunks[chunk_index]
            if low == first and high == after:
                part._chunks.append(chunk)
                part._ends.extend(ends[low:high])
            else:
                cut = 0 if low == first else ends[low - 1] + 1
                part._chunks.append(chunk[cut : ends[high - 1]])
                part._ends.extend(end - cut for end in ends[low:high])
            part._firsts.append(part._firsts[-1] + high - low)
        return part

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedEvents):
            return len(self) == len(other) and self.texts == other.texts
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment] # unhashable, like the list it stands for

    def __repr__(self) -> str:
        return f"EncodedEvents({list(self)!r})"


def wire_data(
    plain_tables: Iterable[Dict[str, Any]],
    counting_sets: Mapping[str, Mapping[Hashable, int]],
    member_value: Callable[[Hashable], JSONValue],
) -> Dict[str, Any]:
    """The payload's ``data`` from the buffer's tables, in the shapes of the wire.

    ``plain_tables`` (values, mappings, counters, lists) are in wire form
    already; they are merged, and the largest becomes the result instead of
    being copied, so call this once, on tables nobody else holds. A counting
    set becomes a ``CountingSet`` view of its member counts (``member_value``
    turns a stored member back into its value). Nothing is allocated per item,
    and the GIL is handed back every ``WIRE_ITEMS_PER_PAUSE`` keys merged: a
    buffer of 100,000 items must not stall the application's threads.
    """
    tables = list(plain_tables)
    data: Dict[str, Any] = max(tables, key=len) if tables else {}
    budget = WIRE_ITEMS_PER_PAUSE
    for table in tables:
        if table is not data and table:
            data.update(table)
            budget -= len(table)
            if budget <= 0:
                hand_off()
                budget = WIRE_ITEMS_PER_PAUSE
    for key, counts in counting_sets.items():
        data[key] = CountingSet(counts, member_value)
    return data


def hand_off() -> None:
    """Let a thread waiting for the GIL (the application's) take it, between two pieces
    of the emitter's work.

    Not ``sleep(0)``: returning from it at once, this thread often takes the GIL
    back before the woken thread runs, and as that counts as a switch, the waiting
    thread's forced-switch timer starts over; it could wait many switch intervals.
    A sleep of ``HAND_OFF_S`` gives it time to be scheduled.
    """
    time.sleep(HAND_OFF_S)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z`` suffix."""
    # Not strftime: its %Y does not zero-pad years before 1000 on every platform.
    return _utc(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    """Parse RFC 3339, accepting ``Z`` or an offset and up to nine fraction digits."""
    match = _TIMESTAMP.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    date, clock, fraction, zone = match.groups()
    micros = (fraction or "").ljust(6, "0")[:6]
    offset = "+00:00" if zone in ("Z", "z") else zone
    try:
        parsed = datetime.fromisoformat(f"{date}T{clock}.{micros}{offset}")
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # e.g. year 1 with a positive offset
        raise ValueError(f"timestamp out of range: {text!r}") from None


def payload_header(payload: Payload) -> Dict[str, Any]:
    """The payload's fields other than ``data`` and ``events``, as the wire has them."""
    client: Dict[str, Any] = {
        "name": payload.client_name,
        "version": payload.client_version,
        "dropped": payload.dropped,
    }
    if payload.dropped_events:
        client["dropped_events"] = payload.dropped_events
    return {
        "instance_id": payload.instance_id,
        "timestamp": format_timestamp(payload.timestamp),
        "payload_id": payload.payload_id,
        "client": client,
    }


def _dumps(value: Any) -> str:
    return _no_surrogates(
        json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    )


def _no_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as a ``\\u`` escape.

    A lone surrogate (it can only sit inside a JSON string) has no UTF-8 form;
    the escape decodes back to the same string.
    """
    if not text.isascii():  # O(1) for ASCII text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return text


def encode_event(event: Mapping[str, Any]) -> str:
    """One event's JSON text, as ``EncodedEvents`` keeps it."""
    return _no_surrogates(_encode_event(event))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(body: Union[bytes, str]) -> Any:
    """``json.loads`` that accepts standard JSON only and raises only ``ValueError``."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def iter_encoded_payload(
    payload: Payload,
    chunk_keys: int = ENCODE_CHUNK_KEYS,
    chunk_elements: int = ENCODE_CHUNK_ELEMENTS,
) -> Iterator[str]:
    """Encode ``payload`` as JSON text in pieces that each take little time.

    A piece holds at most ``chunk_keys`` data keys, and ends once its values
    hold ``chunk_elements`` list, mapping or counting-set elements; a value with
    more elements than that is encoded across pieces. The C encoder holds the
    GIL for a whole ``json.dumps`` call; encoding in pieces lets a caller hand
    the GIL back between them so a big payload does not stall the application's
    threads. Counting sets are written member by member, straight to text.
    """
    head = _dumps(payload_header(payload))
    yield head[:-1] + ',"data":{'
    chunk_keys, chunk_elements = max(chunk_keys, 1), max(chunk_elements, 1)
    separator = ""
    parts: List[str] = []  # this piece's text so far
    batch: Dict[str, Any] = {}  # then its plain values, encoded together at the end
    keys = elements = 0
    for key, value in payload.data.items():
        container = _container_of(value)
        size = 0 if container is None else len(container)
        if type(container) is not CountingSet and size <= chunk_elements:
            batch[key] = value
        else:
            assert container is not None
            if batch:
                parts.append(separator + _dumps(batch)[1:-1])
                separator, batch = ",", {}
            encoded = _iter_encoded_elements(
                separator + _key_text(key) + ":", container, chunk_elements
            )
            separator = ","
            if size > chunk_elements:  # pieces of its own
                if parts:
                    yield "".join(parts)
                    parts = []
                yield from encoded
                keys = elements = 0
                continue
            parts += encoded
        keys += 1
        elements += size
        if keys >= chunk_keys or elements >= chunk_elements:
            if batch:
                parts.append(separator + _dumps(batch)[1:-1])
                separator, batch = ",", {}
            yield "".join(parts)
            parts, keys, elements = [], 0, 0
    if batch:
        parts.append(separator + _dumps(batch)[1:-1])
    if parts:
        yield "".join(parts)
    if not payload.events:
        yield "}}"
        return
    events = payload.events
    separator = '},"events":['
    if isinstance(events, EncodedEvents):
        for chunk in events.chunks:  # ``ENCODE_CHUNK_EVENTS`` events at most
            yield separator + chunk
            separator = ","
    else:
        for start in range(0, len(events), ENCODE_CHUNK_EVENTS):
            yield separator + _dumps(list(events[start : start + ENCODE_CHUNK_EVENTS]))[1:-1]
            separator = ","
    yield "]}"


def _iter_encoded_elements(
    prefix: str,
    value: Union[CountingSet, List[Any], Tuple[Any, ...], Dict[str, Any]],
    size: int,
) -> Iterator[str]:
    """``prefix`` and one list, mapping or counting set, ``size`` elements per piece.

    Lists go to the C encoder in slices; mappings and counting sets are written
    element by element, so that no list of their items is built first.
    """
    if isinstance(value, (list, tuple)):
        separator = _no_surrogates(prefix) + "["
        for start in range(0, len(value), size):
            yield separator + _dumps(value[start : start + size])[1:-1]
            separator = ","
        yield "]"
        return
    if isinstance(value, CountingSet):
        elements: Iterator[str] = (
            f'{{"value":{_value_text(member)},"count":{_value_text(count)}}}'
            for member, count in value.counts()
        )
        opening, closing = "[", "]"
    else:
        elements = (f"{_key_text(name)}:{_value_text(item)}" for name, item in value.items())
        opening, closing = "{", "}"
    pieces = [prefix + opening]
    separator = ""
    for count, element in enumerate(elements, 1):
        pieces.append(separator + element)
        separator = ","
        if not count % size:
            yield _no_surrogates("".join(pieces))
            pieces.clear()
    pieces.append(closing)
    yield _no_surrogates("".join(pieces))


_int_text = int.__repr__
_float_text = float.__repr__


def _value_text(value: Any) -> str:
    """JSON text of ``value``: plain scalars directly, anything else with ``json.dumps``."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return _int_text(value)
    if kind is float and value - value == 0:  # finite
        return _float_text(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return _dumps(value)


def _key_text(key: Any) -> str:
    """JSON text of an object member's name (not a ``str``: as ``json.dumps`` writes it)."""
    return encode_basestring(key) if type(key) is str else _dumps({key: None})[1:-6]


def encode_payload(payload: Payload) -> bytes:
    """The payload as UTF-8 JSON bytes."""
    return "".join(iter_encoded_payload(payload)).encode("utf-8")


def encode_request(payload: Payload, limits: WireLimits = SERVER_LIMITS) -> Tuple[Request, int]:
    """Encode (and gzip over ``limits.gzip_threshold``) in chunks, handing the GIL back.

    Each piece is compressed as it comes (zlib releases the GIL while it works),
    so no step joins or compresses the whole body in one long call.
    Returns the request and the size of its uncompressed body. Raises
    ``ValueError`` for data JSON cannot hold (e.g. an int with too many digits).
    """
    raw_pieces: List[bytes] = []
    raw_size = 0
    compressor = None
    body_pieces: List[bytes] = []
    clock = time.perf_counter
    pause_at = clock() + ENCODE_PAUSE_INTERVAL
    for text in iter_encoded_payload(payload):
        piece = text.encode("utf-8")
        raw_size += len(piece)
        if compressor is not None:
            body_pieces.append(compressor.compress(piece))
        else:
            raw_pieces.append(piece)
            if raw_size > limits.gzip_threshold:
                compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip container
                body_pieces = [compressor.compress(b"".join(raw_pieces))]
        if clock() >= pause_at:
            hand_off()
            pause_at = clock() + ENCODE_PAUSE_INTERVAL
    if compressor is None:
        return Request(payload, b"".join(raw_pieces)), raw_size
    body_pieces.append(compressor.flush())
    return Request(payload, b"".join(body_pieces), gzipped=True), raw_size


def split_to_fit(
    payload: Payload, limits: WireLimits = SERVER_LIMITS
) -> Tuple[List[Request], int]:
    """Requests that each fit ``limits``, split by key and by event; and how many items
    were dropped.

    A payload that fits is one request for the payload itself. One that does not
    is split, each part a new payload with its own ``payload_id`` (the first
    part carries the drop counts), recursively: its data apart from its events
    first, then each in as many equal parts as its encoded size says it needs
    (with a margin; in halves when it could not be encoded). A key that cannot
    fit even alone, or cannot be encoded at all, is dropped (with a warning)
    and counted.
    """
    overshoot = 0.0  # how many times over the limits it is (0: not known)
    try:
        request, raw_size = encode_request(payload, limits)
    except ValueError as exc:
        problem = f"cannot be encoded ({exc})"
    else:
        if len(request.body) <= limits.max_body_bytes and raw_size <= limits.max_raw_bytes:
            return [request], 0
        problem = "is too large to send even alone"
        overshoot = max(len(request.body) / max(limits.max_body_bytes, 1),
                        raw_size / max(limits.max_raw_bytes, 1))
    keys = list(payload.data)
    events = payload.events  # sliced as it is (encoded events stay encoded)
    if len(keys) + len(events) <= 1:
        what = f"key {keys[0]!r}" if keys else "event" if events else "(empty)"
        logger.warning("telemetry: payload %s %s; dropped", what, problem)
        return [], payload.items + payload.dropped
    if keys and events:
        parts: List[Tuple[List[str], Sequence[Mapping[str, JSONValue]]]] = [
            (keys, ()), ([], events)
        ]
    else:
        # Encoding again costs as much as the first time: split at once into as
        # many parts as needed (halving would encode it all again at each level).
        count = len(keys) or len(events)
        pieces = min(count, max(2, math.ceil(overshoot * _SPLIT_MARGIN)))
        bounds = [count * piece // pieces for piece in range(pieces + 1)]
        parts = [
            (keys[start:end], ()) if keys else ([], events[start:end])
            for start, end in zip(bounds, bounds[1:])
        ]
    requests: List[Request] = []
    dropped = 0
    for index, (part_keys, part_events) in enumerate(parts):
        data = {key: payload.data[key] for key in part_keys}
        piece = attrs.evolve(
            payload,
            payload_id=new_payload_id(),
            data=data,
            events=part_events,
            dropped=payload.dropped if index == 0 else 0,
            dropped_events=payload.dropped_events if index == 0 else 0,
            items=estimate_items(data) + len(part_events),
        )
        part_requests, part_dropped = split_to_fit(piece, limits)
        requests += part_requests
        dropped += part_dropped
    return requests, dropped


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def decode_payload(body: Union[bytes, str, Mapping[str, Any]]) -> Payload:
    """Parse a payload the client wrote (e.g. from the spool); raises ``ValueError``."""
    obj = _loads(body) if isinstance(body, (bytes, str)) else body
    _require(isinstance(obj, Mapping), "payload is not a JSON object")
    instance_id, timestamp = obj.get("instance_id"), obj.get("timestamp")
    payload_id, data = obj.get("payload_id"), obj.get("data", {})
    client = obj.get("client", {})
    if not (isinstance(instance_id, str) and isinstance(timestamp, str)):
        raise ValueError("payload instance_id or timestamp is not a string")
    if not isinstance(payload_id, str):
        raise ValueError("payload payload_id is not a string")
    _require(isinstance(data, dict), "payload data is not an object")
    _require(isinstance(client, dict), "payload client is not an object")
    dropped = client.get("dropped", 0)
    _require(type(dropped) is int and dropped >= 0, "payload client.dropped is not a count")
    dropped_events = client.get("dropped_events", 0)
    _require(type(dropped_events) is int and dropped_events >= 0,
             "payload client.dropped_events is not a count")
    events = obj.get("events", [])
    _require(isinstance(events, list) and all(isinstance(event, dict) for event in events),
             "payload events is not an array of objects")
    return Payload(
        instance_id=instance_id,
        timestamp=parse_timestamp(timestamp),
        payload_id=payload_id,
        data=data,
        dropped=dropped,
        client_name=str(client.get("name", CLIENT_NAME)),
        client_version=str(client.get("version", __version__)),
        events=events,
        dropped_events=dropped_events,
    )


def _string_list(value: object) -> Optional[Tuple[str, ...]]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def decode_response(body: bytes) -> Response:
    """Parse a server response body.

    An empty body means "no instructions". A body that is not a JSON object
    raises ``ValueError`` (the send counts as failed). A known field of the
    wrong type is ignored and named in ``ignored`` (the emitter warns about
    it, without repeating itself every cycle); unknown fields are ignored.
    """
    if not body.strip():
        return Response()
    try:
        obj = _loads(body)
    except ValueError as exc:
        raise ValueError(f"response body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("response body is not a JSON object")
    fields: Dict[str, Any] = {}
    ignored: List[str] = []
    if "next_update" in obj:
        if type(obj["next_update"]) is int:
            fields["next_update"] = obj["next_update"]
        else:
            ignored.append("next_update")
    if "stop" in obj:
        if type(obj["stop"]) is bool:
            fields["stop"] = obj["stop"]
        else:
            ignored.append("stop")
    if obj.get("error") is not None:
        if isinstance(obj["error"], str):
            fields["error"] = obj["error"]
        else:
            ignored.append("error")
    for name in ("disable_keys", "enable_keys"):
        if obj.get(name) is not None:
            keys = _string_list(obj[name])
            if keys is None:
                ignored.append(name)
            else:
                fields[name] = keys
    return Response(**fields, ignored=tuple(ignored))


def seconds_to_duration(seconds: float) -> int:
    """Seconds as integer nanoseconds (a Go ``time.Duration``)."""
    return round(seconds * NANOSECONDS_PER_SECOND)


def duration_to_seconds(nanoseconds: int) -> float:
    """Integer nanoseconds as float seconds."""
    return nanoseconds / NANOSECONDS_PER_SECOND


def parse_retry_after(value: str, now: Optional[float] = None) -> Optional[float]:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date; None if invalid."""
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    return max(0.0, (when - datetime.fromtimestamp(current, timezone.utc)) / timedelta(seconds=1))
