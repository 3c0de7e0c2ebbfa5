"""What one request, one client address and the whole server may cost: the limits and their checks.

Nothing here does I/O. The WSGI app applies these at ingest:

- ``count_values``: how many JSON values a body holds, counted on the bytes
  before anything is built, so a document of a million empty objects is refused
  for the price of a few ``bytes.count`` calls.
- ``check_document``: one walk over a parsed payload: ints in signed 64 bits,
  finite floats, string and key lengths, nesting depth.
- ``InFlightBudget``: how many JSON values all requests together may hold
  parsed at once (memory is what a value costs, not what a byte costs).
- ``Admission``: payloads per client address and in total per window, kept
  in process memory; a window's table is dropped whole when the window ends.
- ``saturate``: every aggregate the server answers with stays in signed 64 bits.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from ._storage import INT64_MAX, INT64_MIN, saturate

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "Admission",
    "InFlightBudget",
    "Limits",
    "address_key",
    "check_data_keys",
    "check_document",
    "count_values",
    "saturate",
    "value_bound",
]


# A JSON string token, escapes included (unrolled: linear, no backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class Limits:
    """What the server accepts; the defaults are what an honest ``telemetry`` client can
    never exceed (it splits its payloads to fit the per-payload ceilings).

    Per payload: ``max_body_bytes`` as sent, ``max_decoded_bytes`` once decompressed,
    ``max_values`` JSON values (every scalar, array and object counts one),
    ``max_depth`` levels of nesting, ``max_key_chars`` per ``data`` key,
    ``max_string_chars`` per string value and ``max_name_chars`` per nested
    object member name (a client's value is at most 16 KiB encoded, which bounds
    both), every int in signed 64 bits, every float finite.

    Per server: ``max_values_in_flight`` JSON values parsed at once over all
    requests (others wait up to ``budget_wait`` seconds, then 503);
    ``max_decoded_bytes_in_flight``: decompressed bytes held at once beyond
    the first MiB of each body (others wait a second, then 503);
    ``max_storage_bytes`` of database (None: no limit) before ``/v1/update``
    answers 507; ``per_address`` payloads and ``per_address_bytes`` decoded
    bytes per client address (an IPv6 address counts by its /64), and ``total``
    payloads over all addresses, per ``window`` seconds (0: no limit) before 429;
    ``max_response_bytes`` per page of ``/v1/instances/<id>`` (at least one
    payload is always served).
    """

    max_body_bytes: int = 1 << 20
    max_decoded_bytes: int = 10 << 20
    max_values: int = 1_000_000
    max_depth: int = 64
    max_key_chars: int = 256
    max_string_chars: int = 1024
    max_name_chars: int = 16 * 1024
    max_values_in_flight: int = 1_000_000
    max_decoded_bytes_in_flight: int = 24 << 20
    budget_wait: float = 10.0
    max_storage_bytes: Optional[int] = 1 << 30
    per_address: int = 600
    per_address_bytes: int = 64 << 20
    total: int = 60_000
    window: float = 60.0
    max_response_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_decoded_bytes", "max_values", "max_depth",
                     "max_key_chars", "max_string_chars", "max_name_chars",
                     "max_values_in_flight", "max_response_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_values_in_flight < self.max_values:
            raise ValueError("max_values_in_flight must be at least max_values")
        if self.max_decoded_bytes_in_flight < 2 * self.max_decoded_bytes:
            raise ValueError("max_decoded_bytes_in_flight must be at least 2 * max_decoded_bytes")
        if min(self.per_address, self.per_address_bytes, self.total) < 0 or not self.window > 0:
            raise ValueError("per_address(_bytes) and total must be >= 0 and window > 0")
        if self.max_storage_bytes is not None and self.max_storage_bytes < 0:
            raise ValueError("max_storage_bytes must be >= 0 or None")


def value_bound(document: bytes) -> int:
    """At least the number of JSON values in ``document`` (commas and brackets in strings
    count too): a few ``bytes.count`` calls, no copy."""
    return 1 + document.count(b",") + document.count(b"[") + document.count(b"{")


def count_values(document: bytes, limit: Optional[int] = None) -> int:
    """The number of JSON values in ``document`` (exact for valid JSON), without parsing it.

    Strings are blanked out first (so commas and brackets inside them do not
    count); then every comma separates one more value, and every non-empty
    array or object opens one more. For invalid JSON the result is only an
    estimate, but the parser refuses such a body anyway. With ``limit``, a quick
    upper bound that is within it is returned instead of the exact count.
    """
    if limit is not None:
        bound = value_bound(document)
        if bound <= limit:
            return bound
    structure = _STRING.sub(b'""', document).translate(None, _WHITESPACE)
    containers = structure.count(b"[") + structure.count(b"{")
    empty = structure.count(b"[]") + structure.count(b"{}")
    return 1 + structure.count(b",") + containers - empty


def check_data_keys(body: object, limits: Limits) -> Optional[str]:
    """Why a key of the payload's ``data`` is too long, or None."""
    data = body.get("data") if isinstance(body, dict) else None
    if isinstance(data, dict):
        for key in data:
            if len(key) > limits.max_key_chars:
                return f"data key {key[:40]!r}… is longer than {limits.max_key_chars} characters"
    return None


