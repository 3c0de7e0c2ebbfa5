"""Emission end to end: a client and the real ``server_stub`` over loopback, virtual time."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import requests
from conftest import (
    WALL_CLOCK_START,
    VirtualTime,
    dead_endpoint,
    emitter_of,
    state_of,
    update_requests,
)

import telemetry
from server_stub import Server, serve
from telemetry import _emitter
from telemetry._wire import Payload

MakeClient = Callable[..., telemetry.Client]
NS = 1_000_000_000


def stats(server: Server) -> Dict[str, Any]:
    answer = requests.get(f"{server.url}/v1/stats", timeout=5)
    answer.raise_for_status()
    result: Dict[str, Any] = answer.json()
    return result


def first_jitter(seed: int = 7) -> float:
    """The factor the first ``Schedule.interval`` call applies with ``Random(seed)``."""
    return 1 + random.Random(seed).uniform(-0.1, 0.1)


def test_first_send_happens_at_once(make_client: MakeClient, telemetry_server: Server,
                                    virtual_time: VirtualTime) -> None:
    client = make_client()
    client.set("version", "1.4.2")
    client.increment("starts")
    client.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    assert virtual_time.now == 0.0
    (payload,) = telemetry_server.payloads
    assert payload["data"] == {"version": "1.4.2", "starts": 1}
    assert payload["instance_id"] == str(client.instance_id)
    assert payload["client"]["dropped"] == 0


@pytest.mark.parametrize(
    ("policy_seconds", "expected"),
    [
        (120, 120.0),  # honoured
        (0.01, 1.0),  # raised to min_interval
        (10**9, 3600.0),  # lowered to max_interval
        (0, 60.0),  # non-positive: default_interval
    ],
)
def test_next_update_is_honoured_clamped_and_jittered(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime,
    policy_seconds: float, expected: float,
) -> None:
    telemetry_server.policy.update(next_update=policy_seconds)
    client = make_client()
    client.start_emitting()
    assert virtual_time.wait_for_waits(1)
    assert virtual_time.waits[0] == pytest.approx(expected * first_jitter())
    # When that time has passed, the next cycle sends (an empty check-in).
    virtual_time.advance(expected * 1.2)
    assert telemetry_server.wait_for_requests(2)
    assert telemetry_server.payloads[1]["data"] == {}


def test_jitter_stays_within_ten_percent() -> None:
    schedule = _emitter.Schedule(min_interval=1, max_interval=1000)
    rng = random.Random(1)
    waits = [schedule.interval(100 * NS, rng) for _ in range(2000)]
    assert min(waits) >= 90 and max(waits) <= 110
    assert max(waits) - min(waits) > 15  # it does spread


@pytest.mark.parametrize("bad", ["soon", -5, None, 1.5, True])
def test_bad_next_update_falls_back_to_default(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime, bad: object
) -> None:
    telemetry_server.script(status=200, body={"next_update": bad})
    client = make_client()
    client.start_emitting()
    assert virtual_time.wait_for_waits(1)
    assert virtual_time.waits[0] == pytest.approx(60.0 * first_jitter())


def test_server_stop_stops_clears_and_is_remembered(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime, tmp_path: Path
) -> None:
    telemetry_server.policy.update(stop=True)
    client = make_client()
    client.increment("hits")
    client.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    assert client.flush(timeout=0.2) is False  # the emitter is gone
    client.increment("hits")
    assert client.take_payload() is None  # collection is a no-op now
    assert client.status().server_stopped
    # A restart within 30 days stays quiet.
    again = make_client()
    again.increment("hits")
    again.start_emitting()
    assert again.flush(timeout=0.2) is False
    assert len(update_requests(telemetry_server)) == 1


@pytest.mark.parametrize("status", [410, 451])
def test_gone_and_unavailable_for_legal_reasons_mean_stop(
    make_client: MakeClient, telemetry_server: Server, status: int
) -> None:
    telemetry_server.script(status=status, body={"error": "go away"})
    client = make_client()
    client.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    client.stop_emitting(timeout=1.0)
    assert client.status().server_stopped
    client.increment("x")
    assert client.take_payload() is None
    assert len(update_requests(telemetry_server)) == 1


def test_disable_and_enable_keys(make_client: MakeClient, telemetry_server: Server) -> None:
    client = make_client(disabled_keys=["secret"])
    client.start_emitting()
    assert client.flush(timeout=5)  # first (empty) check-in
    telemetry_server.script(status=200, body={"disable_keys": ["tls"]})
    client.increment("tls:handshakes")
    client.increment("kept")
    assert client.flush(timeout=5)
    # The response arrived after that payload was taken: disabling drops what
    # is buffered now and refuses new calls.
    client.increment("tls:handshakes")
    client.increment("tls")
    client.increment("kept")
    telemetry_server.script(status=200, body={"enable_keys": ["tls", "secret"],
                                                "disable_keys": ["secret"]})
    assert client.flush(timeout=5)
    assert telemetry_server.payloads[-1]["data"] == {"kept": 1}
    # tls is enabled again; "secret" was disabled by the application and stays so.
    client.increment("tls:handshakes")
    client.increment("secret")
    assert client.flush(timeout=5)
    assert telemetry_server.payloads[-1]["data"] == {"tls:handshakes": 1}


def test_enable_keys_cannot_enable_what_the_app_disabled(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    client = make_client(disabled_keys=["secret"])
    telemetry_server.script(status=200, body={"enable_keys": ["secret"]})
    client.increment("first")
    client.start_emitting()
    assert client.flush(timeout=5)
    assert telemetry_server.payloads[0]["data"] == {"first": 1}
    client.increment("secret:x")
    client.increment("ok")
    assert client.flush(timeout=5)
    assert telemetry_server.payloads[-1]["data"] == {"ok": 1}


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_waits_retry_after_and_keeps_the_payload(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime, form: str
) -> None:
    retry_after = "120" if form == "seconds" else format_datetime(
        datetime.fromtimestamp(WALL_CLOCK_START + 120, timezone.utc), usegmt=True)
    telemetry_server.script(status=429, headers={"Retry-After": retry_after})
    client = make_client()
    client.increment("hits")
    client.start_emitting()
    assert virtual_time.wait_for_waits(1)
    assert virtual_time.waits[0] == pytest.approx(120.0)
    # flush never cuts a server's Retry-After short.
    assert client.flush(timeout=0.2) is False
    assert len(update_requests(telemetry_server)) == 1
    virtual_time.advance(121)
    assert telemetry_server.wait_for_requests(2)
    first, second = (json.loads(r.body) for r in update_requests(telemetry_server))
    assert first["payload_id"] == second["payload_id"]
    assert telemetry_server.payloads[-1]["data"] == {"hits": 1}


def test_429_wait_is_bounded_by_max_interval(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    telemetry_server.script(status=429, headers={"Retry-After": "999999"})
    client = make_client(max_interval=600.0)
    client.start_emitting()
    assert virtual_time.wait_for_waits(1)
    assert virtual_time.waits[0] == 600.0


def test_retry_then_success_keeps_the_payload_id(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    telemetry_server.script(status=500)
    telemetry_server.script(status=503)
    telemetry_server.script(status=408)
    virtual_time.advance(8)  # room for the backoffs (at most 1 + 2 + 4 s), not a next cycle
    client = make_client()
    client.add("bytes", 42)
    client.start_emitting()
    assert telemetry_server.wait_for_requests(4)
    ids = {json.loads(r.body)["payload_id"] for r in update_requests(telemetry_server)}
    assert len(ids) == 1
    assert stats(telemetry_server)["keys"] == {"bytes": 42}
    backoffs = virtual_time.waits[:3]
    assert all(0 <= wait <= cap for wait, cap in zip(backoffs, (1, 2, 4)))


def test_exhausted_retries_keep_the_payload_for_the_next_cycle(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    for _ in range(4):
        telemetry_server.script(status=502)
    virtual_time.advance(8)
    client = make_client()
    client.increment("a")
    client.start_emitting()
    assert telemetry_server.wait_for_requests(4)
    client.increment("b")
    assert client.flush(timeout=5)
    bodies = [json.loads(r.body) for r in update_requests(telemetry_server)]
    assert bodies[4]["payload_id"] == bodies[0]["payload_id"]  # resent first
    assert stats(telemetry_server)["keys"] == {"a": 1, "b": 1}


def test_connection_dropped_after_store_is_deduplicated(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    telemetry_server.script(drop_after_store=True)
    virtual_time.advance(8)  # room for the backoffs (at most 1 + 2 + 4 s), not a next cycle
    client = make_client()
    for _ in range(7):
        client.increment("hits")
    client.append_unique("ua", "curl")
    client.start_emitting()
    assert telemetry_server.wait_for_requests(2)
    assert client.flush(timeout=5)
    result = stats(telemetry_server)
    assert result["keys"]["hits"] == 7
    assert result["keys"]["ua"] == [{"value": "curl", "count": 1}]
    sent_with_data = [r.json for r in update_requests(telemetry_server) if r.json["data"]]
    assert len(sent_with_data) == 2  # sent twice ...
    assert sent_with_data[0]["payload_id"] == sent_with_data[1]["payload_id"]
    stored = [p for p in telemetry_server.stored_payloads() if p["data"]]
    assert len(stored) == 1  # ... stored once


def test_400_drops_only_that_payload_and_counts_it(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    telemetry_server.script(status=400, body={"error": "bad"})
    client = make_client()
    client.increment("lost")
    client.append("list", 1)
    client.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    client.increment("kept")
    assert client.flush(timeout=5)
    assert len(update_requests(telemetry_server)) == 2
    last = telemetry_server.payloads[-1]
    assert last["data"] == {"kept": 1}
    assert last["client"]["dropped"] == 3  # "lost" (1) + "list" with its element (2)


def test_redirects_are_not_followed(make_client: MakeClient, telemetry_server: Server,
                                    virtual_time: VirtualTime) -> None:
    with serve(port=0) as elsewhere:
        location = f"{elsewhere.url}/v1/update/x"
        for _ in range(4):
            telemetry_server.script(status=307, headers={"Location": location})
        virtual_time.advance(100)
        client = make_client()
        client.increment("x")
        client.start_emitting()
        assert telemetry_server.wait_for_requests(4)
        assert virtual_time.wait_for_waits(4)  # three backoffs, then the next cycle
        assert update_requests(elsewhere) == []
        assert len(emitter_of(client).pending) == 1  # kept for later


def test_gzip_over_one_kibibyte_and_user_agent(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    client = make_client()
    client.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    client.set("big", "x" * 1000)
    client.set("bigger", "y" * 1000)
    assert client.flush(timeout=5)
    small, big = update_requests(telemetry_server)
    assert "Content-Encoding" not in small.headers
    assert big.headers["Content-Encoding"] == "gzip"
    assert small.headers["User-Agent"] == f"telemetry-python/{telemetry.__version__}"
    assert small.headers["Content-Type"] == "application/json"
    assert telemetry_server.payloads[-1]["data"]["bigger"] == "y" * 1000


def test_flush_semantics(make_client: MakeClient, telemetry_server: Server) -> None:
    client = make_client()
    assert client.flush(timeout=1) is False  # before start_emitting
    client.increment("x")
    assert len(update_requests(telemetry_server)) == 0
    client.start_emitting()
    assert client.flush(timeout=5)
    count = len(update_requests(telemetry_server))
    assert client.flush(timeout=5)  # nothing to send: True without a request
    assert len(update_requests(telemetry_server)) == count


@pytest.mark.parametrize("fault", ["unreachable", "never-answers"])
def test_stop_emitting_is_bounded(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path, fault: str
) -> None:
    if fault == "unreachable":
        client = make_client(endpoint=dead_endpoint())
    else:
        for _ in range(3):
            telemetry_server.script(delay=60)
        client = make_client()
    client.increment("hits")
    client.start_emitting()
    started = time.monotonic()
    client.stop_emitting(timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5
    # Nothing was lost: the undelivered payload is in the spool.
    spooled = state_of(tmp_path).spool.payloads()
    assert sum(p.data.get("hits", 0) for p in spooled) == 1  # type: ignore[misc]


def test_spooled_payload_is_sent_by_the_next_start(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path
) -> None:
    instance = uuid.uuid4()
    dead = make_client(instance_id=instance, endpoint=dead_endpoint())
    dead.increment("hits")
    dead.start_emitting()
    dead.stop_emitting(timeout=0.5)
    alive = make_client(instance_id=instance)
    alive.start_emitting()
    assert alive.flush(timeout=5)
    assert stats(telemetry_server)["keys"] == {"hits": 1}
    assert state_of(tmp_path).spool.payloads() == []


def test_stop_emitting_twice_or_without_start_is_harmless(make_client: MakeClient) -> None:
    client = make_client()
    client.stop_emitting()
    client.start_emitting()
    client.stop_emitting(timeout=1)
    client.stop_emitting(timeout=1)
    assert not client.status().emitting


def test_start_emitting_twice_is_logged_noop(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    client.start_emitting()
    emitter = emitter_of(client)
    with caplog.at_level(logging.INFO, logger="telemetry"):
        client.start_emitting()
    assert emitter_of(client) is emitter
    assert "already emitting" in caplog.text


def test_local_mode_logs_payloads_instead_of_sending(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(consent="local")
    client.increment("hits")
    client.set("name", "two words")
    with caplog.at_level(logging.INFO, logger="telemetry"):
        client.start_emitting()
        assert client.flush(timeout=5)
        client.stop_emitting(timeout=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[telemetry]")]
    assert any('hits=1' in line and 'name="two words"' in line for line in lines)
    assert update_requests(telemetry_server) == []


def test_end_to_end_totals_are_exact(telemetry_server: Server, tmp_path: Path) -> None:
    """4 threads collect while the client emits every few ms; totals match exactly.

    The client's own ``max_interval`` makes the cycles that short: a server's
    ``next_update`` is never taken below a second."""
    client = telemetry.Client()
    client.init(uuid.uuid4(), app="e2e", endpoint=telemetry_server.url, consent=True,
                min_interval=0.001, max_interval=0.005, state_dir=tmp_path / "state")
    client.start_emitting()
    per_thread = 25_000

    def work(worker: int) -> None:
        for index in range(per_thread):
            client.increment("calls")
            client.add("bytes", 3)
            client.append_unique("worker", worker)
            if index % 1000 == 0:
                client.append("marks", worker)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.stop_emitting(timeout=10)
    result = stats(telemetry_server)
    assert len(update_requests(telemetry_server)) > 2  # it really emitted while collecting
    assert result["keys"]["calls"] == 4 * per_thread
    assert result["keys"]["bytes"] == 12 * per_thread
    assert result["keys"]["worker"] == [{"value": w, "count": per_thread} for w in range(4)]
    assert result["dropped"] == 0


AT_EXIT_APP = textwrap.dedent(
    """
    import sys, telemetry
    telemetry.init("{instance}", app="exitapp", endpoint=sys.argv[1], consent=True,
                   state_dir=sys.argv[2])
    telemetry.start_emitting()
    telemetry.flush(float(sys.argv[3]))
    telemetry.increment("after_last_cycle")
    """
)


@pytest.mark.parametrize("server_up", [True, False])
def test_atexit_delivers_or_spools_and_exits_promptly(
    telemetry_server: Server, tmp_path: Path, server_up: bool
) -> None:
    instance = uuid.uuid4()
    endpoint = telemetry_server.url if server_up else dead_endpoint()
    # A dead endpoint's flush can only time out: 1 s of real time is enough, not 5.
    flush_timeout = 5.0 if server_up else 1.0
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DO_NOT_TRACK")}
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", AT_EXIT_APP.format(instance=instance), endpoint,
         str(tmp_path / "state"), str(flush_timeout)],
        check=True, env=env, timeout=30,
    )
    elapsed = time.monotonic() - started
    assert elapsed < 10  # interpreter start-up plus at most the 1 s at-exit bound
    from telemetry._state import State

    spooled = State("exitapp", root=tmp_path / "state").spool.payloads()
    if server_up:
        assert stats(telemetry_server)["keys"] == {"after_last_cycle": 1}
        assert spooled == []
    else:
        assert [p.data for p in spooled] == [{"after_last_cycle": 1}]


FORK_APP = textwrap.dedent(
    """
    import os, sys, telemetry
    telemetry.init("{instance}", app="forkapp", endpoint=sys.argv[1], consent=True,
                   state_dir=sys.argv[2])
    telemetry.start_emitting()
    telemetry.increment("parent")
    pid = os.fork()
    if pid == 0:
        telemetry.increment("child")
        telemetry.start_emitting()
        ok = telemetry.flush(5)
        telemetry.stop_emitting(2)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    telemetry.stop_emitting(2)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_fork_child_sends_only_its_own_data(telemetry_server: Server, tmp_path: Path) -> None:
    instance = uuid.uuid4()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DO_NOT_TRACK")}
    subprocess.run(
        [sys.executable, "-c", FORK_APP.format(instance=instance), telemetry_server.url,
         str(tmp_path / "state")],
        check=True, env=env, timeout=60,
    )
    datas: List[Dict[str, Any]] = [p["data"] for p in telemetry_server.payloads]
    assert {"child": 1} in datas
    assert all("parent" not in d for d in datas if "child" in d)
    assert stats(telemetry_server)["keys"] == {"parent": 1, "child": 1}


