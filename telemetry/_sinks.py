"""Where payloads go: the ``Sink`` protocol, the HTTP sink, a log sink and a no-op sink.

A sink is a callable ``send(request, timeout) -> SendResult``; the emitter
knows nothing else about it. ``requests`` is imported only when the HTTP sink
first sends, so applications that never emit never import it.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import logging
import socket
import sys
import threading
import time
import zlib
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

import attrs

from telemetry._version import __version__
from telemetry._wire import (
    CLIENT_NAME,
    MAX_DURATION_NS,
    Request,
    Response,
    decode_response,
    parse_retry_after,
)

if TYPE_CHECKING:
    import requests

logger = logging.getLogger("telemetry")

USER_AGENT = f"{CLIENT_NAME}/{__version__}"

class Outcome(enum.Enum):
    """What a send attempt came to; the emitter decides what each means for the payload."""

    DELIVERED = "delivered"
    """The server has it: apply ``response``."""
    RETRY = "retry"
    """A transient failure: try again later, keep the payload."""
    RATE_LIMITED = "rate_limited"
    """The server asked to wait (429, or a 408/5xx with ``Retry-After``): keep the
    payload, wait ``retry_after`` (None: the server named no time)."""
    REJECTED = "rejected"
    """The server refused this payload for good: drop it."""


@attrs.frozen
class SendResult:
    """The outcome of one attempt, with the server's instructions when delivered."""

    outcome: Outcome
    response: Response = attrs.field(factory=Response)
    retry_after: Optional[float] = None
    detail: str = ""


class Sink(Protocol):
    """Sends one request, within ``timeout`` seconds as far as the transport allows."""

    def __call__(self, request: Request, timeout: float) -> SendResult: ...


def result_for_status(
    status: int, body: bytes, headers: Mapping[str, str], now: Optional[float] = None
) -> SendResult:
    """Classify an HTTP answer (``docs/protocol.md``, "Statuses"); pure, so testable."""
    detail = f"HTTP {status}"
    if 200 <= status < 300:
        try:
            return SendResult(Outcome.DELIVERED, decode_response(body))
        except ValueError as exc:
            return SendResult(Outcome.RETRY, detail=f"{detail}: {exc}")
    if status in (410, 451):
        return SendResult(Outcome.DELIVERED, Response(stop=True), detail=detail)
    if status == 429:
        retry_after = None
        header = headers.get("Retry-After")
        if header is not None:
            retry_after = parse_retry_after(header, now)
        if retry_after is None:
            try:
                next_update = decode_response(body).next_update
            except ValueError:
                next_update = None
            if next_update is not None and next_update > 0:
                # Capped at the longest Go duration first: a JSON integer can be too
                # big for a float. The emitter caps the wait at max_interval anyway.
                retry_after = min(next_update, MAX_DURATION_NS) / 1e9
        return SendResult(Outcome.RATE_LIMITED, retry_after=retry_after, detail=detail)
    if status == 408 or status >= 500:
        # A busy server (503) says when to come back: that is a wait, like a 429's,
        # and held to the same floor; without a usable time it is a failed attempt.
        header = headers.get("Retry-After")
        retry_after = None if header is None else parse_retry_after(header, now)
        if retry_after is not None:
            return SendResult(Outcome.RATE_LIMITED, retry_after=retry_after, detail=detail)
        return SendResult(Outcome.RETRY, detail=detail)
    if 300 <= status < 400:
        # Never follow: the data must not go to another host.
        return SendResult(Outcome.RETRY, detail=f"{detail} redirect not followed")
    if 400 <= status < 500:
        return SendResult(Outcome.REJECTED, detail=detail)
    return SendResult(Outcome.RETRY, detail=detail)


MAX_ANSWER_BYTES = 64 * 1024
"""The most of a server's answer that is read; a bigger one is a failed attempt."""

_READ_PIECE = 16 * 1024


