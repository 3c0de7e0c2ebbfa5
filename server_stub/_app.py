"""The WSGI application: routing, request validation, and the protocol's answers.

The protocol, as a client sees it, is ``docs/protocol.md``.

Every request gets a JSON answer; nothing raises out of the WSGI callable (an
unexpected error is logged and answered with 500). Bodies are read in bounded
chunks and gzip is inflated with a bounded output, so a hostile request costs
at most ``MAX_BODY_BYTES`` + ``MAX_DECODED_BYTES`` of memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qs

from . import _queries
from ._access import Access, Grant
from ._backends import open_store
from ._console import Console, is_console_path
from ._events import InvalidEvent, parse_event_query, validate_events
from ._limits import (
    Admission,
    InFlightBudget,
    Limits,
    check_document,
    count_values,
    value_bound,
)
from ._openapi import openapi_document
from ._policy import Policy, PolicyRules
from ._rollups import rfc3339_datetime
from ._storage import (
    PayloadRecord,
    Runner,
    Store,
    UnstorablePayload,
    encode_compact,
    format_time,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_DECODED_BYTES",
    "App",
    "HTTPError",
    "RequestBody",
    "Response",
    "body_fully_read",
    "create_app",
    "gunzip",
    "request_body",
    "status_line",
    "validate_payload",
]

logger = logging.getLogger("server_stub")

MAX_BODY_BYTES = Limits.max_body_bytes
"""Largest request body accepted by default, as sent (compressed)."""
MAX_DECODED_BYTES = Limits.max_decoded_bytes
"""Largest request body accepted by default once decompressed."""
_CHUNK = 64 << 10
# A refused body up to this size is still read (and discarded) before answering,
# so that the client sees the answer rather than a reset connection.
_DRAIN_LIMIT = 16 << 20
_MAX_PAGE = 1000
_MAX_BREAKDOWN = 1000
_CSV = "text/csv; charset=utf-8"
_MAX_INT64 = 2**63 - 1
# Decompressed bytes of each body that need no reservation from the shared budget
# (bounded anyway by the number of threads), and how long to wait for the rest.
_FREE_DECODED_BYTES = 1 << 20
_DECODE_WAIT = 1.0
# How often a full database is said so in the log, at most.
_FULL_LOG_INTERVAL = 60.0
# How long a measured database size is trusted (what was stored since is added to it).
_STORAGE_MEASURE_INTERVAL = 1.0

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PAYLOAD_ID = re.compile(r"[0-9a-f]{32}")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_ROUTE = re.compile(r"/v1/(update|instances)/([^/]*)")

_BODY_KEY = "server_stub.request_body"

Headers = List[Tuple[str, str]]


class HTTPError(Exception):
    """An answer other than success: a status and an ``{"error": message}`` body."""

    def __init__(self, status: int, message: str, headers: Optional[Headers] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass
class Response:
    status: int
    body: Any
    """A JSON-able object, or bytes sent as they are."""
    headers: Headers = field(default_factory=list)

    def encode(self) -> Tuple[str, Headers, bytes]:
        """Status line, headers (Content-Type and Content-Length added), body bytes."""
        body = self.body if isinstance(self.body, bytes) else encode_compact(self.body).encode()
        if not self.headers:  # most answers: no header of their own to look through
            if body:
                return status_line(self.status), [
                    ("Content-Type", "application/json"), ("Content-Length", str(len(body)))
                ], body
            return status_line(self.status), [("Content-Length", "0")], body
        headers = [
            (name, value) for name, value in self.headers if name.lower() != "content-length"
        ]
        if body and not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(body))))
        return status_line(self.status), headers, body


def status_line(status: int) -> str:
    """``"404 Not Found"``; unknown codes get a generic phrase."""
    line = _STATUS_LINES.get(status)
    if line is not None:
        return line
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Status {status}"


_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


def _error(status: int, message: str, headers: Optional[Headers] = None) -> Response:
    return Response(status, {"error": message}, list(headers or []))


class RequestBody:
    """The request body, read at most once and within bounds.

    What was read is kept (``raw``, ``decoded``, ``parsed``) so that the test
    harness can record exactly what arrived, however the request ended.
    """

    def __init__(
        self,
        environ: WSGIEnvironment,
        limits: Optional[Limits] = None,
        budget: Optional[InFlightBudget] = None,
    ) -> None:
        """``budget``: decompressed bytes beyond the first MiB of each body are
        reserved from it (503 when it stays full), and released by ``release()``."""
        limits = limits or Limits()
        self._budget = budget
        self._unreserved = _FREE_DECODED_BYTES
        self._reserved = 0
        self.max_bytes = limits.max_body_bytes
        self.max_decoded_bytes = limits.max_decoded_bytes
        self._stream = environ["wsgi.input"]
        self._encoding: str = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
        self._consumed = 0
        self._to_eof = False
        self.length: Optional[int] = None
        """Bytes in the body; None while unknown."""
        self.length_error: Optional[str] = None
        declared = environ.get("CONTENT_LENGTH", "").strip()
        if declared:
            self.length = _parse_count(declared)
            if self.length is None:
                self.length_error = "invalid Content-Length"
        elif environ.get("wsgi.input_terminated"):
            self._to_eof = True  # e.g. gunicorn with a chunked body: read to EOF
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            self.length_error = "Content-Length required"  # wsgiref cannot de-chunk
        else:
            self.length = 0
        self.raw: Optional[bytes] = None
        self.decoded: Optional[bytes] = None
        self.parsed: object = None
        self.has_parsed = False

    @property
    def fully_read(self) -> bool:
        """Whether the whole body was consumed (so the connection can serve another request)."""
        return self.length is not None and self._consumed >= self.length

    def read(self) -> bytes:
        """The body as sent, at most ``max_bytes`` (HTTPError 400/411/413 otherwise)."""
        if self.raw is not None:
            return self.raw
        if self.length_error:
            status = 400 if self.length_error.startswith("invalid") else 411
            raise HTTPError(status, self.length_error)
        if self._to_eof:
            self.raw = self._read_up_to(self.max_bytes + 1)
            if len(self.raw) <= self.max_bytes:
                self.length = len(self.raw)
                return self.raw
            raise HTTPError(413, f"body over {self.max_bytes} bytes")
        assert self.length is not None
        if self.length > self.max_bytes:
            raise HTTPError(413, f"body over {self.max_bytes} bytes")
        self.raw = self._read_up_to(self.length)
        if len(self.raw) < self.length:
            raise HTTPError(400, "body shorter than Content-Length")
        return self.raw

    def decode(self) -> bytes:
        """The body with its Content-Encoding undone, at most ``max_decoded_bytes``."""
        if self.decoded is not None:
            return self.decoded
        raw = self.read()
        if self._encoding in ("", "identity"):
            decoded = raw
        elif self._encoding in ("gzip", "x-gzip"):
            decoded = gunzip(raw, self.max_decoded_bytes, self._reserve)
        else:
            raise HTTPError(415, f"unsupported Content-Encoding {self._encoding!r}")
        if len(decoded) > self.max_decoded_bytes:
            raise HTTPError(413, f"body over {self.max_decoded_bytes} bytes once decompressed")
        self.decoded = decoded
        return decoded

    @property
    def encoding(self) -> str:
        """The Content-Encoding, lower case ("" when none)."""
        return self._encoding

    def measure(
        self, keep_values: int, over: Optional[Callable[[], None]] = None
    ) -> Tuple[int, int]:
        """The body's size once decompressed and its ``value_bound``, found in bounded steps.

        The decompressed body is kept (``decoded``) only while that bound is within
        ``keep_values``; a bigger gzip body is measured without being held in memory.
        ``over()`` is called once the bound passes ``keep_values`` (it may raise
        HTTPError, which ends the measuring there).
        """
        if self.decoded is None and self._encoding in ("gzip", "x-gzip"):
            decoded, size, bound = inflate(
                self.read(), self.max_decoded_bytes, self._reserve, keep_values, over
            )
            self.decoded = decoded
            return size, bound
        decoded = self.decode()
        bound = value_bound(decoded)
        if over is not None and bound > keep_values:
            over()
        return len(decoded), bound

    def _reserve(self, size: int) -> None:
        free = min(size, self._unreserved)
        self._unreserved -= free
        size -= free
        if not size or self._budget is None:
            return
        if not self._budget.acquire(size, _DECODE_WAIT):
            raise HTTPError(503, "server busy; try again later", [("Retry-After", "1")])
        self._reserved += size

    def release(self) -> None:
        """Give back what ``decode()`` reserved from the budget (safe to call twice)."""
        if self._budget is not None and self._reserved:
            self._budget.release(self._reserved)
        self._reserved = 0

    def parse(self) -> object:
        """The body as JSON (HTTPError 400 when it is not JSON)."""
        if self.has_parsed:
            return self.parsed
        decoded = self.decode()
        try:
            # ``json.loads`` would build a decoder per call; its own handling of bytes.
            # An object that starts with "{" and no NUL is UTF-8 (what detect_encoding says).
            if decoded[:1] == b"{" and decoded[1:2] != b"\0":
                encoding = "utf-8"
            else:
                encoding = json.detect_encoding(decoded)
            self.parsed = _parse_json(decoded.decode(encoding, "surrogatepass"))
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None
        self.has_parsed = True
        return self.parsed

    def drain(self) -> None:
        """Read and discard what is left of a body of known, moderate length."""
        if self.length is None or self.length > _DRAIN_LIMIT:
            return
        try:
            while self._consumed < self.length:
                if not self._read_chunk(min(_CHUNK, self.length - self._consumed)):
                    break
        except (HTTPError, ValueError):
            pass

    def _read_up_to(self, limit: int) -> bytes:
        chunks = []
        total = 0
        while total < limit:
            chunk = self._read_chunk(min(_CHUNK, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def _read_chunk(self, size: int) -> bytes:
        try:
            chunk: bytes = self._stream.read(size)
        except socket.timeout:
            raise HTTPError(408, "timed out reading the body") from None
        except OSError as exc:
            raise HTTPError(400, f"connection failed while reading the body: {exc}") from None
        self._consumed += len(chunk)
        return chunk


def request_body(
    environ: WSGIEnvironment,
    limits: Optional[Limits] = None,
    budget: Optional[InFlightBudget] = None,
) -> RequestBody:
    """The request's ``RequestBody``, created on first use and kept in ``environ``."""
    body = environ.get(_BODY_KEY)
    if not isinstance(body, RequestBody):
        body = environ[_BODY_KEY] = RequestBody(environ, limits, budget)
    return body


