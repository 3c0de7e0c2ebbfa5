"""The HTTP runtime: the standard library's threading WSGI server, made fit to serve.

``make_server`` is what ``python -m server_stub`` runs, and what the test
harness runs on a background thread. Over ``wsgiref`` it adds HTTP/1.1
keep-alive, a thread per connection with an idle timeout, a bounded and prompt
close of open connections, and ``drop_connection()`` for an application that
must end a connection without answering.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Any, Dict
from wsgiref import simple_server

from ._app import body_fully_read

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

__all__ = ["CLOSE_TIMEOUT", "ThreadingWSGIServer", "drop_connection", "make_server"]

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
