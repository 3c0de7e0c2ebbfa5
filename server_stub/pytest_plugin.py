"""pytest plugin: a fresh real server per test, and a real PostgreSQL for the session.

Enable it with ``pytest_plugins = ["server_stub.pytest_plugin"]`` in a conftest.

- ``telemetry_server``: a ``Server`` on 127.0.0.1, in-memory SQLite.
- ``postgres_cluster``: a ``TemporaryPostgres`` started once per session
  (``initdb`` + ``pg_ctl``; as root, run as the ``postgres`` account). When
  PostgreSQL cannot start, the tests that use it fail: they are never skipped.
- ``postgres_url``: a URL to an empty schema of that server, dropped after the
  test (psycopg needed).
"""

from __future__ import annotations

import itertools
from typing import Iterator

import pytest

from ._harness import Server, serve
from ._pgtemp import TemporaryPostgres

__all__ = ["postgres_cluster", "postgres_url", "telemetry_server"]

_schema_numbers = itertools.count(1)


@pytest.fixture
def telemetry_server() -> Iterator[Server]:
    """A ``Server`` on 127.0.0.1 and a free port, in-memory storage; closed after the test."""
    with serve(port=0) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[TemporaryPostgres]:
    """A PostgreSQL server for the whole session, on 127.0.0.1 and a free port."""
    with TemporaryPostgres() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: TemporaryPostgres) -> Iterator[str]:
    """``postgresql://...`` for a new, empty schema of its own; dropped after the test."""
    import psycopg  # noqa: PLC0415 - SQLite-only users of the plugin need no driver

    schema = f"test_{next(_schema_numbers)}"
    with psycopg.connect(postgres_cluster.url(), autocommit=True) as admin:
        admin.execute("SET lock_timeout = '10s'")  # a test's leftover connection must not hang it
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield postgres_cluster.url(search_path=schema)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