def body_fully_read(environ: WSGIEnvironment) -> bool:
    """Whether the request body was consumed to its end (an untouched empty body was)."""
    body = environ.get(_BODY_KEY)
    if not isinstance(body, RequestBody):
        body = RequestBody(environ)
    return body.fully_read


def gunzip(data: bytes, limit: int, reserve: Optional[Callable[[int], None]] = None) -> bytes:
    """Inflate gzip ``data`` (several members allowed), refusing output over ``limit``.

    Output is produced in bounded steps, so a gzip bomb is stopped once it has
    produced ``limit`` bytes, never inflated in full first. ``reserve(n)`` is
    called before each step keeps ``n`` more bytes (it may raise HTTPError).
    """
    decoded, _, _ = inflate(data, limit, reserve)
    assert decoded is not None  # kept whole without keep_values
    return decoded


def inflate(
    data: bytes,
    limit: int,
    reserve: Optional[Callable[[int], None]] = None,
    keep_values: Optional[int] = None,
    over: Optional[Callable[[], None]] = None,
) -> Tuple[Optional[bytes], int, int]:
    """As ``gunzip``: the output, its size, and (with ``keep_values``) its ``value_bound``.

    With ``keep_values``, the bound is counted step by step (no call holds the
    GIL for long, however big the output), and the output is kept only while
    the bound is within ``keep_values``: beyond it, ``over()`` is called (it
    may raise), the rest is only measured and None is returned in place of the
    output. Without, the bound is 0.
    """
    chunks: List[bytes] = []
    total = 0
    bound = 1
    keeping = True
    pending = data
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while not inflater.eof:
                chunk = inflater.decompress(pending, _CHUNK)
                pending = inflater.unconsumed_tail
                total += len(chunk)
                if total > limit:
                    raise HTTPError(413, f"body over {limit} bytes once decompressed")
                if keep_values is not None:
                    bound += value_bound(chunk) - 1
                    if keeping and bound > keep_values:
                        keeping = False
                        chunks = []
                        if over is not None:
                            over()
                if keeping:
                    if reserve is not None:
                        reserve(2 * len(chunk))  # the chunk, and its copy when they are joined
                    chunks.append(chunk)
                if not chunk and not pending:
                    raise HTTPError(400, "truncated gzip body")
        except zlib.error as exc:
            raise HTTPError(400, f"invalid gzip body: {exc}") from None
        pending = inflater.unused_data
        if not pending:
            return (b"".join(chunks) if keeping else None), total, bound if keep_values else 0


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN: Callable[[str, int], Tuple[object, int]] = _JSON.scan_once  # type: ignore[attr-defined]