class _AnswerTooLarge(Exception):
    """The server's answer is over ``MAX_ANSWER_BYTES`` (internal signal)."""


AddressInfo = Tuple[Any, Any, int, str, Any]
"""One of ``socket.getaddrinfo``'s answers: (family, type, proto, canonname, sockaddr)."""

GetAddrInfo = Callable[[str, int, int, int], Sequence[AddressInfo]]
"""``getaddrinfo(host, port, family, type)``, as ``socket.getaddrinfo``."""


class _NameLookupTimedOut(Exception):
    """The name was not resolved within the attempt's deadline (internal signal)."""


class _NameLookupFailed(OSError):
    """The lookup failed; one new exception per waiting attempt, never a shared one."""


@attrs.define(eq=False)
class _Lookup:
    done: threading.Event = attrs.field(factory=threading.Event)
    addresses: Sequence[AddressInfo] = ()
    error: str = ""


class BoundedResolver:
    """Name resolution that an attempt waits for no longer than its deadline.

    ``getaddrinfo`` cannot be interrupted (a dead DNS server holds it for tens
    of seconds), so it runs on a helper thread that the attempt waits for
    until its deadline. An attempt that gives up leaves the lookup running,
    and the next attempt for the same name waits for that same lookup instead
    of starting another: a resolver that hangs costs one thread per name, never
    one per attempt. Answers are not cached (the system's resolver does that).
    """

    def __init__(self, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> None:
        self._getaddrinfo = getaddrinfo
        self._lock = threading.Lock()
        self._running: Dict[Tuple[str, int, int, int], _Lookup] = {}

    def resolve(self, host: str, port: int, family: int, kind: int,
                timeout: float) -> Sequence[AddressInfo]:
        """The addresses of ``host``; raises ``_NameLookupTimedOut`` or ``_NameLookupFailed``."""
        if _is_ip_address(host):  # nothing to look up: answered at once, on this thread
            return self._getaddrinfo(host, port, family, kind)
        key = (host, port, family, kind)
        with self._lock:
            lookup = self._running.get(key)
            if lookup is None:
                lookup = self._running[key] = _Lookup()
                threading.Thread(target=self._look_up, args=(key, lookup), daemon=True,
                                 name="telemetry-name-lookup").start()
        if not lookup.done.wait(max(timeout, 0.0)):
            raise _NameLookupTimedOut
        if lookup.error:
            raise _NameLookupFailed(lookup.error)
        return lookup.addresses

    def _look_up(self, key: Tuple[str, int, int, int], lookup: _Lookup) -> None:
        try:
            lookup.addresses = list(self._getaddrinfo(*key))
        except Exception as exc:  # told to the attempts that wait for it
            lookup.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._running.pop(key, None)
            lookup.done.set()


def _is_ip_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
        except (OSError, ValueError):
            continue
        return True
    return False


class _Watchdog:
    """Cuts one attempt's connection at its deadline, in whatever phase the attempt is.

    A per-read socket timeout lets a server that drips a byte now and then hold
    an attempt for ever; this bounds the whole attempt. The connection pool
    tells the watchdog about the connection an attempt uses (see
    ``_watched_pool_classes``); at the deadline a timer thread shuts its socket
    down, which wakes the blocked read with an error. Name resolution and
    connecting, before there is a socket to cut, are bounded by waiting for
    them no longer than what is left (``remaining``).
    """

    def __init__(self, seconds: float, resolver: Optional[BoundedResolver] = None) -> None:
        self.resolver = resolver
        self.deadline = time.monotonic() + seconds
        self.late = ""  # what the attempt was doing when the deadline passed, if known
        self._lock = threading.Lock()
        self._connections: List[Any] = []
        self._new_sockets: List[socket.socket] = []  # our duplicates, closed by ``close``
        self._finished = False
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = "telemetry-send-deadline"
        self._timer.start()

    def watch_connection(self, connection: Any) -> None:
        """The attempt uses ``connection`` (maybe already connected, from the pool)."""
        with self._lock:
            self._connections.append(connection)
            if self.expired:
                self._cut()

    def watch_new_socket(self, sock: socket.socket) -> None:
        """A connection was just opened on ``sock`` (before any TLS handshake)."""
        # A duplicate, because TLS takes the socket over (the original is detached):
        # shutting the duplicate down ends the handshake too.
        duplicate = sock.dup()
        with self._lock:
            if self._finished:
                duplicate.close()
                return
            self._new_sockets.append(duplicate)
            if self.expired:
                self._cut()

    def remaining(self) -> float:
        """Seconds left before the deadline (never below 0)."""
        return max(0.0, self.deadline - time.monotonic())

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._finished = True
            for duplicate in self._new_sockets:
                duplicate.close()
            self._new_sockets.clear()
            self._connections.clear()

    def _expire(self) -> None:
        with self._lock:
            if not self._finished:
                self.expired = True
                self._cut()

    def _cut(self) -> None:
        sockets = [getattr(connection, "sock", None) for connection in self._connections]
        for sock in [*self._new_sockets, *sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()  # the ``_Watchdog`` of the attempt running on this thread


def _watchdog() -> Optional[_Watchdog]:
    watchdog: Optional[_Watchdog] = getattr(_current, "watchdog", None)
    return watchdog


_WATCHED: Dict[type, type] = {}
_WATCHED_LOCK = threading.Lock()


def _watched_pool_class(pool_class: type) -> type:
    """A subclass of a urllib3 pool class whose connections report to the watchdog."""
    with _WATCHED_LOCK:
        watched = _WATCHED.get(pool_class)
        if watched is not None:
            return watched
        connection_class = pool_class.ConnectionCls  # type: ignore[attr-defined]

        # Only where the plain TCP connect is used; a class that connects its own way
        # (a SOCKS proxy) keeps it.
        plain_tcp = _plain_tcp_new_conn(connection_class)

        def _new_conn(self: Any) -> Any:
            watchdog = _watchdog()
            if plain_tcp and watchdog is not None and watchdog.resolver is not None:
                sock = _connect_within(self, watchdog, watchdog.resolver)
            else:
                sock = connection_class._new_conn(self)
            if watchdog is not None:
                watchdog.watch_new_socket(sock)
            return sock

        def _get_conn(self: Any, timeout: Optional[float] = None) -> Any:
            connection = pool_class._get_conn(self, timeout)  # type: ignore[attr-defined]
            watchdog = _watchdog()
            if watchdog is not None:
                watchdog.watch_connection(connection)
            return connection

        watched_connection = type(
            f"Watched{connection_class.__name__}", (connection_class,), {"_new_conn": _new_conn}
        )
        watched = type(
            f"Watched{pool_class.__name__}",
            (pool_class,),
            {"ConnectionCls": watched_connection, "_get_conn": _get_conn},
        )
        _WATCHED[pool_class] = watched
        return watched


def _plain_tcp_new_conn(connection_class: type) -> bool:
    from urllib3.connection import HTTPConnection  # noqa: PLC0415 - requests' transport

    new_conn = getattr(connection_class, "_new_conn", None)
    return new_conn is getattr(HTTPConnection, "_new_conn", None)


def _connect_within(connection: Any, watchdog: _Watchdog, resolver: BoundedResolver) -> Any:
    """``HTTPConnection._new_conn``, with resolving and connecting inside the deadline."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError  # noqa: PLC0415
    from urllib3.util.connection import allowed_gai_family  # noqa: PLC0415

    host = str(getattr(connection, "_dns_host", connection.host)).strip("[]")
    try:
        addresses = resolver.resolve(host, connection.port, allowed_gai_family(),
                                     socket.SOCK_STREAM, watchdog.remaining())
    except _NameLookupTimedOut:
        watchdog.late = f"still resolving {host!r}"
        raise ConnectTimeoutError(
            connection, f"name resolution of {host} took longer than the attempt's deadline"
        ) from None
    except (OSError, UnicodeError) as exc:  # socket.gaierror: no such name
        raise NewConnectionError(connection, f"Failed to resolve {host!r}: {exc}") from exc
    timeout = connection.timeout  # a number, None (blocking) or urllib3's "default"
    if timeout is not None and not isinstance(timeout, (int, float)):
        timeout = socket.getdefaulttimeout()
    error: Optional[OSError] = None
    for family, kind, proto, _, address in addresses:
        remaining = watchdog.remaining()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            for option in connection.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(remaining if timeout is None else min(timeout, remaining))
            if connection.source_address:
                sock.bind(connection.source_address)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.settimeout(timeout)  # as urllib3 leaves it; the watchdog bounds what follows
        sys.audit("http.client.connect", connection, connection.host, connection.port)
        return sock
    if error is None or isinstance(error, socket.timeout):
        raise ConnectTimeoutError(connection, f"Connection to {host} timed out")
    raise NewConnectionError(connection, f"Failed to establish a new connection: {error}")


def _watch_pools(manager: Any) -> Any:
    """Make ``manager`` (a urllib3 pool or proxy manager) build watched pools."""
    classes = getattr(manager, "pool_classes_by_scheme", None)
    if isinstance(classes, dict):
        manager.pool_classes_by_scheme = {
            scheme: _watched_pool_class(pool_class) for scheme, pool_class in classes.items()
        }
    return manager


def _deadline_adapter() -> Any:
    """A requests ``HTTPAdapter`` whose connections the attempt's watchdog can cut."""
    from requests.adapters import HTTPAdapter  # noqa: PLC0415

    class DeadlineAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            _watch_pools(self.poolmanager)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            known = proxy in self.proxy_manager
            manager = super().proxy_manager_for(proxy, **proxy_kwargs)
            return manager if known else _watch_pools(manager)

    return DeadlineAdapter()


def _read_answer(answer: requests.Response) -> bytes:
    """At most ``MAX_ANSWER_BYTES`` of the body, decoded; raises ``_AnswerTooLarge``."""
    declared = answer.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise _AnswerTooLarge
    pieces: List[bytes] = []
    size = 0
    while size <= MAX_ANSWER_BYTES:
        piece = answer.raw.read(min(_READ_PIECE, MAX_ANSWER_BYTES + 1 - size),
                                decode_content=False)
        if not piece:
            break
        pieces.append(piece)
        size += len(piece)
    if size > MAX_ANSWER_BYTES:
        raise _AnswerTooLarge
    body = b"".join(pieces)
    encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"answer in an unasked-for encoding {encoding!r}")
    # We ask for no encoding; a server that compresses anyway is held to the same cap.
    decompressor = zlib.decompressobj(47 if encoding != "deflate" else 15)
    try:
        decoded = decompressor.decompress(body, MAX_ANSWER_BYTES + 1)
    except zlib.error as exc:
        raise ValueError(f"answer does not decompress: {exc}") from None
    if len(decoded) > MAX_ANSWER_BYTES or decompressor.unconsumed_tail:
        raise _AnswerTooLarge
    return decoded


def _too_late(timeout: float, watchdog: _Watchdog) -> str:
    said = f"no complete answer within {timeout:g} s"
    return f"{said} ({watchdog.late})" if watchdog.late else said


class HTTPSink:
    """POSTs payloads with a ``requests.Session``: proxies and CA bundles as requests does.

    ``verify`` and ``proxies`` override the environment (``REQUESTS_CA_BUNDLE``,
    ``HTTPS_PROXY`` ...), which requests honours by default. Each attempt has a
    total deadline (``timeout``), name resolution included, however slowly the
    server (or DNS) answers, and reads at most ``MAX_ANSWER_BYTES`` of the answer.
    ``getaddrinfo`` resolves names (``socket.getaddrinfo``'s signature; a seam for
    tests).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        verify: Union[bool, str, None] = None,
        proxies: Optional[Dict[str, str]] = None,
        wall_clock: Any = time.time,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._resolver = BoundedResolver(getaddrinfo)
        self._verify = verify
        self._proxies = proxies
        self._wall_clock = wall_clock
        self._session: Optional[requests.Session] = None

    def _get_session(self) -> requests.Session:
        if self._session is None:
            import requests  # noqa: PLC0415 - imported on first send only

            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            session.headers["Accept-Encoding"] = "identity"
            for prefix in ("http://", "https://"):
                session.mount(prefix, _deadline_adapter())
            self._session = session
        return self._session

    def __call__(self, request: Request, timeout: float) -> SendResult:
        import requests  # noqa: PLC0415 - already loaded by _get_session
        import urllib3  # noqa: PLC0415 - requests' own transport

        session = self._get_session()
        headers = {"Content-Type": "application/json"}
        if request.gzipped:
            headers["Content-Encoding"] = "gzip"
        url = f"{self.endpoint}/v1/update/{request.payload.instance_id}"
        timeout = max(timeout, 0.001)
        watchdog = _Watchdog(timeout, self._resolver)
        _current.watchdog = watchdog
        try:
            answer = session.post(
                url,
                data=request.body,
                headers=headers,
                timeout=(timeout, timeout),  # per connect and per read; the watchdog: in all
                allow_redirects=False,
                stream=True,
                # Per request: requests lets the environment override a session's settings.
                verify=self._verify,
                proxies=self._proxies,
            )
            try:
                body = _read_answer(answer)
            finally:
                answer.close()
        except _AnswerTooLarge:
            return SendResult(Outcome.RETRY, detail=f"answer larger than {MAX_ANSWER_BYTES} bytes")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                http.client.HTTPException, ValueError) as exc:
            if watchdog.expired or watchdog.late:
                return SendResult(Outcome.RETRY, detail=_too_late(timeout, watchdog))
            return SendResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}")
        finally:
            _current.watchdog = None
            watchdog.close()
        if watchdog.expired:
            return SendResult(Outcome.RETRY, detail=_too_late(timeout, watchdog))
        return result_for_status(answer.status_code, body, answer.headers, self._wall_clock())

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def _format_field(value: object) -> str:
    import json  # noqa: PLC0415

    # ``default=list``: a counting set (``_wire.CountingSet``) is written as its list.
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"),
                                                         default=list)
    return json.dumps(text) if (" " in text or not text) else text


def _event_line(event: Mapping[str, Any]) -> str:
    """``<type>/<name> key=value ...``: the event's id and time, then its attributes."""
    head = f"{event.get('event_type')}/{event.get('event_name')}"
    fields = [
        f"{key}={_format_field(value)}"
        for key, value in event.items()
        if key not in ("event_type", "event_name")
    ]
    return " ".join([head, *fields])


class LogSink:
    """Writes one ``[telemetry] key=value ...`` line per payload, and one
    ``[telemetry] event <type>/<name> key=value ...`` line per event: the ``local`` dry run."""

    def __init__(self, log: logging.Logger = logger, level: int = logging.INFO) -> None:
        self._log = log
        self._level = level

    def __call__(self, request: Request, timeout: float) -> SendResult:
        payload = request.payload
        fields = [f"payload_id={payload.payload_id}", f"dropped={payload.dropped}"]
        if payload.dropped_events:
            fields.append(f"dropped_events={payload.dropped_events}")
        fields += [f"{key}={_format_field(value)}" for key, value in payload.data.items()]
        self._log.log(self._level, "[telemetry] %s", " ".join(fields))
        for event in payload.events:
            self._log.log(self._level, "[telemetry] event %s", _event_line(event))
        return SendResult(Outcome.DELIVERED)


class NoOpSink:
    """Accepts and forgets every payload."""

    def __call__(self, request: Request, timeout: float) -> SendResult:
        return SendResult(Outcome.DELIVERED)
