"""The client against a server that misbehaves on purpose: what it says, and how often."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Callable

import pytest
from conftest import WALL_CLOCK_START, VirtualTime, state_of, update_requests

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


# -- 429: a floor, doubling, remembered across restarts --------------------------------


@pytest.mark.parametrize("retry_after", ["0", "past date", "next_update of 1 ns"])
def test_429_waits_at_least_a_second_and_doubles_while_repeated(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime,
    retry_after: str,
) -> None:
    headers = {
        "0": {"Retry-After": "0"},
        "past date": {"Retry-After": format_datetime(
            datetime.fromtimestamp(WALL_CLOCK_START - 3600, timezone.utc), usegmt=True)},
        "next_update of 1 ns": {},
    }[retry_after]
    body = {"next_update": 1} if not headers else None
    telemetry_server.script(status=429, headers=headers, body=body, times=5)
    client = make_client(max_interval=10.0)
    client.increment("hits")
    virtual_time.advance(1000)  # every wait passes at once; they are recorded
    client.start_emitting()
    assert client.flush(timeout=10)  # waits out the 429s, then delivers
    # Five refusals, then the delivery (check-ins may follow: virtual time runs on).
    requests = update_requests(telemetry_server)
    assert [request.status for request in requests[:6]] == [429] * 5 + [200]
    assert virtual_time.waits[:5] == [1.0, 2.0, 4.0, 8.0, 10.0]  # capped at max_interval
    assert requests[5].json["data"] == {"hits": 1}


@pytest.mark.parametrize(("status", "retry_after"),
                         [(503, "0"), (503, "past date"), (500, "0"), (408, "0")])
def test_a_retry_after_on_any_failure_is_a_wait_with_the_same_floor(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime,
    status: int, retry_after: str,
) -> None:
    header = retry_after if retry_after != "past date" else format_datetime(
        datetime.fromtimestamp(WALL_CLOCK_START - 3600, timezone.utc), usegmt=True)
    telemetry_server.script(status=status, headers={"Retry-After": header}, times=5)
    client = make_client(max_interval=10.0)
    client.increment("hits")
    virtual_time.advance(1000)
    client.start_emitting()
    assert client.flush(timeout=10)
    # Not four quick attempts a cycle: one attempt per wait, and each wait at least
    # the floor, doubling while the server keeps asking, capped at max_interval.
    # (Five failures, then the delivery; check-ins may follow: virtual time runs on.)
    requests = update_requests(telemetry_server)
    assert [request.status for request in requests[:6]] == [status] * 5 + [200]
    assert virtual_time.waits[:5] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert requests[5].json["data"] == {"hits": 1}


def test_a_tiny_next_update_is_floored_even_below_min_interval(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    telemetry_server.script(body={"next_update": 1})  # 1 ns
    client = make_client(min_interval=0.001, default_interval=0.001)
    client.start_emitting()
    client.increment("hits")
    assert client.flush(timeout=5)
    assert virtual_time.wait_for_waits(1)
    assert 0.9 <= virtual_time.waits[0] <= 1.1  # a second, give or take the jitter


def _stopped_while_told_to_wait(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> uuid.UUID:
    """A first process's payload gets a 429 with a wait of an hour; it stops under
    that wait (its data spooled, not sent). The instance id, for a second process."""
    instance = uuid.uuid4()
    telemetry_server.script(status=429, headers={"Retry-After": "3600"})
    first = make_client(instance_id=instance)
    first.increment("hits")
    first.start_emitting()
    assert virtual_time.wait_for_waits(1)
    first.stop_emitting(timeout=1)
    return instance


def test_a_remembered_wait_is_capped_when_the_wall_clock_went_back(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    instance = _stopped_while_told_to_wait(make_client, telemetry_server, virtual_time)

    later = VirtualTime()
    a_year_earlier = WALL_CLOCK_START - 365 * 86400
    second = make_client(instance_id=instance, clock=later.clock, wait=later.wait,
                         max_interval=600.0, wall_clock=lambda: a_year_earlier)
    second.start_emitting()
    assert later.wait_for_waits(1)
    assert later.waits[0] == 600.0  # never more than max_interval, not a year and an hour


def test_a_server_wait_longer_than_the_floor_is_kept(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    telemetry_server.script(status=429, headers={"Retry-After": "5"}, times=4)
    client = make_client()
    virtual_time.advance(1000)
    client.start_emitting()
    client.increment("hits")
    assert client.flush(timeout=10)
    assert virtual_time.waits[:4] == [5.0, 5.0, 5.0, 8.0]  # the floor doubles: 1, 2, 4, 8


def test_a_429_wait_is_kept_across_a_restart(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    instance = _stopped_while_told_to_wait(make_client, telemetry_server, virtual_time)
    assert len(update_requests(telemetry_server)) == 1

    later = VirtualTime()
    second = make_client(instance_id=instance, clock=later.clock, wait=later.wait,
                         wall_clock=lambda: WALL_CLOCK_START + 600)
    second.start_emitting()
    assert later.wait_for_waits(1)
    assert later.waits[0] == pytest.approx(3000, abs=1)  # what is left of the hour
    assert len(update_requests(telemetry_server)) == 1  # nothing sent before it
    later.advance(3001)
    assert second.flush(timeout=10)
    assert telemetry_server.payloads[-1]["data"] == {"hits": 1}


# -- flush keeps its word --------------------------------------------------------------


def test_flush_waits_out_a_429_and_returns_true_once_delivered(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime, tmp_path: Path
) -> None:
    telemetry_server.script(status=429, headers={"Retry-After": "1"})
    client = make_client()
    virtual_time.advance(30)  # room for the 1 s wait, not for a next cycle
    client.start_emitting()
    client.increment("hits")
    assert client.flush(timeout=10) is True
    assert telemetry_server.payloads[-1]["data"] == {"hits": 1}
    client.stop_emitting(timeout=1)
    assert state_of(tmp_path).spool.payloads() == []  # delivered, not spooled


def test_flush_keeps_retrying_failed_cycles_until_its_timeout(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    for _ in range(3):
        telemetry_server.script(status=500)
    telemetry_server.script(drop=True)  # the fourth attempt's answer is lost
    client = make_client()
    virtual_time.advance(300)  # backoffs pass at once; the next cycle (60 s) would too
    client.increment("hits")
    client.start_emitting()
    assert client.flush(timeout=30) is True
    assert len(update_requests(telemetry_server)) == 5
    assert telemetry_server.stats()["keys"] == {"hits": 1}


def test_flush_returns_false_only_at_its_timeout(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    telemetry_server.script(status=429, headers={"Retry-After": "120"})
    client = make_client()
    client.increment("hits")
    client.start_emitting()
    assert virtual_time.wait_for_waits(1)
    started = time.monotonic()
    assert client.flush(timeout=0.3) is False
    assert time.monotonic() - started >= 0.3  # it waited its whole timeout
    assert len(update_requests(telemetry_server)) == 1  # and never cut the wait short


# -- repeated warnings -----------------------------------------------------------------


def test_a_wrong_type_field_is_warned_about_once_not_every_cycle(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry_server.script(body={"next_update": "soon", "disable_keys": "all"}, times=5)
    client = make_client(min_interval=1.0, default_interval=1.0)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        client.start_emitting()
        for _ in range(5):
            client.increment("hits")
            assert client.flush(timeout=5)
    assert len(update_requests(telemetry_server)) >= 5
    warned = [r.getMessage() for r in caplog.records]
    assert len([m for m in warned if "next_update" in m]) == 1
    assert len([m for m in warned if "disable_keys" in m]) == 1
