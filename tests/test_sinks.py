"""Sinks: the status policy as a table, the log and no-op sinks, and the HTTP sink
against servers that misbehave: slow drips, huge or endless answers, proxies, CA bundles.

``result_for_status`` is pure, so every row of the protocol's status table
(``docs/protocol.md``, "Statuses") is checked here without a server. A server
that drips bytes is a tiny raw socket server here, on 127.0.0.1, that stops as
soon as the test ends (``server_stub`` answers whole responses).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from conftest import emitter_of, state_of

from server_stub import Server
from telemetry import Client
from telemetry._buffer import member_value
from telemetry._sinks import (
    MAX_ANSWER_BYTES,
    AddressInfo,
    HTTPSink,
    LogSink,
    NoOpSink,
    Outcome,
    SendResult,
    result_for_status,
)
from telemetry._wire import CountingSet, JSONValue, Payload, Request, Response, encode_request

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
NS = 1_000_000_000

D, R, L, X = Outcome.DELIVERED, Outcome.RETRY, Outcome.RATE_LIMITED, Outcome.REJECTED


@pytest.mark.parametrize(
    ("status", "body", "headers", "outcome", "response", "retry_after"),
    [
        (200, b'{"next_update": 5}', {}, D, Response(next_update=5), None),
        (200, b"", {}, D, Response(), None),
        (204, b"", {}, D, Response(), None),
        (202, b'{"stop": true}', {}, D, Response(stop=True), None),
        (200, b"not json", {}, R, Response(), None),
        (200, b"[1, 2]", {}, R, Response(), None),
        (410, b"", {}, D, Response(stop=True), None),
        (451, b"{}", {}, D, Response(stop=True), None),
        (429, b"", {"Retry-After": "30"}, L, Response(), 30.0),
        (429, b"", {"Retry-After": "Fri, 15 Jan 2027 08:00:10 GMT"}, L, Response(), 10.0),
        (429, b"", {"Retry-After": "Thu, 01 Jan 2026 08:00:00 GMT"}, L, Response(), 0.0),
        (429, b'{"next_update": 7000000000}', {}, L, Response(), 7.0),
        (429, b'{"next_update": ' + str(10**400).encode() + b"}", {}, L, Response(),
         (2**63 - 1) / 1e9),
        (429, b"", {"Retry-After": "soon"}, L, Response(), None),
        (429, b"", {}, L, Response(), None),
        (408, b"", {}, R, Response(), None),
        (500, b"", {}, R, Response(), None),
        (503, b"", {"Retry-After": "5"}, L, Response(), 5.0),
        (503, b"", {"Retry-After": "0"}, L, Response(), 0.0),  # the emitter floors it
        (500, b"", {"Retry-After": "Thu, 01 Jan 2026 08:00:00 GMT"}, L, Response(), 0.0),
        (408, b"", {"Retry-After": "2"}, L, Response(), 2.0),
        (503, b"", {"Retry-After": "soon"}, R, Response(), None),
        (503, b'{"next_update": 7000000000}', {}, R, Response(), None),
        (301, b"", {"Location": "http://elsewhere/"}, R, Response(), None),
        (307, b"", {}, R, Response(), None),
        (400, b'{"error": "bad"}', {}, X, Response(), None),
        (413, b"", {}, X, Response(), None),
        (415, b"", {}, X, Response(), None),
        (422, b"", {}, X, Response(), None),
        (404, b"", {}, X, Response(), None),
        (100, b"", {}, R, Response(), None),
        (600, b"", {}, R, Response(), None),
    ],
)
def test_every_status_has_its_outcome(
    status: int, body: bytes, headers: Dict[str, str], outcome: Outcome,
    response: Response, retry_after: Optional[float],
) -> None:
    result = result_for_status(status, body, headers, NOW)
    assert result.outcome is outcome
    assert result.response == response
    assert result.retry_after == (None if retry_after is None else pytest.approx(retry_after))
    if outcome is not D:
        assert str(status) in result.detail


def test_a_redirect_says_it_was_not_followed() -> None:
    assert "redirect not followed" in result_for_status(302, b"", {}, NOW).detail


def payload(**data: JSONValue) -> Payload:
    return Payload(instance_id="3f0c2f5e-8a7b-4c1d-9e2f-0123456789ab",
                   timestamp=datetime(2026, 11, 23, tzinfo=timezone.utc), data=data)


def test_the_log_sink_writes_one_line_per_payload(caplog: pytest.LogCaptureFixture) -> None:
    sent = payload(hits=1, name="two words", empty="", agents=[{"value": "a", "count": 2}])
    with caplog.at_level(logging.INFO, logger="telemetry"):
        result = LogSink()(encode_request(sent)[0], 1.0)
    assert result.outcome is D
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (f"[telemetry] payload_id={sent.payload_id} dropped=0 hits=1 "
                    'name="two words" empty="" agents=[{"value":"a","count":2}]')


def test_the_log_sink_writes_a_counting_set_taken_from_the_buffer_as_its_list(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = Payload(instance_id="i", timestamp=datetime(2026, 11, 23, tzinfo=timezone.utc),
                   data={"agents": CountingSet({"curl": 2, "wget": 1}, member_value)})
    with caplog.at_level(logging.INFO, logger="telemetry"):
        result = LogSink()(encode_request(sent)[0], 1.0)
    assert result.outcome is D
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith(' agents=[{"value":"curl","count":2},{"value":"wget","count":1}]')


def test_the_no_op_sink_accepts_everything() -> None:
    assert NoOpSink()(encode_request(payload(x=1))[0], 0.0).outcome is D


# -- the HTTP sink against misbehaving servers ---------------------------------------


Answer = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """Accepts connections on 127.0.0.1, reads each request, then runs ``answer`` on it.

    ``answer(connection, stop)`` writes whatever it likes; ``stop`` is set when
    the test ends, so every dripping loop ends then at the latest.
    """

    def __init__(self, answer: Answer, tls: Optional[ssl.SSLContext] = None) -> None:
        self._answer = answer
        self._tls = tls
        self.stop = threading.Event()
        self.request_lines: List[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: List[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed by ``close``
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            if self._tls is not None:
                connection = self._tls.wrap_socket(connection, server_side=True)
            with connection:
                self.request_lines.append(_read_request(connection))
                self._answer(connection, self.stop)
        except OSError:
            connection.close()  # the client gave up on us: that is what the tests want

    def close(self) -> None:
        self.stop.set()
        with socket.socket() as poke, contextlib.suppress(OSError):  # wake ``accept``
            poke.connect(self._listener.getsockname())
        self._listener.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)


def _read_request(connection: socket.socket) -> bytes:
    """Read one request; returns its request line."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = connection.recv(65536)
        if not piece:
            raise ConnectionError("client went away")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        piece = connection.recv(65536)
        if not piece:
            raise ConnectionError("client went away")
        body += piece
    return head.split(b"\r\n", 1)[0]


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    servers: List[RawServer] = []

    def start(answer: Answer, tls: Optional[ssl.SSLContext] = None) -> RawServer:
        server = RawServer(answer, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def drip(data: bytes, interval: float = 0.05) -> Answer:
    """Send ``data`` one byte at a time, ``interval`` seconds apart (until the test ends)."""

    def answer(connection: socket.socket, stop: threading.Event) -> None:
        for index in range(len(data)):
            if stop.wait(interval):
                return
            connection.sendall(data[index : index + 1])

    return answer


def endless_chunks(connection: socket.socket, stop: threading.Event) -> None:
    """A 200 whose chunked body never ends (until the client hangs up or the test ends)."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    for _ in range(4096):  # 64 MiB at most
        if stop.is_set():
            return
        connection.sendall(chunk)


def send_request() -> Request:
    return encode_request(Payload(instance_id=str(uuid.uuid4()),
                                  timestamp=datetime.now(timezone.utc), data={"hits": 1}))[0]


def send_in_thread(sink: HTTPSink, timeout: float) -> Callable[[float], Optional[SendResult]]:
    """Start one send; the returned function waits (really) for its result, or None."""
    results: List[SendResult] = []
    thread = threading.Thread(target=lambda: results.append(sink(send_request(), timeout)),
                              daemon=True)
    thread.start()

    def result(wait: float) -> Optional[SendResult]:
        thread.join(wait)
        return results[0] if results else None

    return result


LONG_HEADERS = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 40) for n in range(200))
                + b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize("where", ["status line and headers", "body"])
def test_a_dripping_server_cannot_hold_an_attempt_past_its_deadline(
    raw_server: Callable[..., RawServer], where: str
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9000\r\n\r\n"

    def slow_body(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(head)
        drip(b" " * 9000)(connection, stop)

    # Each byte comes well within the per-read timeout.
    answer = slow_body if where == "body" else drip(LONG_HEADERS)
    server = raw_server(answer)
    sink = HTTPSink(server.url)
    # The drip would last minutes; the attempt ends at its 0.3 s deadline.
    result = send_in_thread(sink, 0.3)(30)
    assert result is not None, "the attempt outlived its deadline"
    assert result.outcome is R
    assert "within 0.3 s" in result.detail


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_an_endless_or_huge_answer_is_a_failed_attempt(
    raw_server: Callable[..., RawServer], framing: str
) -> None:
    def huge(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1073741824\r\n\r\n")
        block = b" " * 65536
        for _ in range(1024):  # 64 MiB of the promised GiB, unless the client hangs up first
            if stop.is_set():
                return
            connection.sendall(block)

    server = raw_server(endless_chunks if framing == "chunked" else huge)
    result = send_in_thread(HTTPSink(server.url), 10.0)(30)
    assert result is not None, "the sink kept reading"
    assert result.outcome is R
    assert f"larger than {MAX_ANSWER_BYTES} bytes" in result.detail


def test_an_answer_over_the_cap_is_not_delivered_one_under_it_is(
    telemetry_server: Server,
) -> None:
    sink = HTTPSink(telemetry_server.url)
    # Padding is allowed JSON whitespace: only the size differs.
    telemetry_server.script(status=200, body=b"{}" + b" " * MAX_ANSWER_BYTES)
    telemetry_server.script(status=200, body=b"{}" + b" " * (MAX_ANSWER_BYTES - 2))
    assert sink(send_request(), 5.0).outcome is R
    assert sink(send_request(), 5.0).outcome is D


def test_a_compressed_answer_is_held_to_the_same_cap(telemetry_server: Server) -> None:
    sink = HTTPSink(telemetry_server.url)
    bomb = gzip.compress(b"{}" + b" " * (10 * MAX_ANSWER_BYTES))  # ~1 KB on the wire
    small = gzip.compress(b'{"next_update": 5}')
    telemetry_server.script(status=200, body=bomb, headers={"Content-Encoding": "gzip"})
    telemetry_server.script(status=200, body=small, headers={"Content-Encoding": "gzip"})
    assert sink(send_request(), 5.0).outcome is R
    result = sink(send_request(), 5.0)
    assert result.outcome is D
    assert result.response.next_update == 5


def test_the_sink_asks_for_an_uncompressed_answer(telemetry_server: Server) -> None:
    assert HTTPSink(telemetry_server.url)(send_request(), 5.0).outcome is D
    assert telemetry_server.requests[-1].headers["Accept-Encoding"] == "identity"


def answer_ok(connection: socket.socket, stop: threading.Event) -> None:
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize("configured", ["environment", "argument"])
def test_proxies_are_honoured_and_held_to_the_deadline(
    raw_server: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch, configured: str
) -> None:
    proxy = raw_server(answer_ok)
    target = "http://telemetry.example.invalid"  # never resolved: the proxy is asked instead
    if configured == "environment":
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        sink = HTTPSink(target)
    else:
        sink = HTTPSink(target, proxies={"http": proxy.url})
    assert sink(send_request(), 5.0).outcome is D
    (line,) = proxy.request_lines
    assert line.startswith(b"POST " + target.encode() + b"/v1/update/")
    dripping = raw_server(drip(LONG_HEADERS))
    result = send_in_thread(HTTPSink(target, proxies={"http": dripping.url}), 0.3)(30)
    assert result is not None and result.outcome is R
    assert "within 0.3 s" in result.detail


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (and its key, same file) for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    both = directory / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return both


@pytest.mark.parametrize("configured", ["argument", "environment", "none"])
def test_ca_bundles_are_honoured(
    raw_server: Callable[..., RawServer], certificate: Path, monkeypatch: pytest.MonkeyPatch,
    configured: str,
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate)
    server = raw_server(answer_ok, tls=context)
    https = server.url.replace("http://", "https://")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    if configured == "environment":
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
        sink = HTTPSink(https)
    else:
        # A bundle given as an argument wins over one in the environment.
        system_bundle = ssl.get_default_verify_paths().openssl_cafile
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", system_bundle)
        sink = HTTPSink(https, verify=str(certificate) if configured == "argument" else None)
    result = sink(send_request(), 10.0)
    if configured == "none":
        assert result.outcome is R
        assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    else:
        assert result.outcome is D, result.detail


# -- name resolution is inside the attempt's deadline ------------------------------------


class HangingResolver:
    """``getaddrinfo`` for the name ``collector.test``: blocks until released (a dead DNS
    server), then answers 127.0.0.1; counts the lookups that started."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.lookups: List[str] = []

    def __call__(self, host: str, port: int, family: int = 0,
                 kind: int = 0) -> List[AddressInfo]:
        self.lookups.append(host)
        self.released.wait(30)
        assert host == "collector.test"
        return socket.getaddrinfo("127.0.0.1", port, socket.AF_INET, kind)


@pytest.fixture
def hanging_resolver() -> Iterator[HangingResolver]:
    resolver = HangingResolver()
    try:
        yield resolver
    finally:
        resolver.released.set()  # ends the lookup threads the test left waiting


def by_name(server: Server) -> str:
    return server.url.replace("127.0.0.1", "collector.test")


def test_a_hanging_name_lookup_ends_the_attempt_at_its_deadline(
    telemetry_server: Server, hanging_resolver: HangingResolver
) -> None:
    sink = HTTPSink(by_name(telemetry_server), getaddrinfo=hanging_resolver)
    # The lookup would hang 30 s; each attempt gives up at its own 0.2 s deadline.
    results = [send_in_thread(sink, 0.2)(30) for _ in range(3)]
    for result in results:
        assert result is not None, "the attempt waited for the name lookup"
        assert result.outcome is R
        assert "still resolving 'collector.test'" in result.detail
    # One lookup thread, whatever the number of attempts: they all waited for it.
    assert hanging_resolver.lookups == ["collector.test"]
    assert telemetry_server.requests == []

    hanging_resolver.released.set()  # DNS is back: the name resolves, the payload goes
    assert sink(send_request(), 10.0).outcome is D
    assert len(telemetry_server.payloads) == 1


def test_a_failed_name_lookup_is_a_failed_attempt(telemetry_server: Server) -> None:
    def no_such_name(host: str, port: int, family: int = 0,
                     kind: int = 0) -> List[AddressInfo]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    result = HTTPSink(by_name(telemetry_server), getaddrinfo=no_such_name)(send_request(), 5.0)
    assert result.outcome is R
    assert "Failed to resolve 'collector.test'" in result.detail


def test_the_emitter_thread_ends_at_stop_while_a_name_lookup_hangs(
    make_client: Callable[..., Client], telemetry_server: Server,
    hanging_resolver: HangingResolver, tmp_path: Path,
) -> None:
    sink = HTTPSink(by_name(telemetry_server), getaddrinfo=hanging_resolver)
    client = make_client(sink=sink, send_timeout=0.2)
    client.increment("hits")
    client.start_emitting()
    emitter = emitter_of(client)
    client.stop_emitting(timeout=1.0)
    thread = emitter.thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive(), "the emitter thread is stuck in a name lookup"
    assert not hanging_resolver.released.is_set()  # it ended while the lookup still hangs
    (spooled,) = state_of(tmp_path).spool.payloads()  # undelivered: kept for the next start
    assert spooled.data == {"hits": 1}
    assert telemetry_server.requests == []