def check_document(body: object, limits: Limits) -> Optional[str]:
    """Why the parsed payload ``body`` cannot be stored and aggregated safely, or None.

    One iterative walk (no recursion limit): ints in signed 64 bits, finite
    floats, lengths of strings, member names and top-level ``data`` keys, depth.
    It holds one iterator per level of nesting, not the values still to visit
    (a list of a million values costs no list of a million entries).
    """
    problem = check_data_keys(body, limits)
    if problem is not None:
        return problem
    problem = _check_scalar(body, "", limits)
    if problem is not None or not isinstance(body, (list, dict)):
        return problem
    try:
        if _plainly_fine(body, 2, limits):  # the common case, found faster
            return None
    except RecursionError:  # nested deeper than this thread can recurse: walk it
        pass
    # (the members still to visit at one level, their depth, where they are)
    stack: List[Tuple[Iterator[Tuple[Optional[str], object]], int, str]] = [
        (_members(body), 2, "")
    ]
    while stack:
        members, depth, where = stack[-1]
        for name, value in members:
            at = where
            if name is not None:
                if len(name) > limits.max_name_chars:
                    return f"member name longer than {limits.max_name_chars} characters"
                if depth <= 3:
                    at = name
            kind = type(value)
            if kind is int:
                if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
                    return _check_scalar(value, at, limits)
            elif kind is str:
                if len(value) > limits.max_string_chars:  # type: ignore[arg-type]
                    return _check_scalar(value, at, limits)
            elif kind is list or kind is dict:
                if depth > limits.max_depth:
                    return f"payload nested deeper than {limits.max_depth} levels"
                stack.append((_members(value), depth + 1, at))  # type: ignore[arg-type]
                break
            elif kind is float and not math.isfinite(value):  # type: ignore[arg-type]
                return _check_scalar(value, at, limits)
        else:
            stack.pop()
    return None


def _plainly_fine(
    container: Union[List[object], Dict[str, object]], depth: int, limits: Limits
) -> bool:
    """Whether ``check_document`` would find nothing in ``container`` (members at
    ``depth``): the same checks, recursive and without tracking where a value is,
    so a problem is then located by the walk."""
    if type(container) is dict:
        for name in container:
            if len(name) > limits.max_name_chars:
                return False
        values: Iterable[object] = container.values()
    else:
        values = container
    for value in values:
        kind = type(value)
        if kind is str:
            if len(value) > limits.max_string_chars:  # type: ignore[arg-type]
                return False
        elif kind is int:
            if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
                return False
        elif kind is dict or kind is list:
            if depth > limits.max_depth:
                return False
            if not _plainly_fine(value, depth + 1, limits):  # type: ignore[arg-type]
                return False
        elif kind is float and not math.isfinite(value):  # type: ignore[arg-type]
            return False
    return True


