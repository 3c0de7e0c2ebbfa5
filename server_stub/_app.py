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
import time
import uuid
import zlib
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qs

from ._backends import open_store
from ._events import InvalidEvent, parse_event_query, validate_events
from ._policy import Policy
from ._storage import PayloadRecord, Store, UnstorablePayload

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

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted, as sent (compressed)."""
MAX_DECODED_BYTES = 10 << 20
"""Largest request body accepted once decompressed."""
_CHUNK = 64 << 10
# A refused body up to this size is still read (and discarded) before answering,
# so that the client sees the answer rather than a reset connection.
_DRAIN_LIMIT = 16 << 20
_MAX_PAGE = 1000
_MAX_INT64 = 2**63 - 1
# Deep enough for any real payload, shallow enough to re-encode without recursion errors.
_MAX_DEPTH = 64

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
        if isinstance(self.body, bytes):
            body = self.body
        else:
            body = json.dumps(self.body, separators=(",", ":")).encode()
        headers = [
            (name, value) for name, value in self.headers if name.lower() != "content-length"
        ]
        if body and not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(body))))
        return status_line(self.status), headers, body


def status_line(status: int) -> str:
    """``"404 Not Found"``; unknown codes get a generic phrase."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Status {status}"


def _error(status: int, message: str, headers: Optional[Headers] = None) -> Response:
    return Response(status, {"error": message}, list(headers or []))


class RequestBody:
    """The request body, read at most once and within bounds.

    What was read is kept (``raw``, ``decoded``, ``parsed``) so that the test
    harness can record exactly what arrived, however the request ended.
    """

    def __init__(self, environ: WSGIEnvironment) -> None:
        self._stream = environ["wsgi.input"]
        self._encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
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
        """The body as sent, at most ``MAX_BODY_BYTES`` (HTTPError 400/411/413 otherwise)."""
        if self.raw is not None:
            return self.raw
        if self.length_error:
            status = 400 if self.length_error.startswith("invalid") else 411
            raise HTTPError(status, self.length_error)
        if self._to_eof:
            self.raw = self._read_up_to(MAX_BODY_BYTES + 1)
            if len(self.raw) <= MAX_BODY_BYTES:
                self.length = len(self.raw)
                return self.raw
            raise HTTPError(413, f"body over {MAX_BODY_BYTES} bytes")
        assert self.length is not None
        if self.length > MAX_BODY_BYTES:
            raise HTTPError(413, f"body over {MAX_BODY_BYTES} bytes")
        self.raw = self._read_up_to(self.length)
        if len(self.raw) < self.length:
            raise HTTPError(400, "body shorter than Content-Length")
        return self.raw

    def decode(self) -> bytes:
        """The body with its Content-Encoding undone, at most ``MAX_DECODED_BYTES``."""
        if self.decoded is not None:
            return self.decoded
        raw = self.read()
        if self._encoding in ("", "identity"):
            decoded = raw
        elif self._encoding in ("gzip", "x-gzip"):
            decoded = gunzip(raw, MAX_DECODED_BYTES)
        else:
            raise HTTPError(415, f"unsupported Content-Encoding {self._encoding!r}")
        if len(decoded) > MAX_DECODED_BYTES:
            raise HTTPError(413, f"body over {MAX_DECODED_BYTES} bytes once decompressed")
        self.decoded = decoded
        return decoded

    def parse(self) -> object:
        """The body as JSON (HTTPError 400 when it is not JSON)."""
        if self.has_parsed:
            return self.parsed
        decoded = self.decode()
        try:
            self.parsed = json.loads(decoded, parse_constant=_reject_constant)
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


def request_body(environ: WSGIEnvironment) -> RequestBody:
    """The request's ``RequestBody``, created on first use and kept in ``environ``."""
    body = environ.get(_BODY_KEY)
    if not isinstance(body, RequestBody):
        body = environ[_BODY_KEY] = RequestBody(environ)
    return body


def body_fully_read(environ: WSGIEnvironment) -> bool:
    """Whether the request body was consumed to its end (an untouched empty body was)."""
    body = environ.get(_BODY_KEY)
    if not isinstance(body, RequestBody):
        body = RequestBody(environ)
    return body.fully_read