def _parse_json(text: str) -> object:
    """``_JSON.decode(text)``: the same value or error. An object with no white space
    around it goes straight to the scanner (``decode`` first and last matches white
    space, and ``raw_decode`` adds a frame)."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            value, end = _SCAN(text, 0)  # raises what decode would (bar StopIteration)
        except StopIteration:
            pass
        else:
            if end == len(text):
                return value
    return _JSON.decode(text)


def _parse_timestamp(value: str) -> datetime:
    """RFC 3339, with ``Z`` or a numeric offset and up to nanosecond (or finer) fractions."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 timestamp")
    # datetime holds microseconds; Go sends nanoseconds: truncate.
    return rfc3339_datetime(match)


def _check_timestamp(value: str) -> None:
    """ValueError unless ``_parse_timestamp`` accepts ``value`` (with its message)."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 timestamp")
    if len(value) == 27 and value[10] == "T" and value[26] == "Z" and value[11:13] < "24":
        # What the Python client sends (six fraction digits): the C parser checks
        # the same ranges (newer ones take hour 24: not here); where it refuses,
        # the slower path gives the reason.
        try:
            datetime.fromisoformat(value[:26])
        except ValueError:
            pass
        else:
            return
    rfc3339_datetime(match)


def _validate_client(client: object) -> Optional[Dict[str, Any]]:
    if client is None:
        return None
    if not isinstance(client, dict):
        raise HTTPError(400, "client must be an object")
    # Written out per member (no loop over the names, no f-string until one is wrong).
    if not isinstance(client.get("name", ""), str):
        raise HTTPError(400, "client.name must be a string")
    if not isinstance(client.get("version", ""), str):
        raise HTTPError(400, "client.version must be a string")
    _check_count(client.get("dropped", 0), "dropped")
    _check_count(client.get("dropped_events", 0), "dropped_events")
    return client


def _check_count(count: object, name: str) -> None:
    if type(count) is int and 0 <= count <= _MAX_INT64:
        return
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _MAX_INT64:
        raise HTTPError(400, f"client.{name} must be a non-negative integer")


def validate_payload(body: object, instance_id: str, received_at: str) -> PayloadRecord:
    """The stored form of a ``/v1/update`` body, or HTTPError 400 saying what is wrong.

    Accepts what Caddy's Go client sends too: no ``payload_id`` (one is
    assigned, so no dedup), ``expect_next`` (ignored), ``data`` omitted.
    """
    if not isinstance(body, dict):
        raise HTTPError(400, "payload must be a JSON object")
    body_instance = body.get("instance_id")
    if not isinstance(body_instance, str):
        raise HTTPError(400, "instance_id must be a string")
    if body_instance.lower() != instance_id:
        raise HTTPError(400, "instance_id in the body differs from the one in the path")
    timestamp = body.get("timestamp")
    if not isinstance(timestamp, str):
        raise HTTPError(400, "timestamp must be an RFC 3339 string")
    try:
        _check_timestamp(timestamp)
    except ValueError as exc:
        raise HTTPError(400, f"invalid timestamp {timestamp!r}: {exc}") from None
    if "payload_id" in body:
        payload_id = body["payload_id"]
        if not isinstance(payload_id, str) or not _PAYLOAD_ID.fullmatch(payload_id):
            raise HTTPError(400, "payload_id must be 32 lowercase hex digits")
    else:
        payload_id = uuid.uuid4().hex
    data = body.get("data")
    if data is None:  # omitted (Go's omitempty) or a Go nil map
        data = {}
    if not isinstance(data, dict):
        raise HTTPError(400, "data must be an object")
    try:
        events = validate_events(body.get("events"), instance_id, payload_id, received_at)
    except (InvalidEvent, ValueError) as exc:
        raise HTTPError(400, str(exc)) from None
    return PayloadRecord.of(
        payload_id=payload_id,
        instance_id=instance_id,
        timestamp=timestamp,
        received_at=received_at,
        data=data,
        client=_validate_client(body.get("client")),
        events=events,
    )


def _media_type(environ: WSGIEnvironment) -> str:
    content_type: str = environ.get("CONTENT_TYPE", "")
    if content_type == "application/json":  # what clients send: nothing to take apart
        return content_type
    return content_type.split(";", 1)[0].strip().lower()


def _query_int(query: Mapping[str, List[str]], name: str, default: int, low: int, high: int) -> int:
    values = query.get(name)
    if not values:
        return default
    number = _parse_count(values[-1].strip())
    if number is None or not low <= number <= high:
        raise HTTPError(400, f"{name} must be an integer from {low} to {high}")
    return number


def _parse_count(text: str) -> Optional[int]:
    """A non-negative decimal integer of at most 18 ASCII digits (fits int64), else None."""
    if not (0 < len(text) <= 18 and text.isascii() and text.isdigit()):
        return None
    return int(text)


class App:
    """The WSGI application (``create_app`` builds one)."""

    def __init__(
        self,
        store: Store,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
        limits: Optional[Limits] = None,
        heavy_lane: Optional[Callable[[bytes, str, str, str], Response]] = None,
        heavy_values: int = 100_000,
        heavy_busy: Optional[Callable[[], bool]] = None,
        access: Optional[Access] = None,
    ) -> None:
        """``heavy_lane(body, content_encoding, instance_id, address)``, when given,
        answers payloads of more than ``heavy_values`` JSON values (in another
        process), from the body as sent (admitted, and measured once decompressed).
        While ``heavy_busy()`` is true, such a payload is answered 503 as soon as
        it is known to be one, before the rest of it is decompressed.
        ``access``: who may read and change the policy (default: no tokens, loopback
        only). The policy is bound to the store (see ``Policy.bind``).
        """
        self.store = store
        self.heavy_lane = heavy_lane
        self.heavy_values = heavy_values
        self.heavy_busy = heavy_busy
        self.policy = policy
        self.limits = limits or Limits()
        self._clock = clock
        self._budget = InFlightBudget(self.limits.max_values_in_flight)
        self._decoded_budget = InFlightBudget(self.limits.max_decoded_bytes_in_flight)
        self.admission = Admission(
            self.limits.per_address,
            self.limits.total,
            self.limits.window,
            per_address_bytes=self.limits.per_address_bytes,
            clock=clock,
        )
        self._storage_lock = threading.Lock()
        # The encoded answers to /v1/update under one version of the rules (they
        # differ only in "stop"): rules are immutable, a new version starts afresh.
        self._answers: Tuple[Optional[PolicyRules], Dict[bool, bytes]] = (None, {})
        # The last whole second a payload arrived in, and its text (``_received_at``)
        self._second: Tuple[float, str] = (-1.0, "")
        self._stored_bytes = 0
        self._measured_at: Optional[float] = None
        self._full_logged_at: Optional[float] = None
        self.access = access if access is not None else Access()
        self.console = Console(
            self, self.access, read_body=lambda environ: request_body(environ).read(), clock=clock
        )
        policy.bind(store)
        self._readers: Dict[str, Callable[[WSGIEnvironment], Response]] = {
            "/v1/stats": self.stats,
            "/v1/events": self.events,
            "/v1/series": self.series,
            "/v1/breakdown": self.breakdown,
            "/v1/active": self.active,
            "/v1/policy/history": self.policy_history,
            "/v1/openapi.json": self.openapi,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> List[bytes]:
        request = request_body(environ, self.limits, self._decoded_budget)
        try:
            status, headers, body = self.handle(environ).encode()
            request.drain()
        except Exception:
            logger.exception(
                "internal error on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            status, headers, body = _error(500, "internal server error").encode()
        finally:
            request.release()
        start_response(status, headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def handle(self, environ: WSGIEnvironment) -> Response:
        """Route one request to its answer (raises only on a bug)."""
        method: str = environ.get("REQUEST_METHOD", "GET").upper()
        path: str = environ.get("PATH_INFO", "") or "/"
        try:
            route = _ROUTE.fullmatch(path)
            if route is not None:
                kind, instance_id = route.groups()
                if kind == "update":
                    _allow(method, "POST")
                    return self.update(environ, _instance_id(instance_id))
                _allow(method, "GET")
                self._require(environ, Grant.READ)
                return self.instance(environ, _instance_id(instance_id))
            if path == "/healthz":
                _allow(method, "GET")
                return Response(200, {"status": "ok"})
            if path == "/v1/policy":
                _allow(method, "GET", "PUT")
                if method == "PUT":
                    self._require(environ, Grant.ADMIN)
                    return self.put_policy(environ)
                self._require(environ, Grant.READ)
                return Response(200, self.policy.current().to_fields())
            reader = self._readers.get(path)
            if reader is not None:
                _allow(method, "GET")
                self._require(environ, Grant.READ)
                return reader(environ)
            if is_console_path(path):
                status, headers, body = self.console.handle(environ)
                return Response(status, body, headers)
            raise HTTPError(404, f"no such endpoint: {path}")
        except HTTPError as exc:
            return _error(exc.status, exc.message, exc.headers)

    def update(self, environ: WSGIEnvironment, instance_id: str) -> Response:
        """``POST /v1/update/<uuid>``: admit, validate, rate-limit, store, answer with the policy.

        A repeated ``payload_id`` gets the same answer and is not stored again (it
        still counts against the rate limits, like any request).
        """
        if _media_type(environ) != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        address = str(environ.get("REMOTE_ADDR") or "unknown")
        wait = self.admission.admit(address)
        if wait is not None:
            return _too_many("too many payloads from this address or in total", wait)
        request = request_body(environ, self.limits)
        if self.heavy_lane is None:
            size, bound = len(request.decode()), 0
        else:
            # A big gzip body is measured in small steps and not kept: the child
            # process gets it as sent.
            size, bound = request.measure(self.heavy_values, self._heavy_lane_free)
        wait = self.admission.charge(address, size)
        if wait is not None:
            return _too_many("too many bytes from this address", wait)
        if self.heavy_lane is not None and bound > self.heavy_values:
            # Counting exactly (and then parsing) would hold the GIL for long: elsewhere.
            return self.heavy_lane(request.read(), request.encoding, instance_id, address)
        decoded = request.decode()
        values = count_values(decoded, self.limits.max_values)
        check_value_count(values, self.limits)
        if not self._budget.acquire(values, self.limits.budget_wait):
            raise HTTPError(503, "server busy; try again later", [("Retry-After", "1")])
        try:
            return self.store_payload(request, instance_id, address)
        finally:
            self._budget.release(values)

    def _heavy_lane_free(self) -> None:
        """HTTPError 503 while the heavy lane is busy (a big payload then costs no more)."""
        if self.heavy_busy is not None and self.heavy_busy():
            raise HTTPError(503, "busy with another large payload; retry", [("Retry-After", "1")])

    def store_payload(self, request: RequestBody, instance_id: str, address: str) -> Response:
        """Parse, check, rate-limit and store an admitted body; the answer (or HTTPError)."""
        body = request.parse()
        now = self._clock()
        received_at = self._received_at(now)
        # The payload's shape first (it walks no nested value): a bad event is
        # named by its index and field, not only by where the document walk found it.
        record = validate_payload(body, instance_id, received_at)
        # One walk over every value: cheaper than any scan of the text that could
        # rule the walk out (a 10-key payload: 13 us against 35 us for a regex scan).
        problem = check_document(body, self.limits)
        if problem is not None:
            raise HTTPError(400, problem)
        rules = self.policy.current()
        if rules.rate_limit is not None:
            # Keyed by instance and address: posts that claim an instance's id from
            # elsewhere cannot use up that instance's own allowance.
            wait = self.store.check_rate(
                f"{instance_id} {address}", rules.rate_limit.payloads, rules.rate_limit.window, now
            )
            if wait is not None:
                return _too_many("rate limit exceeded", wait)
        if self._storage_full(now):
            raise HTTPError(507, "the server's storage budget is used up; try again later")
        try:
            if not self.store.add(record):
                logger.debug("payload %s already stored; acknowledged again", record.payload_id)
            else:
                with self._storage_lock:
                    self._stored_bytes += len(request.decoded or b"")
        except UnstorablePayload as exc:
            raise HTTPError(400, f"payload cannot be stored: {exc}") from None
        return Response(200, self._update_answer(rules, instance_id))

    def _received_at(self, now: float) -> str:
        """``now`` in format_time's form: its whole second formatted once per second, the
        microseconds rounded as ``datetime.fromtimestamp`` rounds them."""
        fraction, whole = math.modf(now)
        micros = round(fraction * 1e6)
        second, prefix = self._second
        if now < 0 or micros >= 1_000_000:  # before 1970, or rounded up to the next second
            arrival = datetime.fromtimestamp(now, timezone.utc).replace(tzinfo=None)
            return arrival.isoformat("T", "microseconds") + "Z"
        if whole != second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
            self._second = (whole, prefix)
        return f"{prefix}{micros:06d}Z"

    def _update_answer(self, rules: PolicyRules, instance_id: str) -> bytes:
        """The body of a successful ``/v1/update`` answer, encoded once per rules and "stop"."""
        stops = rules.stops(instance_id)
        version, bodies = self._answers
        if version is not rules:
            bodies = {}
            self._answers = (rules, bodies)
        body = bodies.get(stops)
        if body is None:
            body = bodies[stops] = encode_compact(rules.response_fields(instance_id)).encode()
        return body

    def _require(self, environ: WSGIEnvironment, needed: Grant) -> None:
        refusal = self.access.check(environ, needed)
        if refusal is not None:
            raise HTTPError(refusal.status, refusal.message, list(refusal.headers))

    def put_policy(self, environ: WSGIEnvironment) -> Response:
        """``PUT /v1/policy``: replace the whole policy (validated as a policy file is)."""
        if _media_type(environ) != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        body = request_body(environ).parse()
        try:
            rules = self.policy.set(body, "http")
        except ValueError as exc:
            raise HTTPError(400, f"invalid policy: {exc}") from None
        logger.info("policy changed over HTTP: %s", rules.to_fields())
        return Response(200, rules.to_fields())

    def policy_history(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/policy/history?limit=``: the latest changes, newest first."""
        query = _query(environ)
        limit = _query_int(query, "limit", 100, 1, _MAX_PAGE)
        return Response(200, {"changes": self.policy.history(limit)})

    def openapi(self, environ: WSGIEnvironment) -> Response:
        return Response(200, openapi_document())

    def stats(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/stats?since=&until=``: totals within the window."""
        query = _query(environ)
        window = self._window(query)
        answer = self._run(lambda run: _queries.stats(run, window))
        # Events over the same whole UTC days as the rest, from their own hourly counts.
        first_day, end_day = window.days()
        answer["events"] = self.store.event_counts(_day_start(first_day), _day_start(end_day))
        return _answer("stats", answer, query)

    def series(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/series?key=&bucket=``: one point per bucket, empty ones included."""
        query = _query(environ)
        key = _required(query, "key")
        window = self._window(query)
        bucket = _bucket(query)
        answer = self._run(lambda run: _queries.series(run, key, bucket, window))
        return _answer("series", answer, query)

    def breakdown(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/breakdown?key=&limit=``: a set key's latest values, a counting set's top."""
        query = _query(environ)
        key = _required(query, "key")
        limit = _query_int(query, "limit", 10, 1, _MAX_BREAKDOWN)
        window = self._window(query)
        answer = self._run(lambda run: _queries.breakdown(run, key, limit, window))
        return _answer("breakdown", answer, query)

    def active(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/active?bucket=``: distinct active instances (and payloads) per bucket."""
        query = _query(environ)
        window = self._window(query)
        bucket = _bucket(query)
        answer = self._run(lambda run: _queries.active(run, bucket, window))
        return _answer("active", answer, query)

    def _run(self, query: Callable[[Runner], Dict[str, Any]]) -> Dict[str, Any]:
        """``query`` in a read transaction, on rollups up to date; a ``BadQuery`` is a 400."""
        try:
            self.store.fold_rollups()
            with self.store.reading() as run:
                return query(run)
        except _queries.BadQuery as exc:
            raise HTTPError(400, str(exc)) from None

    def _window(self, query: Mapping[str, List[str]]) -> _queries.Window:
        try:
            return _queries.parse_window(query, self._clock())
        except _queries.BadQuery as exc:
            raise HTTPError(400, str(exc)) from None

    def _storage_full(self, now: float) -> bool:
        """Whether the database has reached ``max_storage_bytes`` (logged, at most once a minute).

        The size is measured at most once a second; in between, what this process
        stored is added to the last measurement.
        """
        budget = self.limits.max_storage_bytes
        if budget is None:
            return False
        with self._storage_lock:
            measured_at = self._measured_at
            stale = measured_at is None or not 0 <= now - measured_at < _STORAGE_MEASURE_INTERVAL
        if stale:
            size = self.store.storage_bytes()
            with self._storage_lock:
                self._stored_bytes = size
                self._measured_at = now
        with self._storage_lock:
            full = self._stored_bytes >= budget
            if full and (
                self._full_logged_at is None
                or not 0 <= now - self._full_logged_at < _FULL_LOG_INTERVAL
            ):
                self._full_logged_at = now
                logger.error(
                    "storage budget reached (%d of %d bytes): refusing payloads with 507"
                    " until space is freed or max_storage_bytes is raised",
                    self._stored_bytes,
                    budget,
                )
            if not full:
                self._full_logged_at = None
        return full

    def instance(self, environ: WSGIEnvironment, instance_id: str) -> Response:
        """``GET /v1/instances/<uuid>?limit=&offset=``: stored payloads, newest first.

        A page ends early (``next_offset`` says where to go on) once it holds
        ``max_response_bytes`` of payloads; stored JSON is passed through as
        text, never rebuilt as objects.
        """
        query = _query(environ)
        limit = _query_int(query, "limit", 50, 1, _MAX_PAGE)
        offset = _query_int(query, "offset", 0, 0, _MAX_INT64)
        rows, more = self.store.instance_page(
            instance_id, limit, offset, self.limits.max_response_bytes
        )
        next_offset = offset + len(rows) if more else None
        parts = [b'{"instance_id":', _json_bytes(instance_id), b',"payloads":[']
        for index, row in enumerate(rows):
            parts += [
                b"," if index else b"",
                b'{"payload_id":',
                _json_bytes(row.payload_id),
                b',"timestamp":',
                _json_bytes(row.timestamp),
                b',"received_at":',
                _json_bytes(row.received_at),
                b',"data":',
                row.data.encode(),
                b',"client":',
                row.client.encode() if row.client is not None else b"null",
                b"}",
            ]
        parts += [b'],"next_offset":', _json_bytes(next_offset), b"}"]
        return Response(200, b"".join(parts), [("Content-Type", "application/json")])

    def events(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/events?type=&name=&instance=&since=&until=&limit=&offset=``: newest first,
        in pages of at most ``limit`` events and about ``max_response_bytes``."""
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        try:
            selection = parse_event_query(query, now)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        page = self.store.events(dataclass_replace(selection, limit=selection.limit + 1))
        more = len(page) > selection.limit
        del page[selection.limit :]
        # At least one event, then no more than ``max_response_bytes`` (as for payloads).
        size = 0
        for index, row in enumerate(page):
            size += len(json.dumps(row, separators=(",", ":")))
            if index and size > self.limits.max_response_bytes:
                del page[index:]
                more = True
                break
        return Response(200, {
            "since": selection.since,
            "until": selection.until,
            "events": page,
            "next_offset": selection.offset + len(page) if more else None,
        })


def check_value_count(values: int, limits: Limits) -> None:
    """HTTPError 413 when a body holds more JSON values than ``limits`` allow."""
    if values > limits.max_values:
        raise HTTPError(413, f"body holds over {limits.max_values} JSON values")


def _json_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


def _too_many(message: str, wait: float) -> Response:
    retry_after = max(1, math.ceil(wait))
    return Response(
        429,
        {"error": message, "next_update": retry_after * 1_000_000_000},
        [("Retry-After", str(retry_after))],
    )


def _day_start(day: int) -> str:
    """The start of UTC day ``day`` (days since 1970-01-01), as stored times are written."""
    return format_time(datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day))


def _allow(method: str, *allowed: str) -> None:
    if method in allowed or (method == "HEAD" and "GET" in allowed):
        return
    names = [name for each in allowed for name in ((each, "HEAD") if each == "GET" else (each,))]
    raise HTTPError(405, f"method {method} not allowed", [("Allow", ", ".join(names))])


def _query(environ: WSGIEnvironment) -> Dict[str, List[str]]:
    return parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)


def _required(query: Mapping[str, List[str]], name: str) -> str:
    values = query.get(name)
    if not values or not values[-1]:
        raise HTTPError(400, f"{name} is required")
    return values[-1]


def _bucket(query: Mapping[str, List[str]]) -> str:
    try:
        return _queries.parse_bucket(query)
    except _queries.BadQuery as exc:
        raise HTTPError(400, str(exc)) from None


def _answer(kind: str, answer: Dict[str, Any], query: Mapping[str, List[str]]) -> Response:
    """The answer as JSON, or as CSV with ``?format=csv``."""
    values = query.get("format")
    answer_format = values[-1] if values else "json"
    if answer_format == "json":
        return Response(200, answer)
    if answer_format == "csv":
        return Response(200, _queries.to_csv(kind, answer).encode(), [("Content-Type", _CSV)])
    raise HTTPError(400, f"format must be json or csv, not {answer_format!r}")


def _instance_id(text: str) -> str:
    if not _UUID.fullmatch(text):
        raise HTTPError(400, f"invalid instance id {text!r}: expected a UUID")
    return text.lower()


def create_app(
    store: Optional[Store] = None,
    policy: Optional[Policy] = None,
    *,
    db: Union[str, os.PathLike[str]] = ":memory:",
    policy_file: Union[str, os.PathLike[str], None] = None,
    clock: Callable[[], float] = time.time,
    limits: Union[Limits, Mapping[str, Any], None] = None,
    read_token: Optional[str] = None,
    admin_token: Optional[str] = None,
) -> App:
    """The WSGI application; e.g. ``gunicorn 'server_stub:create_app(db="telemetry.db")'``.

    ``store`` defaults to the one ``db`` names: a SQLite file (or ``":memory:"``),
    or a ``postgresql://`` URL (``PostgresStore``: several workers can share it).
    ``policy`` defaults to one loaded from ``policy_file`` (re-read when it
    changes, by every worker), or the default policy; either way it is kept in
    the store, which the file seeds when it holds no policy yet. ``limits``:
    what one request, one address and the whole server may cost: a ``Limits``,
    or its fields as a dict (``limits={"per_address": 0}``, handy in a gunicorn
    app string). ``read_token``/``admin_token`` default to the environment's
    ``TELEMETRY_READ_TOKEN``/``TELEMETRY_ADMIN_TOKEN``; with neither, reads and
    policy changes are served to loopback clients only.
    """
    if limits is not None and not isinstance(limits, Limits):
        limits = Limits(**limits)
    if policy is not None and policy_file is not None:
        raise ValueError("pass either policy or policy_file, not both")
    if policy is None:
        policy = Policy(policy_file)
    access = Access(
        read_token if read_token is not None else os.environ.get("TELEMETRY_READ_TOKEN") or None,
        admin_token if admin_token is not None else os.environ.get("TELEMETRY_ADMIN_TOKEN") or None,
    )
    if store is None:
        store = open_store(os.fspath(db))
    return App(store, policy, clock=clock, limits=limits, access=access)
