"""The test harness: ``serve()`` runs the app on a background thread, scriptable.

It runs the same HTTP runtime as ``python -m server_stub`` (``_http``) and
wraps the app so that a test can see every request, queue scripted answers (a
status, a delay, a dropped connection) and wait for requests without sleeping.
Nothing in production imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple
from wsgiref.util import is_hop_by_hop

from ._app import App, HTTPError, Response, request_body
from ._backends import open_store
from ._http import CLOSE_TIMEOUT, drop_connection, make_server
from ._limits import Limits
from ._policy import Policy

if TYPE_CHECKING:
    from types import TracebackType

    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["RecordedRequest", "ScriptedResponse", "Server", "serve"]

logger = logging.getLogger("server_stub")

_UPDATE_PREFIX = "/v1/update/"


@dataclass(frozen=True)
class ScriptedResponse:
    """How to answer one ``POST /v1/update`` request; see ``Server.script``."""

    status: Optional[int] = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hold: Optional[threading.Event] = None
    drop: bool = False
    drop_after_store: bool = False
    store: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: str
    headers: Dict[str, str]
    """HTTP headers, names in canonical ``Title-Case`` (``"Content-Encoding"``)."""
    body: bytes
    """The body as sent (b"" when it was not read, e.g. refused by Content-Length)."""
    decoded_body: Optional[bytes]
    """The body after Content-Encoding, or None when it could not be decoded."""
    json: Any
    """The body parsed as JSON, or None."""
    status: Optional[int]
    """The status answered, or None when the connection was dropped."""
    scripted: bool

    @property
    def dropped(self) -> bool:
        return self.status is None


def _headers_of(environ: WSGIEnvironment) -> Dict[str, str]:
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            name = key
        else:
            continue
        headers["-".join(part.capitalize() for part in name.split("_"))] = str(value)
    return headers


def _merge_headers(
    headers: List[Tuple[str, str]], overrides: Mapping[str, str]
) -> List[Tuple[str, str]]:
    replaced = {name.lower() for name in overrides}
    kept = [(name, value) for name, value in headers if name.lower() not in replaced]
    return kept + list(overrides.items())


class Server:
    """The server on a background thread, for tests (``serve()`` starts one).

    - ``url``: the endpoint base; clients post to ``{url}/v1/update/{instance_id}``.
    - ``payloads``: every ``/v1/update`` body that parsed as a JSON object, in
      arrival order, whatever the answer (duplicates, rejected and scripted
      ones included). What was stored, deduplicated: ``stored_payloads()``,
      ``stats()``, or ``GET /v1/stats``.
    - ``requests``: a ``RecordedRequest`` for every request, in arrival order,
      recorded before the answer is sent.
    - ``policy``: the live ``Policy`` (``server.policy.update(stop=True)``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        db: str = ":memory:",
        policy: Optional[Policy] = None,
        limits: Optional[Limits] = None,
    ) -> None:
        self.store = open_store(db)
        if limits is None:
            limits = Limits(per_address=0, total=0)
        self.app = App(self.store, policy if policy is not None else Policy(), limits=limits)
        self._closing = threading.Event()
        self._closed = False
        # Reentrant, so that predicates given to wait_for() may use the properties.
        self._changed = threading.Condition(threading.RLock())
        self._scripts: Deque[ScriptedResponse] = deque()
        self._requests: List[RecordedRequest] = []
        self._payloads: List[Dict[str, Any]] = []
        self._holds: List[threading.Event] = []
        try:
            self._httpd = make_server(host, port, self._handle, access_log_level=logging.DEBUG)
        except BaseException:
            self.store.close()
            raise
        self.url = self._httpd.url
        self.host = host
        self.port = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},  # bounds how long close() waits for the loop
            name=f"server_stub {self.url}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Server {self.url}>"

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    @property
    def policy(self) -> Policy:
        return self.app.policy

    @property
    def payloads(self) -> List[Dict[str, Any]]:
        with self._changed:
            return list(self._payloads)

    @property
    def requests(self) -> List[RecordedRequest]:
        with self._changed:
            return list(self._requests)

    @property
    def scripts_pending(self) -> int:
        """Scripted responses not yet used."""
        with self._changed:
            return len(self._scripts)

    def stored_payloads(self) -> List[Dict[str, Any]]:
        """What the store holds, deduplicated, in arrival order (each with ``instance_id``)."""
        return self.store.all_payloads()

    def stats(self) -> Dict[str, Any]:
        """The same totals as ``GET /v1/stats``."""
        return self.store.stats()

    def script(
        self,
        status: Optional[int] = None,
        body: Any = None,
        *,
        headers: Optional[Mapping[str, str]] = None,
        delay: float = 0.0,
        hold: Optional[threading.Event] = None,
        drop: bool = False,
        drop_after_store: bool = False,
        store: bool = False,
        times: int = 1,
    ) -> None:
        """Queue how to answer the next ``times`` ``POST /v1/update/...`` requests (FIFO).

        - ``delay``: seconds to wait first (cut short, and the connection
          dropped, by ``close()``).
        - ``hold``: an event to wait for first, once the request has arrived
          (set by the test when it wants the answer; ``close()`` cuts it short
          and drops the connection, as for ``delay``).
        - ``drop``: read the request, then close the connection without
          answering; nothing is stored.
        - ``drop_after_store``: process (and store) the payload normally, then
          close the connection without answering.
        - ``status``: answer with it, ``body`` and ``headers``; the payload is
          not processed (not stored) unless ``store=True``. ``body``: bytes as
          they are, None for an empty body, anything else as JSON.
        - ``status=None``: normal processing; a ``body`` or ``headers`` given
          replace those of the normal answer.

        A non-empty body goes out as ``application/json`` unless ``headers``
        say otherwise; hop-by-hop headers (``Connection`` …) are the server's.
        """
        if drop and drop_after_store:
            raise ValueError("drop and drop_after_store exclude each other")
        hop_by_hop = [name for name in headers or {} if is_hop_by_hop(name)]
        if hop_by_hop:
            raise ValueError(f"hop-by-hop headers cannot be scripted: {hop_by_hop}")
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"bad HTTP status {status}")
        if delay < 0 or times < 1:
            raise ValueError("delay must be >= 0 and times >= 1")
        if body is not None and not isinstance(body, bytes):
            json.dumps(body)  # a TypeError belongs here, not in the server thread
        entry = ScriptedResponse(
            status=status,
            body=body,
            headers=dict(headers or {}),
            delay=delay,
            hold=hold,
            drop=drop,
            drop_after_store=drop_after_store,
            store=store,
        )
        with self._changed:
            self._scripts.extend([entry] * times)

    def wait_for_requests(
        self, n: int, timeout: float = 10.0, *, path_prefix: str = _UPDATE_PREFIX
    ) -> bool:
        """Wait until ``n`` requests whose path starts with ``path_prefix`` were recorded.

        Counts ``/v1/update/...`` requests by default; ``path_prefix=""`` counts all.
        Returns False at ``timeout``.
        """

        def enough() -> bool:
            count = sum(1 for request in self._requests if request.path.startswith(path_prefix))
            return count >= n

        with self._changed:
            return self._changed.wait_for(enough, timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true, re-checked whenever a request arrives or
        is recorded (e.g. ``server.wait_for(lambda: len(server.payloads) >= 3)``).

        Returns False at ``timeout``.
        """
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def close(self) -> None:
        """Stop serving, cut open connections (and scripted delays), close the store.

        Returns promptly whatever requests are in progress; safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        with self._changed:
            for hold in self._holds:
                hold.set()
        self._httpd.shutdown()
        if not self._httpd.close_connections():
            logger.warning("%r: request threads still running after close", self)
        self._httpd.server_close()
        self._thread.join(CLOSE_TIMEOUT)
        self.store.close()

    # -- the WSGI wrapper ---------------------------------------------------------------

    def _handle(self, environ: WSGIEnvironment, start_response: StartResponse) -> List[bytes]:
        entry: Optional[ScriptedResponse] = None
        if environ.get("REQUEST_METHOD") == "POST" and environ.get("PATH_INFO", "").startswith(
            _UPDATE_PREFIX
        ):
            # The body is read before a script is taken, so that "the script was
            # taken" (``scripts_pending``) means the whole request has arrived: a
            # test may then kill the client without truncating what it sent.
            with contextlib.suppress(HTTPError):
                request_body(environ).read()
            with self._changed:
                if self._scripts:
                    entry = self._scripts.popleft()
                    self._changed.notify_all()
        if entry is None:
            status, headers, body = self._call_app(environ)
            self._record(environ, status, scripted=False)
            start_response(status, headers)
            return [body]

        closing = entry.delay > 0 and self._closing.wait(entry.delay)
        if entry.hold is not None and not closing:
            with self._changed:
                self._holds.append(entry.hold)
            if self._closing.is_set():  # close() may have set the holds it knew of already
                entry.hold.set()
            entry.hold.wait()
            closing = self._closing.is_set()
        if entry.drop or closing:
            self._read_body(environ)
            return self._drop(environ)
        if entry.status is None or entry.store or entry.drop_after_store:
            status, headers, body = self._call_app(environ)
        else:
            self._read_body(environ)
            status, headers, body = "200 OK", [], b""
        if entry.drop_after_store:
            return self._drop(environ)

        if entry.status is not None:
            response = Response(entry.status, b"" if entry.body is None else entry.body)
        else:
            response = Response(int(status.split()[0]), body, headers)
            if entry.body is not None:
                response.body = entry.body
        response.headers = _merge_headers(response.headers, entry.headers)
        status, headers, body = response.encode()
        self._record(environ, status, scripted=True)
        start_response(status, headers)
        return [body]

    def _call_app(self, environ: WSGIEnvironment) -> Tuple[str, List[Tuple[str, str]], bytes]:
        answer: List[Any] = []

        def capture(
            status: str, headers: List[Tuple[str, str]], exc_info: Optional[OptExcInfo] = None
        ) -> Callable[[bytes], object]:
            answer[:] = [status, headers]
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        return answer[0], answer[1], body

    @staticmethod
    def _read_body(environ: WSGIEnvironment) -> None:
        body = request_body(environ)
        with contextlib.suppress(HTTPError):  # what could be read is recorded as it is
            body.parse()
        body.drain()

    def _drop(self, environ: WSGIEnvironment) -> List[bytes]:
        self._record(environ, None, scripted=True)
        drop_connection(environ)
        return []

    def _record(self, environ: WSGIEnvironment, status: Optional[str], *, scripted: bool) -> None:
        body = request_body(environ)
        parsed = body.parsed if body.has_parsed else None
        request = RecordedRequest(
            method=environ.get("REQUEST_METHOD", ""),
            path=environ.get("PATH_INFO", ""),
            query=environ.get("QUERY_STRING", ""),
            headers=_headers_of(environ),
            body=body.raw or b"",
            decoded_body=body.decoded,
            json=parsed,
            status=int(status.split()[0]) if status is not None else None,
            scripted=scripted,
        )
        with self._changed:
            self._requests.append(request)
            if (
                request.method == "POST"
                and request.path.startswith(_UPDATE_PREFIX)
                and isinstance(parsed, dict)
            ):
                self._payloads.append(parsed)
            self._changed.notify_all()


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    db: str = ":memory:",
    policy: Optional[Policy] = None,
    limits: Optional[Limits] = None,
) -> Server:
    """Start the server on a background thread (``port=0``: any free port).

    ``db``: a SQLite file, ``":memory:"``, or a ``postgresql://`` URL.
    ``limits``: what requests may cost; by default ``Limits()`` without the
    per-address and total admission limits (tests post fast from one address).
    """
    return Server(host, port, db=db, policy=policy, limits=limits)
