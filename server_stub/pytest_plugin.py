"""pytest plugin: the ``telemetry_server`` fixture, a fresh real server per test.

Enable it with ``pytest_plugins = ["server_stub.pytest_plugin"]`` in a conftest.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from ._harness import Server, serve

__all__ = ["telemetry_server"]


@pytest.fixture
def telemetry_server() -> Iterator[Server]:
    """A ``Server`` on 127.0.0.1 and a free port, in-memory storage; closed after the test."""
    with serve(port=0) as server:
        yield server
