"""Shared fixtures.

The real loopback server comes from ``server_stub``'s pytest plugin
(``telemetry_server``); ``backend_server`` is the same on each storage backend
(in-memory SQLite, then an empty schema of a real PostgreSQL). Every test runs
with a clean environment (no CI, DO_NOT_TRACK or *_TELEMETRY variables), its
own state directory, and an internal-error hook that turns errors swallowed by
telemetry's boundary into test failures.
"""

from __future__ import annotations

import os
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple

import pytest
from _net import free_port

import telemetry
from server_stub import RecordedRequest, Server, serve
from telemetry import _log
from telemetry._buffer import Buffer, member_value
from telemetry._emitter import Emitter
from telemetry._state import State
from telemetry._wire import CountingSet, JSONValue, Payload, Request, encode_request, wire_data

pytest_plugins = ["server_stub.pytest_plugin"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CI sets CI=true, which would turn telemetry off: tests decide for themselves."""
    for name in list(os.environ):
        if name in ("CI", "DO_NOT_TRACK") or name.endswith("_TELEMETRY"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TELEMETRY_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture(autouse=True)
def fail_on_internal_errors() -> Iterator[List[BaseException]]:
    """Errors swallowed at telemetry's boundary fail the test that caused them."""
    errors: List[BaseException] = []
    previous = _log.internal_error_hook
    _log.internal_error_hook = errors.append
    try:
        yield errors
    finally:
        _log.internal_error_hook = previous
    if errors:
        pytest.fail(f"telemetry swallowed internal errors: {errors!r}")


@pytest.fixture
def default_client(monkeypatch: pytest.MonkeyPatch) -> telemetry.Client:
    """A fresh process-wide default client, so module-level calls start uninitialised."""
    client = telemetry.Client()
    monkeypatch.setattr(telemetry, "_DEFAULT", client)
    for name in telemetry._BUFFER_CALLS:  # the default client's buffer's own methods
        monkeypatch.setattr(telemetry, name, getattr(client._buffer, name))
    return client


class VirtualTime:
    """A clock and ``wait`` for the emitter that run in virtual time.

    A wait that ends at or before the horizon returns at once, moving the
    clock forward; a wait beyond it blocks until its event is set (flush,
    stop) or ``advance`` moves the horizon past its end. Every requested
    wait is recorded, so tests can check schedules without sleeping.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.horizon = 0.0
        self.waits: List[float] = []
        self._changed = threading.Condition()

    def clock(self) -> float:
        return self.now

    def wait(self, event: threading.Event, seconds: float) -> None:
        with self._changed:
            self.waits.append(seconds)
            self._changed.notify_all()
            end = self.now + seconds
            while end > self.horizon and not event.is_set():
                # The event is set by another thread without telling us: poll it briefly.
                self._changed.wait(0.01)
            if end <= self.horizon:
                self.now = max(self.now, end)

    def advance(self, seconds: float) -> None:
        """Let virtual time run ``seconds`` past now."""
        with self._changed:
            self.horizon = self.now + seconds
            self._changed.notify_all()

    def wait_for_waits(self, count: int, timeout: float = 10.0) -> bool:
        """Block (really) until the emitter has asked to wait ``count`` times."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.waits) >= count, timeout)


@pytest.fixture
def virtual_time() -> VirtualTime:
    return VirtualTime()


WALL_CLOCK_START = 1_800_000_000.0


@pytest.fixture
def make_client(
    telemetry_server: Server, virtual_time: VirtualTime, tmp_path: Path
) -> Iterator[Callable[..., telemetry.Client]]:
    """Build initialised clients aimed at the test server, in virtual time."""
    clients: List[telemetry.Client] = []

    def make(**options: Any) -> telemetry.Client:
        settings: Dict[str, Any] = {
            "instance_id": uuid.uuid4(),
            "app": "testapp",
            "endpoint": telemetry_server.url,
            "consent": True,
            "default_interval": 60.0,
            "min_interval": 1.0,
            "max_interval": 3600.0,
            "clock": virtual_time.clock,
            "wait": virtual_time.wait,
            "rng": random.Random(7),
            "wall_clock": lambda: WALL_CLOCK_START,
            "state_dir": tmp_path / "state",
        }
        settings.update(options)
        client = telemetry.Client()
        client.init(**settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop_emitting(timeout=1.0)


def dead_endpoint() -> str:
    """An endpoint on a loopback port nobody listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


def update_requests(server: Server) -> List[RecordedRequest]:
    """The ``POST /v1/update`` requests the server saw, in order."""
    return [r for r in server.requests if r.path.startswith("/v1/update/")]


def typed(value: Any) -> Any:
    """``value`` with every scalar tagged by its type, so 1, 1.0 and True compare unequal."""
    if isinstance(value, dict):
        return {name: typed(item) for name, item in value.items()}
    if isinstance(value, (list, CountingSet)):  # a counting set: the list it stands for
        return [typed(item) for item in value]
    return (type(value).__name__, value)


class Taken(NamedTuple):
    """What ``taken(buffer)`` removed: the data in wire form, its items, drops."""

    data: Dict[str, JSONValue]
    items: int
    dropped: int


def taken(buffer: Buffer) -> Taken:
    """Take everything out of ``buffer``, with the data in the wire's shapes as plain JSON
    (a counting set as the list it stands for)."""
    snapshot = buffer.take()
    data = wire_data(snapshot.plain_tables, snapshot.counting_sets, member_value)
    plain: Dict[str, JSONValue] = {}
    for key, value in data.items():
        if isinstance(value, CountingSet):
            members: List[JSONValue] = [*value]
            plain[key] = members
        else:
            plain[key] = value
    return Taken(plain, snapshot.items, snapshot.dropped)


def encoded(payloads: Iterable[Payload]) -> List[Request]:
    """``payloads`` encoded as the emitter hands them to the spool."""
    return [encode_request(payload)[0] for payload in payloads]


def emitter_of(client: telemetry.Client) -> Emitter:
    """The client's running emitter: the tests' one reach into a private attribute.

    End-to-end tests look at what the emitter holds (pending payloads, a 429
    wait, its thread) through its read-only properties.
    """
    emitter = client._emitter
    assert emitter is not None, "the client has no emitter (start_emitting() not called?)"
    return emitter


def wait_for_spool_deletion(timeout: float = 30.0) -> None:
    """Wait for the threads deleting withdrawn spools (consent turned off) to end."""
    for thread in threading.enumerate():
        if thread.name == "telemetry-spool-delete":
            thread.join(timeout)
            assert not thread.is_alive(), "the withdrawn spool is still being deleted"


def state_of(tmp_path: Path, app: str = "testapp") -> State:
    """The state files ``make_client`` clients keep (their default ``state_dir``)."""
    return State(app, root=tmp_path / "state")


@pytest.fixture(params=["sqlite", "postgres"])
def backend_db(request: pytest.FixtureRequest) -> str:
    """``db`` for a server under test: in-memory SQLite, or an empty PostgreSQL schema."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return ":memory:"


@pytest.fixture
def backend_server(backend_db: str) -> Iterator[Server]:
    """The plugin's ``telemetry_server``, on each storage backend (the test runs twice)."""
    with serve(port=0, db=backend_db) as server:
        yield server
