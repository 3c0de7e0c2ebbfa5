"""The client against a server that misbehaves on purpose: what it says, and how often."""

from __future__ import annotations

import logging
from typing import Callable

import pytest

import telemetry
from server_stub import Server

MakeClient = Callable[..., telemetry.Client]


def test_server_text_is_escaped_and_capped_in_the_log(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "ok\n2026-12-01 CRITICAL root: disk wiped\x1b[2J\u202egnp.exe" + "x" * 1000
    telemetry_server.script(body={"error": forged})
    client = make_client()
    client.increment("hits")
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        client.start_emitting()
        assert client.flush(timeout=5)
    (said,) = [r.getMessage() for r in caplog.records if "server says" in r.getMessage()]
    text = said.split("server says: ", 1)[1]
    assert len(text) <= 200
    assert text.startswith("ok\\x0a2026-12-01 CRITICAL root: disk wiped\\x1b[2J\\u202egnp.exe")
    assert all(char.isprintable() for char in said)