def test_a_raising_sink_is_a_failed_attempt(make_client: MakeClient,
                                            virtual_time: VirtualTime) -> None:
    from telemetry._sinks import Outcome, SendResult
    from telemetry._wire import Request

    sent: List[Payload] = []

    def sink(request: Request, timeout: float) -> SendResult:
        sent.append(request.payload)
        if len(sent) == 1:
            raise OSError("disk on fire")
        return SendResult(Outcome.DELIVERED)

    virtual_time.advance(8)  # room for a backoff, not for the next cycle
    client = make_client(sink=sink)
    client.increment("x")
    client.start_emitting()
    assert client.flush(timeout=5)
    assert len(sent) == 2 and sent[0] is sent[1]
    assert client.status().emitting


# -- privacy: what leaves the machine ----------------------------------------------------------

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "sekrit-aws-6b35",
    "GITHUB_TOKEN": "sekrit-ghp-9c55",
    "DATABASE_URL": "postgres://admin:sekrit-db-1b2a@db/prod",
    "HOME": "/home/sekrit-home-8e5c",
    "USER": "sekrit-user-0d11",
    "LOGNAME": "sekrit-user-0d11",
    "HOSTNAME": "sekrit-host-3f0c",
    "PWD": "/srv/sekrit-cwd-4f1e",
    "HTTP_PROXY": "",  # a proxy would see the request, not change it; keep it direct
}


