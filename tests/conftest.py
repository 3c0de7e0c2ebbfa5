"""Shared fixtures.

The real loopback server comes from ``server_stub``'s pytest plugin
(``telemetry_server``). Every test runs with a clean environment (no CI,
DO_NOT_TRACK or *_TELEMETRY variables), its own state directory, and an
internal-error hook that turns errors swallowed by telemetry's boundary
into test failures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import List

import pytest

import telemetry
from telemetry import _log

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
    return client