def gunzip(data: bytes, limit: int) -> bytes:
    """Inflate gzip ``data`` (several members allowed), refusing output over ``limit``.

    Output is produced in bounded steps, so a gzip bomb is stopped once it has
    produced ``limit`` bytes, never inflated in full first.
    """
    chunks: List[bytes] = []
    total = 0
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
                chunks.append(chunk)
                if not chunk and not pending:
                    raise HTTPError(400, "truncated gzip body")
        except zlib.error as exc:
            raise HTTPError(400, f"invalid gzip body: {exc}") from None
        pending = inflater.unused_data
        if not pending:
            return b"".join(chunks)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_timestamp(value: str) -> datetime:
    """RFC 3339, with ``Z`` or a numeric offset and up to nanosecond (or finer) fractions."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    # datetime holds microseconds; Go sends nanoseconds: truncate.
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


def _depth(value: object) -> int:
    """How deeply arrays/objects nest in ``value`` (iteratively: no recursion limit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _validate_client(client: object) -> Optional[Dict[str, Any]]:
    if client is None:
        return None
    if not isinstance(client, dict):
        raise HTTPError(400, "client must be an object")
    for name in ("name", "version"):
        if name in client and not isinstance(client[name], str):
            raise HTTPError(400, f"client.{name} must be a string")
    for name in ("dropped", "dropped_events"):
        count = client.get(name, 0)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _MAX_INT64:
            raise HTTPError(400, f"client.{name} must be a non-negative integer")
    return client


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
        _parse_timestamp(timestamp)
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
    return PayloadRecord(
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
        self, store: Store, policy: Policy, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.policy = policy
        self._clock = clock

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> List[bytes]:
        try:
            status, headers, body = self.handle(environ).encode()
            request_body(environ).drain()
        except Exception:
            logger.exception(
                "internal error on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            status, headers, body = _error(500, "internal server error").encode()
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
                return self.instance(environ, _instance_id(instance_id))
            if path == "/v1/stats":
                _allow(method, "GET")
                return Response(200, self.store.stats())
            if path == "/v1/events":
                _allow(method, "GET")
                return self.events(environ)
            if path == "/healthz":
                _allow(method, "GET")
                return Response(200, {"status": "ok"})
            raise HTTPError(404, f"no such endpoint: {path}")
        except HTTPError as exc:
            return _error(exc.status, exc.message, exc.headers)

    def update(self, environ: WSGIEnvironment, instance_id: str) -> Response:
        """``POST /v1/update/<uuid>``: validate, rate-limit, store, answer with the policy.

        A repeated ``payload_id`` gets the same answer and is not stored again (it
        still counts against the rate limit, like any request).
        """
        if _media_type(environ) != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        request = request_body(environ)
        body = request.parse()
        decoded = request.decoded or b""
        # Counting brackets is cheap; walking the payload only happens when it could be deep.
        if decoded.count(b"[") + decoded.count(b"{") > _MAX_DEPTH and _depth(body) > _MAX_DEPTH:
            raise HTTPError(400, f"payload nested deeper than {_MAX_DEPTH} levels")
        now = self._clock()
        received_at = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        record = validate_payload(body, instance_id, received_at)
        rules = self.policy.current()
        if rules.rate_limit is not None:
            wait = self.store.check_rate(
                instance_id, rules.rate_limit.payloads, rules.rate_limit.window, now
            )
            if wait is not None:
                retry_after = max(1, math.ceil(wait))
                return Response(
                    429,
                    {"error": "rate limit exceeded", "next_update": retry_after * 1_000_000_000},
                    [("Retry-After", str(retry_after))],
                )
        try:
            if not self.store.add(record):
                logger.debug("payload %s already stored; acknowledged again", record.payload_id)
        except UnstorablePayload as exc:
            raise HTTPError(400, f"payload cannot be stored: {exc}") from None
        return Response(200, rules.response_fields(instance_id))

    def instance(self, environ: WSGIEnvironment, instance_id: str) -> Response:
        """``GET /v1/instances/<uuid>?limit=&offset=``: stored payloads, newest first."""
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        limit = _query_int(query, "limit", 50, 1, _MAX_PAGE)
        offset = _query_int(query, "offset", 0, 0, _MAX_INT64)
        payloads = self.store.instance_payloads(instance_id, limit + 1, offset)
        next_offset = offset + limit if len(payloads) > limit else None
        return Response(
            200,
            {"instance_id": instance_id, "payloads": payloads[:limit], "next_offset": next_offset},
        )


    def events(self, environ: WSGIEnvironment) -> Response:
        """``GET /v1/events?type=&name=&instance=&since=&until=&limit=&offset=``: newest first."""
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        try:
            selection = parse_event_query(query, now)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        page = self.store.events(dataclass_replace(selection, limit=selection.limit + 1))
        more = len(page) > selection.limit
        return Response(200, {
            "since": selection.since,
            "until": selection.until,
            "events": page[: selection.limit],
            "next_offset": selection.offset + selection.limit if more else None,
        })


def _allow(method: str, allowed: str) -> None:
    if method == allowed or (method == "HEAD" and allowed == "GET"):
        return
    allow = "GET, HEAD" if allowed == "GET" else allowed
    raise HTTPError(405, f"method {method} not allowed", [("Allow", allow)])


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
) -> App:
    """The WSGI application; e.g. ``gunicorn 'server_stub:create_app(db="telemetry.db")'``.

    ``store`` defaults to the one ``db`` names: a SQLite file (or ``":memory:"``),
    or a ``postgresql://`` URL (``PostgresStore``: several workers can share it).
    ``policy`` defaults to one loaded from ``policy_file`` (re-read when it
    changes, by every worker), or the default policy.
    """
    if policy is not None and policy_file is not None:
        raise ValueError("pass either policy or policy_file, not both")
    if policy is None:
        policy = Policy(policy_file)
    if store is None:
        store = open_store(os.fspath(db))
    return App(store, policy, clock=clock)