def test_nothing_but_what_the_app_set_leaves_the_machine(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    sentinels = [value.encode() for value in SECRETS.values() if value]
    sentinels += [socket.gethostname().encode()] if len(socket.gethostname()) >= 8 else []
    client = make_client(instance_id=None)  # generated: it must not come from the machine
    client.set("version", "1.4.2")
    client.increment("hits")
    client.append_unique("agent", client.fast_hash("curl/8.0"))
    client.start_emitting()
    assert client.flush(timeout=5)
    # An undelivered payload goes to the spool: nothing more in it either.
    telemetry_server.script(drop=True, times=2)
    client.increment("late")
    client.stop_emitting(timeout=1)

    requests_sent = [r for r in telemetry_server.requests if r.path.startswith("/v1/update/")]
    assert len(requests_sent) >= 2
    allowed_headers = {"Host", "User-Agent", "Accept-Encoding", "Accept", "Connection",
                       "Content-Type", "Content-Length", "Content-Encoding"}
    spooled = list(state_of(tmp_path).spool.directory.iterdir())
    assert spooled
    for request in requests_sent:
        assert set(request.headers) <= allowed_headers, request.headers
        assert request.json is not None
        assert set(request.json) == {"instance_id", "timestamp", "payload_id", "data", "client"}
        assert set(request.json["data"]) <= {"version", "hits", "agent", "late"}
        everything = b" ".join([request.path.encode(), request.query.encode(),
                                json.dumps(request.headers).encode(), request.decoded_body or b""])
        for secret in sentinels:
            assert secret not in everything
    for path in spooled:
        for secret in sentinels:
            assert secret not in path.read_bytes()
    assert uuid.UUID(str(client.instance_id)).version == 4  # random, not MAC/time based
