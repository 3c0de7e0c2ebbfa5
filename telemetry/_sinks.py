"""Where payloads go: the ``Sink`` protocol, the HTTP sink, a log sink and a no-op sink.

A sink is a callable ``send(request, timeout) -> SendResult``; the emitter
knows nothing else about it. ``requests`` is imported only when the HTTP sink
first sends, so applications that never emit never import it.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Protocol, Union

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
    """429: keep the payload, wait ``retry_after``."""
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
        return SendResult(Outcome.RETRY, detail=detail)
    if 300 <= status < 400:
        # Never follow: the data must not go to another host.
        return SendResult(Outcome.RETRY, detail=f"{detail} redirect not followed")
    if 400 <= status < 500:
        return SendResult(Outcome.REJECTED, detail=detail)
    return SendResult(Outcome.RETRY, detail=detail)


class HTTPSink:
    """POSTs payloads with a ``requests.Session``: proxies and CA bundles as requests does.

    ``verify`` and ``proxies`` override the environment (``REQUESTS_CA_BUNDLE``,
    ``HTTPS_PROXY`` ...), which requests honours by default.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        verify: Union[bool, str, None] = None,
        proxies: Optional[Dict[str, str]] = None,
        wall_clock: Any = time.time,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._verify = verify
        self._proxies = proxies
        self._wall_clock = wall_clock
        self._session: Optional[requests.Session] = None

    def _get_session(self) -> requests.Session:
        if self._session is None:
            import requests  # noqa: PLC0415 - imported on first send only

            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            if self._verify is not None:
                session.verify = self._verify
            if self._proxies is not None:
                session.proxies.update(self._proxies)
            self._session = session
        return self._session

    def __call__(self, request: Request, timeout: float) -> SendResult:
        import requests  # noqa: PLC0415 - already loaded by _get_session

        session = self._get_session()
        headers = {"Content-Type": "application/json"}
        if request.gzipped:
            headers["Content-Encoding"] = "gzip"
        url = f"{self.endpoint}/v1/update/{request.payload.instance_id}"
        try:
            answer = session.post(
                url,
                data=request.body,
                headers=headers,
                timeout=max(timeout, 0.001),
                allow_redirects=False,
            )
            body = answer.content
        except requests.RequestException as exc:
            return SendResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}")
        return result_for_status(answer.status_code, body, answer.headers, self._wall_clock())

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def _format_field(value: object) -> str:
    import json  # noqa: PLC0415

    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
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
