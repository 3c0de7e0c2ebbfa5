"""A child process for the biggest payloads, so that parsing them never stalls the server.

Parsing and re-encoding a payload of a million JSON values are single C calls
that hold Python's GIL for a large fraction of a second: in the serving process
they would stop the HTTP front and every other request for that long. The
command-line server hands such payloads (already admitted, and measured once
decompressed) to this process as they were sent, compressed: it decompresses,
counts, validates and stores them with an ``App`` of its own on the same
database, one at a time, and sends back the answer. So the serving process
never holds their decompressed bytes, let alone their parsed values.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from ._app import HTTPError, Response, _error, check_value_count, create_app, request_body
from ._limits import Limits, count_values

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = ["HEAVY_VALUES", "HeavyLane"]

logger = logging.getLogger("server_stub")

HEAVY_VALUES = 100_000
"""Payloads with more JSON values than this go to the child process."""
_ANSWER_TIMEOUT = 60.0
# The child's CPU priority relative to the serving process (Unix nice levels).
_NICENESS = 10
# Short: callers hold a thread of the front while they wait.
_BUSY_WAIT = 0.1

_Request = Tuple[bytes, str, str, str]
_Answer = Tuple[int, Any, List[Tuple[str, str]]]


def _serve(connection: Connection, db: str, policy_file: Optional[str], limits: Limits) -> None:
    """The child: answer each (body, content encoding, instance id, address) until
    the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    with contextlib.suppress(AttributeError, OSError):  # not on every platform
        # Below the serving process: where they share a CPU, small requests go first.
        os.nice(_NICENESS)
    app = create_app(db=db, policy_file=policy_file, limits=limits)
    try:
        while True:
            try:
                body, encoding, instance_id, address = connection.recv()
            except (EOFError, OSError):
                return
            environ = {
                "wsgi.input": io.BytesIO(body),
                "CONTENT_LENGTH": str(len(body)),
                "HTTP_CONTENT_ENCODING": encoding,
            }
            try:
                request = request_body(environ, limits)
                check_value_count(count_values(request.decode(), limits.max_values), limits)
                response = app.store_payload(request, instance_id, address)
            except HTTPError as exc:
                response = _error(exc.status, exc.message, exc.headers)
            except Exception:
                logger.exception("internal error storing a large payload")
                response = _error(500, "internal server error")
            connection.send((response.status, response.body, response.headers))
    finally:
        app.store.close()


class HeavyLane:
    """The child process and the pipe to it; ``handle()`` is safe to call from many threads
    (one payload at a time; a caller that waits over a second is told to retry)."""

    def __init__(self, db: str, policy_file: Optional[str], limits: Limits) -> None:
        self._args = (db, policy_file, limits)
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")
        self._connection: Optional[Connection] = None
        self._process: Optional[Any] = None
        self._closed = False

    def _start(self) -> Connection:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve, args=(child, *self._args), name="server_stub-heavy", daemon=True
        )
        self._process.start()
        child.close()
        self._connection = parent
        return parent

    def busy(self) -> bool:
        """Whether a payload is being processed (another would wait, then get 503)."""
        return self._lock.locked()

    def handle(self, body: bytes, encoding: str, instance_id: str, address: str) -> Response:
        if not self._lock.acquire(timeout=_BUSY_WAIT):
            raise HTTPError(503, "busy with another large payload; retry", [("Retry-After", "1")])
        try:
            if self._closed:
                raise HTTPError(503, "shutting down")
            connection = self._connection or self._start()
            try:
                connection.send((body, encoding, instance_id, address))
                if not connection.poll(_ANSWER_TIMEOUT):
                    raise TimeoutError("no answer")
                status, body, headers = connection.recv()
            except (OSError, EOFError, TimeoutError) as exc:
                logger.error("the large-payload process failed (%s); starting a new one", exc)
                self._stop_process()
                raise HTTPError(503, "could not process the payload; retry") from None
            return Response(status, body, headers)
        finally:
            self._lock.release()

    def _stop_process(self) -> None:
        connection, process = self._connection, self._process
        self._connection = self._process = None
        if connection is not None:
            connection.close()
        if process is not None:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)

    def close(self) -> None:
        """Stop the child process (waits for the payload in progress, bounded)."""
        self._closed = True
        with contextlib.ExitStack() as stack:
            if self._lock.acquire(timeout=_ANSWER_TIMEOUT):
                stack.callback(self._lock.release)
            self._stop_process()
