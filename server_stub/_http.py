"""The HTTP runtimes: ``FrontServer`` for production, the threading WSGI server for tests.

``FrontServer`` is what ``python -m server_stub`` runs: a buffering front that
slow or hostile clients cannot stall. One thread runs an asyncio loop that
accepts connections and reads each request whole (request line, headers and
body) under a total deadline; only a complete request is handed to a bounded
pool of threads running the WSGI app, so a client that sends one byte a minute
holds a socket and its buffer, never a thread (and, until its headers are
complete, not even an asyncio task: heads are read in protocol callbacks).
It bounds:

- open connections, overall and per client address; when a cap is reached the
  connection that has waited longest for its request to arrive is closed
  (idle keep-alive or slow clients go first; requests being answered are never cut);
- the time to deliver each complete request (``request_timeout``, counted from
  connecting or from the previous answer, spread at random over half as much
  again) and to take each answer;
- header size, body size (the app's limit), and the memory held by buffered
  large bodies in total;
- app threads: small bodies and large bodies have separate pools, so a flood of
  big payloads cannot keep a healthy small one waiting for a thread.

``make_server`` (``ThreadingWSGIServer``) is what the test harness runs on a
background thread: ``wsgiref`` with HTTP/1.1 keep-alive, a thread per
connection with an idle timeout, a bounded and prompt close of open
connections, and ``drop_connection()`` for an application that must end a
connection without answering (scripted faults). It trusts its clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import itertools
import json
import logging
import random
import socket
import socketserver
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote
from wsgiref import simple_server

from ._app import body_fully_read, status_line

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

__all__ = [
    "CLOSE_TIMEOUT",
    "FrontLimits",
    "FrontServer",
    "ThreadingWSGIServer",
    "default_max_connections",
    "drop_connection",
    "make_server",
]

logger = logging.getLogger("server_stub")

_CONNECTION_KEY = "server_stub.connection"
CLOSE_TIMEOUT = 5.0
"""Seconds ``close_connections()`` waits for request threads by default."""


class _Connection:
    """One request's hold on its client connection: drop it, or mark it for closing."""

    def __init__(self, sock: socket.socket, *, keep_alive: bool) -> None:
        self._socket = sock
        self.keep_alive = keep_alive
        self.dropped = False
        self.answered = False

    def drop(self) -> None:
        """End the connection now, without an answer."""
        self.dropped = True
        self.keep_alive = False
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)


