"""Shared fixtures.

The real loopback server comes from ``server_stub``'s pytest plugin
(``telemetry_server``); ``backend_server`` is the same on each storage backend
(in-memory SQLite, then a schema of a real PostgreSQL with the current tables
and no rows). Every test runs
with a clean environment (no CI, DO_NOT_TRACK or *_TELEMETRY variables), its
own state directory, and an internal-error hook that turns errors swallowed by
telemetry's boundary into test failures.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple

import psycopg
import pytest
from _net import free_port

import telemetry
from server_stub import RecordedRequest, Server, serve
from server_stub._pgtemp import TemporaryPostgres
from server_stub._postgres import SCHEMA_VERSION, migrate
from telemetry import _log
from telemetry._buffer import Buffer, member_value
from telemetry._emitter import Emitter
from telemetry._state import State
from telemetry._wire import CountingSet, JSONValue, Payload, Request, encode_request, wire_data

pytest_plugins = ["server_stub.pytest_plugin"]

# Bytecode is cached even under PYTHONDONTWRITEBYTECODE: the suite imports the test
# modules (rewriting their asserts), the packages and Hypothesis, and starts Python
# some sixty times; compiling all of it afresh every time cost about a fifth of the
# run. The child processes inherit this. (``__pycache__`` is ignored by git.)
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


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


class MigratedSchemas:
    """PostgreSQL schemas at the current schema version, each used by one test at a time.

    Creating the tables costs a new schema about 150 ms; emptying a used one
    (every row deleted, identity counters back at 1) costs about 10, so used
    schemas are emptied and handed to the next test. A schema whose tables,
    columns, indexes or constraints a test changed is dropped, never reused:
    every test starts from what ``migrate()`` makes, with no rows.
    """

    def __init__(self, cluster: TemporaryPostgres) -> None:
        self._cluster = cluster
        self._admin = psycopg.connect(cluster.url(), autocommit=True)
        self._admin.execute("SET lock_timeout = '10s'")  # a leftover connection must not hang us
        self._free: List[str] = []
        self._numbers = iter(range(1, 1_000_000))
        self._shape = ""

    def close(self) -> None:
        self._admin.close()

    def take(self) -> str:
        """The URL of a migrated schema with no rows, for one test."""
        schema = self._free.pop() if self._free else self._create()
        return self._cluster.url(search_path=schema)

    def give_back(self, url: str) -> None:
        schema = url.rsplit("%3D", 1)[1]
        if self._shape_of(schema) != self._shape:
            self._admin.execute(f"DROP SCHEMA {schema} CASCADE")
            return
        with self._admin.transaction():
            for (table,) in self._admin.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
            ).fetchall():
                self._admin.execute(f"DELETE FROM {schema}.{table}")
            self._admin.execute(
                "SELECT setval(format('%%I.%%I', schemaname, sequencename), 1, false)"
                " FROM pg_sequences WHERE schemaname = %s",
                (schema,),
            )
            self._admin.execute(
                f"INSERT INTO {schema}.schema_version VALUES (%s)", (SCHEMA_VERSION,)
            )
        self._free.append(schema)

    def _create(self) -> str:
        schema = f"migrated_{next(self._numbers)}"
        self._admin.execute(f"CREATE SCHEMA {schema}")
        with psycopg.connect(self._cluster.url(search_path=schema), autocommit=True) as connection:
            migrate(connection)
        shape = self._shape_of(schema)
        if not self._shape:
            self._shape = shape
        assert shape == self._shape, "migrate() made two different schemas"
        return schema

    def _shape_of(self, schema: str) -> str:
        """Every table, column, index and constraint of ``schema``, as text."""
        row = self._admin.execute(
            """
            SELECT concat_ws(' | ',
                (SELECT string_agg(format('%%s.%%s %%s %%s %%s %%s', table_name, column_name,
                                          data_type, is_nullable, column_default, is_identity),
                                   ', ' ORDER BY table_name, column_name)
                 FROM information_schema.columns WHERE table_schema = %(s)s),
                (SELECT string_agg(indexdef, ', ' ORDER BY indexname)
                 FROM pg_indexes WHERE schemaname = %(s)s),
                (SELECT string_agg(pg_get_constraintdef(c.oid), ', ' ORDER BY c.conname)
                 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                 WHERE n.nspname = %(s)s))
            """,
            {"s": schema},
        ).fetchone()
        assert row is not None
        shape: str = row[0].replace(schema + ".", "")
        return shape


@pytest.fixture(scope="session")
def migrated_schemas(postgres_cluster: TemporaryPostgres) -> Iterator[MigratedSchemas]:
    schemas = MigratedSchemas(postgres_cluster)
    try:
        yield schemas
    finally:
        schemas.close()


@pytest.fixture
def migrated_postgres_url(migrated_schemas: MigratedSchemas) -> Iterator[str]:
    """``postgresql://...`` for a schema of its own, migrated, with no rows."""
    url = migrated_schemas.take()
    try:
        yield url
    finally:
        migrated_schemas.give_back(url)


@pytest.fixture(params=["sqlite", "postgres"])
def backend_db(request: pytest.FixtureRequest) -> str:
    """``db`` for a server under test: in-memory SQLite, or a PostgreSQL schema of its own
    with the current tables and no rows."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("migrated_postgres_url")
        return url
    return ":memory:"


@pytest.fixture
def backend_server(backend_db: str) -> Iterator[Server]:
    """The plugin's ``telemetry_server``, on each storage backend (the test runs twice)."""
    with serve(port=0, db=backend_db) as server:
        yield server
