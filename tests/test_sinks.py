"""Sinks: the status policy as a table, the log and no-op sinks.

``result_for_status`` is pure, so every row of the protocol's status table
(``docs/protocol.md``, "Statuses") is checked here without a server; the HTTP
sink against the real server is exercised by ``test_emission.py``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Dict, Optional

import pytest

from telemetry._sinks import LogSink, NoOpSink, Outcome, result_for_status
from telemetry._wire import JSONValue, Payload, Response, encode_request

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
        (503, b"", {"Retry-After": "5"}, R, Response(), None),
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


def test_the_no_op_sink_accepts_everything() -> None:
    assert NoOpSink()(encode_request(payload(x=1))[0], 0.0).outcome is D