class _ServerHandler(simple_server.ServerHandler):
    """wsgiref's handler, speaking HTTP/1.1 with keep-alive, and able to drop the connection."""

    # wsgiref would copy the whole process environment into every request's environ.
    os_environ: Dict[str, str] = {}  # noqa: RUF012  # never mutated

    def __init__(
        self, connection: _Connection, http_version: str, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._connection = connection
        self.http_version = http_version

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        # Another request can follow on this connection only once this one's body
        # was read to its end.
        environ: WSGIEnvironment = getattr(self, "environ", None) or {}
        if not body_fully_read(environ):
            self._connection.keep_alive = False
        if not self._connection.keep_alive:
            self.headers["Connection"] = "close"  # type: ignore[attr-defined]

    def finish_response(self) -> None:
        if self._connection.dropped:
            return  # nothing to write to, and nothing to log
        super().finish_response()

    def close(self) -> None:
        try:
            super().close()  # logs the request
        finally:
            self._connection.answered = True

    def log_exception(self, exc_info: OptExcInfo) -> None:
        logger.error("unhandled error in the WSGI application", exc_info=exc_info)


class _RequestHandler(simple_server.WSGIRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection, or a client that stops sending mid-request,
    # frees its thread after this long.
    timeout = 30.0
    # Buffered, so that the status line, headers and body leave in one send.
    wbufsize = 1 << 16

    def handle(self) -> None:
        self.close_connection = True
        self._handle_one()
        while not self.close_connection:
            self._handle_one()

    def _handle_one(self) -> None:
        # As WSGIRequestHandler.handle, plus keep-alive and the connection in the environ.
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (socket.timeout, ConnectionError):
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        connection = _Connection(self.connection, keep_alive=not self.close_connection)
        environ = self.get_environ()
        environ[_CONNECTION_KEY] = connection
        http_version = "1.1" if self.request_version == "HTTP/1.1" else "1.0"
        handler = _ServerHandler(
            connection,
            http_version,
            self.rfile,
            self.wfile,
            self.get_stderr(),
            environ,
            multithread=True,
        )
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref logs through it
        app = self.server.get_app()  # type: ignore[attr-defined]
        handler.run(app)
        if not (connection.answered and connection.keep_alive):
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        answer = super().handle_expect_100()
        self.wfile.flush()  # buffered: "100 Continue" must leave now
        return answer

    def log_message(self, format: str, *args: Any) -> None:
        level: int = getattr(self.server, "access_log_level", logging.INFO)
        logger.log(level, "%s %s", self.address_string(), format % args)


class ThreadingWSGIServer(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    """wsgiref's server with a thread per connection, and a bounded, prompt close."""

    daemon_threads = True
    block_on_close = False  # close_connections() waits instead, with a bound
    request_queue_size = 128

    def __init__(
        self, host: str, port: int, app: WSGIApplication, *, access_log_level: int = logging.INFO
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.access_log_level = access_log_level
        self._active: set[Any] = set()
        self._active_changed = threading.Condition()
        super().__init__((host, port), _RequestHandler)
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (getfqdn): slow, and unused.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_changed:
            self._active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            with self._active_changed:
                self._active.discard(request)
                self._active_changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and timeouts from clients land here; the app's own errors do not.
        logger.debug("connection from %s failed", client_address, exc_info=True)

    def close_connections(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Cut every open connection and wait, bounded, until their threads are done."""
        with self._active_changed:
            for sock in self._active:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return self._active_changed.wait_for(lambda: not self._active, timeout)


def make_server(
    host: str, port: int, app: WSGIApplication, *, access_log_level: int = logging.INFO
) -> ThreadingWSGIServer:
    """A bound threading WSGI server for ``app``; run it with ``serve_forever()``."""
    return ThreadingWSGIServer(host, port, app, access_log_level=access_log_level)


def drop_connection(environ: WSGIEnvironment) -> None:
    """End the connection ``environ``'s request came on, without an answer.

    The application should then return an empty body; under another WSGI
    server (no connection in ``environ``) this does nothing.
    """
    connection = environ.get(_CONNECTION_KEY)
    if isinstance(connection, _Connection):
        connection.drop()


# -- the production front ------------------------------------------------------------

_SMALL_BODY = 64 << 10
# Request deadlines fall at random between request_timeout and this much more.
_DEADLINE_SPREAD = 0.5


_DEFAULT_MAX_CONNECTIONS = 4096


def default_max_connections() -> int:
    """4,096, or fewer when the process may not open that many files (keeping 64 spare)."""
    try:
        import resource  # noqa: PLC0415 - not on every platform

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return _DEFAULT_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return _DEFAULT_MAX_CONNECTIONS
    return max(8, min(_DEFAULT_MAX_CONNECTIONS, soft - 64))


@dataclass(frozen=True)
class FrontLimits:
    """What the front lets one connection, one address and all clients together hold.

    - ``max_connections`` open at once (default: 4,096, fewer under a low file limit;
      an idle connection costs the front a few kilobytes);
      ``max_per_address`` from one client address.
    - ``request_timeout``: seconds to deliver a whole request (from connecting,
      or from the previous answer on a kept-alive connection), and to take an answer.
      A connection that overruns it is cut at a random moment within the next
      half of it, so that connections opened in one burst are not all cut
      (and re-opened) in one burst.
    - ``max_header_bytes`` for the request line and headers; ``max_body_bytes``
      per body as sent; ``max_buffered_bytes``: bodies over 64 KiB held at
      once, over all connections (beyond it: 503).
    - ``workers`` threads run the app for bodies up to 64 KiB, ``large_workers``
      for bigger ones.
    """

    max_connections: int = 0
    max_per_address: int = 64
    request_timeout: float = 10.0
    max_header_bytes: int = 64 << 10
    max_body_bytes: int = 1 << 20
    max_buffered_bytes: int = 16 << 20
    workers: int = 8
    large_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_connections == 0:
            object.__setattr__(self, "max_connections", default_max_connections())
        for name in ("max_connections", "max_per_address", "max_header_bytes",
                     "max_body_bytes", "workers", "large_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.request_timeout > 0 or self.max_buffered_bytes < 0:
            raise ValueError("request_timeout must be > 0 and max_buffered_bytes >= 0")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _FrontRequest:
    method: str
    target: str
    version: str
    headers: List[Tuple[str, str]]
    body: bytes
    keep_alive: bool


class _FrontConnection(asyncio.Protocol):
    """One client connection.

    Request heads are read here, in callbacks: a client slow to send its head
    costs a buffer and a timer, never a task, and each byte it drips costs
    one search of its buffer. Once a head has arrived, a task
    (``FrontServer._serve_request``) reads the body, has the app answer and
    writes the answer; then the next head is awaited the same way.
    """

    def __init__(self, front: FrontServer) -> None:
        self.front = front
        self.number = next(front._numbers)
        self.address = "unknown"
        self.transport: Optional[asyncio.Transport] = None
        self.evicted = False
        self.has_head = False
        """Whether its current request's head has arrived (the body is being read)."""
        self.closed = False
        self.serving = False
        """Whether a task is serving a request of this connection."""
        self._buffer = bytearray()
        self._scanned = 0
        self._eof = False
        self._need = 0
        self._waiter: Optional[asyncio.Future[None]] = None
        self._reading_paused = False
        self._writing_paused = False
        self._write_waiter: Optional[asyncio.Future[None]] = None
        self._timer: Optional[asyncio.TimerHandle] = None

    # -- asyncio's callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not self.front._admit(self):
            self.front.refused += 1
            self.refuse(503, "too many connections; try again later")
            return
        self.await_head()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._buffer += data
        if not self.serving:
            self._scan_head()
        elif self._waiter is not None and len(self._buffer) >= self._need:
            self._wake()
        if (
            not self._reading_paused
            and not self.closed
            and len(self._buffer) > self.front._read_high
            and self.transport is not None
        ):
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if not self.serving:
            self.close()  # nothing was asked that needs an answer
            return False
        self._wake()
        return True  # keep the connection open to write the answer

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self._eof = True
        self.cancel_deadline()
        self.front._forget(self)
        self._wake()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- heads, deadlines ----------------------------------------------------------------

    def await_head(self) -> None:
        """Wait, in callbacks, for the next request's head within the request deadline."""
        self.serving = False
        self.front._set_waiting(self, True)
        timeout = self.front.limits.request_timeout
        # Each deadline is stretched by a random part of _DEADLINE_SPREAD: connections
        # opened in one burst are then not all cut (and re-opened) in the same instant.
        spread = self.front._random.random() * _DEADLINE_SPREAD * timeout
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout + spread, self.front._expire, self)
        self._scan_head()

    def cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _scan_head(self) -> None:
        end = self._buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        limit = self.front.limits.max_header_bytes
        if end < 0 or end + 4 > limit:
            self._scanned = len(self._buffer)
            if end >= 0 or len(self._buffer) > limit:
                self.refuse(431, "request headers too large")
            else:
                self._resume_reading()
            return
        head = self._take(end + 4)
        self._scanned = 0
        try:
            request = _parse_head(head)
        except _BadRequest as exc:
            self.refuse(exc.status, exc.message)
            return
        self.serving = True
        asyncio.get_running_loop().create_task(self.front._serve_request(self, request))

    # -- reading the body (from the task) ------------------------------------------------

    async def read_exactly(self, size: int) -> bytes:
        await self._wait_for(size)
        return self._take(size)

    async def read_line(self) -> bytes:
        """Up to and including the next CRLF (at most ``max_header_bytes``)."""
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                return self._take(end + 2)
            if len(self._buffer) > self.front.limits.max_header_bytes:
                raise _BadRequest(400, "bad chunk")
            await self._wait_for(len(self._buffer) + 1)

    async def _wait_for(self, size: int) -> None:
        while len(self._buffer) < size:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buffer), size)
            self._need = size
            self._waiter = asyncio.get_running_loop().create_future()
            self._resume_reading()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        if len(self._buffer) <= self.front._read_high:
            self._resume_reading()
        return data

    def _resume_reading(self) -> None:
        if self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- writing, closing ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait until what was written is mostly sent (TimeoutError after ``timeout``)."""
        if self._writing_paused and not self.closed:
            self._write_waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._write_waiter, timeout)
            finally:
                self._write_waiter = None

    def _wake_writer(self) -> None:
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def refuse(self, status: int, message: str) -> None:
        """Answer ``{"error": message}`` and close (cut after a second if it is not taken)."""
        self.cancel_deadline()
        body = json.dumps({"error": message}).encode()
        head = (
            f"HTTP/1.1 {status_line(status)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self.write(head.encode("latin-1") + body)
        self.close_soon()

    def close_soon(self) -> None:
        """Close once what was written has left; cut it after a second."""
        self.close()
        if self.transport is not None and not self.closed:
            asyncio.get_running_loop().call_later(1.0, self._cut)

    def _cut(self) -> None:
        self.close(abort=True)

    def close(self, *, abort: bool = False) -> None:
        transport = self.transport
        if transport is None or (transport.is_closing() and not abort):
            return
        with contextlib.suppress(Exception):
            if abort:
                transport.abort()
            else:
                transport.close()


class FrontServer:
    """Serve a WSGI app with bounded connections, threads, memory and time per request.

    ``serve_forever()`` runs it in the calling thread until ``shutdown()``;
    ``start()`` runs it on a daemon thread (for tests), ``close()`` stops it.
    The socket is bound when the object is created, so ``url`` is known at once.
    """

    def __init__(
        self,
        app: WSGIApplication,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: Optional[FrontLimits] = None,
        reuse_port: bool = False,
        access_log_level: int = logging.INFO,
    ) -> None:
        self.app = app
        self.limits = limits or FrontLimits()
        self.access_log_level = access_log_level
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server(
            (host, port), family=family, backlog=socket.SOMAXCONN, reuse_port=reuse_port
        )
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._connections: Dict[int, _FrontConnection] = {}
        self._per_address: Dict[str, int] = {}
        # Connections waiting for a request, longest-waiting first: overall and per address.
        self._waiting: OrderedDict[int, _FrontConnection] = OrderedDict()
        self._waiting_by_address: Dict[str, OrderedDict[int, _FrontConnection]] = {}
        self._numbers = itertools.count()
        self._random = random.Random()
        self._buffered = 0
        # Bytes a connection may hold unread before the front stops reading from it.
        self._read_high = self.limits.max_header_bytes + self.limits.max_body_bytes
        self._small_pool = concurrent.futures.ThreadPoolExecutor(
            self.limits.workers, thread_name_prefix="server_stub-app"
        )
        self._large_pool = concurrent.futures.ThreadPoolExecutor(
            self.limits.large_workers, thread_name_prefix="server_stub-app-large"
        )
        self.refused = 0
        """Connections refused or closed early because a cap was reached."""

    def __repr__(self) -> str:
        return f"<FrontServer {self.url}>"

    @property
    def url(self) -> str:
        host = self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # -- running ---------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (or KeyboardInterrupt), then close every connection."""
        try:
            asyncio.run(self._serve())
        finally:
            self._small_pool.shutdown(wait=False, cancel_futures=True)
            self._large_pool.shutdown(wait=False, cancel_futures=True)
            self._socket.close()

    def start(self) -> FrontServer:
        """Serve on a daemon thread; returns once it accepts connections."""
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"server_stub {self.url}", daemon=True
        )
        self._thread.start()
        self._ready.wait(CLOSE_TIMEOUT)
        return self

    def shutdown(self) -> None:
        """Ask ``serve_forever()`` to return (from any thread)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stopping.set)

    def close(self) -> None:
        """Stop serving and wait, bounded, for the serving thread to end."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT)
        else:
            self._socket.close()

    def __enter__(self) -> FrontServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await self._loop.create_server(
            lambda: _FrontConnection(self), sock=self._socket, backlog=64
        )
        # asyncio accepts up to `backlog` connections per turn of the loop: few, so that
        # a burst of connections does not keep everything else waiting. The kernel's
        # queue of connections not yet accepted stays long.
        self._socket.listen(socket.SOMAXCONN)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for connection in list(self._connections.values()):
                connection.close(abort=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    # -- one connection --------------------------------------------------------------

    def _admit(self, connection: _FrontConnection) -> bool:
        """Track ``connection``, first closing the longest-waiting reader when a cap is hit."""
        limits = self.limits
        crowded = self._per_address.get(connection.address, 0) >= limits.max_per_address
        if crowded and not self._evict(connection.address):
            return False
        full = len(self._connections) >= limits.max_connections
        if full and not self._evict(None):
            return False
        self._connections[connection.number] = connection
        self._per_address[connection.address] = self._per_address.get(connection.address, 0) + 1
        return True

    def _evict(self, address: Optional[str]) -> bool:
        """Close the connection (of ``address``, or any) waiting longest for its request."""
        waiting = self._waiting if address is None else self._waiting_by_address.get(address)
        if not waiting:
            return False
        oldest = next(iter(waiting.values()))
        oldest.evicted = True
        self.refused += 1
        self._forget(oldest)
        oldest.close(abort=True)
        return True

    def _set_waiting(self, connection: _FrontConnection, waiting: bool) -> None:
        """Mark ``connection`` as waiting for a request (newest last), or as being answered."""
        by_address = self._waiting_by_address.setdefault(connection.address, OrderedDict())
        self._waiting.pop(connection.number, None)
        by_address.pop(connection.number, None)
        if waiting:
            self._waiting[connection.number] = connection
            by_address[connection.number] = connection
        elif not by_address:
            del self._waiting_by_address[connection.address]

    def _forget(self, connection: _FrontConnection) -> None:
        self._set_waiting(connection, False)
        if self._connections.pop(connection.number, None) is None:
            return
        left = self._per_address.get(connection.address, 1) - 1
        if left > 0:
            self._per_address[connection.address] = left
        else:
            self._per_address.pop(connection.address, None)

    async def _serve_request(self, connection: _FrontConnection, request: _FrontRequest) -> None:
        """Read the body of ``request`` (its head has arrived), answer it, and then await
        the connection's next head (keep-alive) or close it."""
        try:
            keep_alive = await self._answer(connection, request)
        except _BadRequest as exc:
            connection.refuse(exc.status, exc.message)
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            connection.close()  # _expire answered 408, or the client went away
            return
        except asyncio.TimeoutError:
            connection.close(abort=True)  # the answer was not taken in time
            return
        except Exception:
            logger.exception("connection from %s failed", connection.address)
            connection.close(abort=True)
            return
        if keep_alive and not connection.closed:
            connection.await_head()
        else:
            connection.close()

    async def _answer(self, connection: _FrontConnection, request: _FrontRequest) -> bool:
        """Read the body, run the app, write the answer; whether to keep the connection."""
        reserved = 0
        try:
            length = self._body_length(request)
            large = length > _SMALL_BODY
            if large:
                if self._buffered + length > self.limits.max_buffered_bytes:
                    raise _BadRequest(503, "server busy; try again later")
                reserved = length
                self._buffered += reserved
            if length and _expects_continue(request):
                connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            connection.has_head = True
            try:
                request.body = await self._read_body(connection, request, length)
            finally:
                connection.cancel_deadline()
                connection.has_head = False
            self._set_waiting(connection, False)
            pool = self._large_pool if large else self._small_pool
            status, headers, body = await asyncio.get_running_loop().run_in_executor(
                pool, self._call_app, self._environ(request, connection)
            )
        finally:
            self._buffered -= reserved
        keep_alive = request.keep_alive and not connection.evicted
        logger.log(
            self.access_log_level,
            '%s "%s %s %s" %s %d',
            connection.address,
            request.method,
            request.target,
            request.version,
            status.split(" ", 1)[0],
            len(body),
        )
        await self._respond(
            connection, request, status=status, headers=headers, body=body, keep_alive=keep_alive
        )
        return keep_alive

    def _expire(self, connection: _FrontConnection) -> None:
        """The request deadline passed: 408 once its head arrived, else close quietly."""
        if connection.has_head:
            body = b'{"error":"request not received in time"}'
            connection.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            connection.close_soon()
        else:
            connection.close(abort=True)

    def _body_length(self, request: _FrontRequest) -> int:
        """The Content-Length to read (0 for chunked bodies, read by ``_read_body``)."""
        values = [value for name, value in request.headers if name.lower() == "content-length"]
        chunked = any(
            name.lower() == "transfer-encoding" and "chunked" in value.lower()
            for name, value in request.headers
        )
        if chunked:
            if values:
                raise _BadRequest(400, "both Content-Length and Transfer-Encoding")
            return self.limits.max_body_bytes  # an upper bound, for the buffer budget
        if not values:
            return 0
        if len(set(values)) != 1 or not (values[0].isascii() and values[0].isdigit()):
            raise _BadRequest(400, "invalid Content-Length")
        length = int(values[0][:20])
        if length > self.limits.max_body_bytes:
            raise _BadRequest(413, f"body over {self.limits.max_body_bytes} bytes")
        return length

    async def _read_body(
        self, connection: _FrontConnection, request: _FrontRequest, length: int
    ) -> bytes:
        chunked = any(
            name.lower() == "transfer-encoding" and "chunked" in value.lower()
            for name, value in request.headers
        )
        if not chunked:
            return await connection.read_exactly(length) if length else b""
        pieces: List[bytes] = []
        total = 0
        while True:
            size_line = await connection.read_line()
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size < 0 or total + size > self.limits.max_body_bytes:
                raise _BadRequest(413, f"body over {self.limits.max_body_bytes} bytes")
            if size == 0:
                while (await connection.read_line()) != b"\r\n":
                    pass  # trailers, ignored
                break
            pieces.append(await connection.read_exactly(size))
            total += size
            if await connection.read_exactly(2) != b"\r\n":
                raise _BadRequest(400, "bad chunk")
        request.headers = [
            (name, value) for name, value in request.headers if name.lower() != "transfer-encoding"
        ]
        request.headers.append(("Content-Length", str(total)))
        return b"".join(pieces)

    def _environ(self, request: _FrontRequest, connection: _FrontConnection) -> WSGIEnvironment:
        path, _, query = request.target.partition("?")
        environ: Dict[str, Any] = {
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": request.version,
            "REMOTE_ADDR": connection.address,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(request.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            key = name.upper().replace("-", "_")
            if "_" in name:
                continue  # would be confused with a dashed name (header spoofing)
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = value
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        environ.setdefault("CONTENT_LENGTH", str(len(request.body)) if request.body else "")
        return environ

    def _call_app(self, environ: WSGIEnvironment) -> Tuple[str, List[Tuple[str, str]], bytes]:
        """Run the app in a pool thread; its whole answer, or a 500."""
        answer: List[Any] = []

        def start_response(
            status: str, headers: List[Tuple[str, str]], exc_info: Optional[OptExcInfo] = None
        ) -> Callable[[bytes], object]:
            answer[:] = [status, headers]
            return pieces.append

        pieces: List[bytes] = []
        try:
            result = self.app(environ, start_response)
            try:
                pieces.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            logger.exception("unhandled error in the WSGI application")
            return status_line(500), [("Content-Type", "application/json")], (
                b'{"error":"internal server error"}'
            )
        if not answer:
            return status_line(500), [], b""
        return answer[0], answer[1], b"".join(pieces)

    async def _respond(
        self,
        connection: _FrontConnection,
        request: _FrontRequest,
        *,
        status: str,
        headers: List[Tuple[str, str]],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        lines = [f"HTTP/1.1 {status}"]
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        if request.method == "HEAD":
            body = b""
        lines.append(f"Content-Length: {len(body)}")
        if not keep_alive:
            lines.append("Connection: close")
        connection.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await connection.drain(self.limits.request_timeout)


def _parse_head(head: bytes) -> _FrontRequest:
    """The request line and headers of ``head`` (which ends with CRLF CRLF)."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # stray line breaks between kept-alive requests
    if not lines:
        raise _BadRequest(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "bad request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(505, "HTTP version not supported")
    headers: List[Tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise _BadRequest(400, "malformed header")
        headers.append((name, value.strip()))
    connection_tokens = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection_tokens
    else:
        keep_alive = "keep-alive" in connection_tokens
    return _FrontRequest(method, target, version, headers, b"", keep_alive)


def _expects_continue(request: _FrontRequest) -> bool:
    return request.version == "HTTP/1.1" and any(
        name.lower() == "expect" and value.lower() == "100-continue"
        for name, value in request.headers
    )