def _members(container: Union[List[object], Dict[str, object]]) -> Iterator[
    Tuple[Optional[str], object]
]:
    """A list's items (no name) or a dict's members, as (name, value)."""
    if type(container) is list:
        return zip(itertools.repeat(None), container)
    return iter(container.items())  # type: ignore[union-attr]


def _check_scalar(value: object, where: str, limits: Limits) -> Optional[str]:
    kind = type(value)
    if kind is int:
        if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
            return f"{where or 'value'}: integer outside signed 64 bits"
    elif kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            return f"{where or 'value'}: number is not finite"
    elif kind is str and len(value) > limits.max_string_chars:  # type: ignore[arg-type]
        return f"{where or 'value'}: string longer than {limits.max_string_chars} characters"
    return None


class InFlightBudget:
    """A counting semaphore over JSON values: bounds what all parsed requests hold at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._available = capacity
        # Taken directly (a C-level lock) where nobody waits: the Condition's own
        # ``with`` goes through Python methods, twice per request.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads in acquire() waiting for values to be released

    @property
    def available(self) -> int:
        with self._lock:
            return self._available

    def acquire(self, amount: int, timeout: float) -> bool:
        """Take ``amount`` (at most the capacity); False when it was not free within ``timeout``."""
        amount = min(amount, self.capacity)
        with self._lock:
            if self._available < amount:
                self._waiting += 1
                try:
                    if not self._changed.wait_for(lambda: self._available >= amount, timeout):
                        return False
                finally:
                    self._waiting -= 1
            self._available -= amount
            return True

    def release(self, amount: int) -> None:
        amount = min(amount, self.capacity)
        with self._lock:
            self._available += amount
            if self._waiting:
                self._changed.notify_all()


def address_key(address: str) -> str:
    """The unit of per-address limits: an IPv4 address, or the /64 of an IPv6 one
    (one host commonly holds a whole /64)."""
    if ":" not in address:
        return address
    try:
        network = ipaddress.IPv6Network(f"{address.split('%', 1)[0]}/64", strict=False)
    except ValueError:
        return address
    mapped = ipaddress.IPv6Address(address.split("%", 1)[0]).ipv4_mapped
    return str(mapped) if mapped is not None else str(network)


class Admission:
    """Payloads admitted per client address and in total, in fixed windows (in process).

    Only admitted payloads create entries, so the table holds at most ``total``
    addresses (or one per admitted payload when ``total`` is 0), and it is
    dropped whole when its window ends: nothing grows with the number of ids
    or addresses ever seen.
    """

    def __init__(
        self,
        per_address: int,
        total: int,
        window: float,
        *,
        per_address_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_address = per_address
        self.per_address_bytes = per_address_bytes
        self.total = total
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._by_address: Dict[str, int] = {}
        self._bytes_by_address: Dict[str, int] = {}
        self._admitted = 0

    @property
    def tracked_addresses(self) -> int:
        with self._lock:
            return len(self._by_address)

    def admit(self, address: str) -> Optional[float]:
        """None when a payload from ``address`` is admitted (and counted), else seconds to wait."""
        address = address_key(address)
        with self._lock:
            wait = self._roll()
            if self.total and self._admitted >= self.total:
                return wait
            count = self._by_address.get(address, 0)
            if self.per_address and count >= self.per_address:
                return wait
            self._by_address[address] = count + 1
            self._admitted += 1
            return None

    def charge(self, address: str, size: int) -> Optional[float]:
        """Count ``size`` decoded bytes from ``address``: None while within its byte
        allowance, else seconds to wait (the payload that goes over is refused)."""
        if not self.per_address_bytes:
            return None
        address = address_key(address)
        with self._lock:
            wait = self._roll()
            used = self._bytes_by_address.get(address, 0) + size
            self._bytes_by_address[address] = used
            return wait if used > self.per_address_bytes else None

    def _roll(self) -> float:
        """Start a new window (dropping the old tables) when this one is over; time left."""
        now = self._clock()
        if not self._window_start <= now < self._window_start + self.window:
            self._window_start = now
            self._by_address = {}
            self._bytes_by_address = {}
            self._admitted = 0
        return self._window_start + self.window - now
