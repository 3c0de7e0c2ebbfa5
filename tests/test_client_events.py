"""Events and logs end to end: the client's calls, the wire, and the real server over loopback.

Time is virtual (``make_client``); nothing sleeps. What arrived is read from the
server's requests and from its store (deduplicated by ``(instance_id, event_id)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from conftest import WALL_CLOCK_START, VirtualTime, dead_endpoint, update_requests

import telemetry
from server_stub import Server
from server_stub._storage import EventQuery
from telemetry._events import NULL_EVENTS
from telemetry._state import State
from telemetry._wire import SERVER_LIMITS, Payload, split_to_fit

WALL_TEXT = "2027-01-15T08:00:00.000000Z"  # WALL_CLOCK_START
EVENT_ID = re.compile(r"[0-9a-f]{32}")
MakeClient = Callable[..., telemetry.Client]


def sent_events(server: Server) -> List[Dict[str, Any]]:
    """Every event in every update request, in order (repeats included)."""
    return [
        event
        for request in update_requests(server)
        if isinstance(request.json, dict)
        for event in request.json.get("events", [])
    ]


def stored_events(server: Server) -> List[Dict[str, Any]]:
    """What the server keeps, oldest first."""
    query = EventQuery(since="0001-01-01T00:00:00.000000Z", until="9999-01-01T00:00:00.000000Z",
                       limit=1000)
    return list(reversed(server.store.events(query)))


def test_the_wire_form_of_each_call(make_client: MakeClient, telemetry_server: Server) -> None:
    client = make_client(log_level="debug")
    client.record(telemetry.EVENT_TYPE_BEHAVIORAL, "login-start", user="u1", tries=2)
    client.log("warn", "disk almost full", free_mb=12.5)
    service = client.with_attrs(service="api", region="eu")
    service.record("metric", "latency", region="us", ms=3)
    service.with_attrs(request="r1").log("debug", "hello", ok=True)
    proxied = {"event_id": "0123456789abcdef0123456789abcdef",
               "event_time": "2026-11-23T10:00:00.250000Z",
               "event_type": "behavioral", "event_name": "ui-click", "button": "save"}
    assert client.record_raw(proxied) is True
    client.start_emitting()
    assert client.flush(5)

    [request] = update_requests(telemetry_server)
    body = request.json
    assert body["data"] == {}
    assert "dropped_events" not in body["client"]
    events = body["events"]
    for event in events[:4]:
        assert EVENT_ID.fullmatch(event.pop("event_id"))
    assert events == [
        {"event_time": WALL_TEXT, "event_type": "behavioral", "event_name": "login-start",
         "user": "u1", "tries": 2},
        {"event_time": WALL_TEXT, "event_type": "log", "event_name": "warn",
         "free_mb": 12.5, "message": "disk almost full"},
        {"event_time": WALL_TEXT, "event_type": "metric", "event_name": "latency",
         "service": "api", "region": "us", "ms": 3},
        {"event_time": WALL_TEXT, "event_type": "log", "event_name": "debug",
         "service": "api", "region": "eu", "request": "r1", "ok": True, "message": "hello"},
        proxied,
    ]
    assert len(stored_events(telemetry_server)) == 5


def test_module_functions_act_on_the_default_client(
    default_client: telemetry.Client, telemetry_server: Server, tmp_path: Path
) -> None:
    recorder = telemetry.with_attrs(component="cli")  # before init: it follows the client
    telemetry.init(uuid.uuid4(), consent=True, endpoint=telemetry_server.url,
                   state_dir=tmp_path / "state", wall_clock=lambda: WALL_CLOCK_START)
    telemetry.record(telemetry.EVENT_TYPE_METRIC, "size", bytes=10)
    telemetry.log("error", "boom")
    recorder.record("behavioral", "app-start")
    assert telemetry.record_raw({"event_id": "a" * 32, "event_time": WALL_TEXT,
                                 "event_type": "t", "event_name": "n"})
    payload = telemetry.take_payload()
    assert payload is not None
    assert [(e["event_type"], e["event_name"]) for e in payload.events] == [
        ("metric", "size"), ("log", "error"), ("behavioral", "app-start"), ("t", "n"),
    ]
    assert payload.events[2]["component"] == "cli"
    assert (telemetry.EVENT_TYPE_LOG, telemetry.EVENT_TYPE_METRIC,
            telemetry.EVENT_TYPE_BEHAVIORAL) == ("log", "metric", "behavioral")
    assert telemetry.Client.EVENT_TYPE_LOG == "log"


def test_rejected_events_are_counted_in_client_dropped(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    client = make_client()
    client.record("behavioral", "ok")
    client.record("", "empty type")
    client.record("behavioral", "x" * 257)
    client.record("behavioral", "bad", tags=["a"])
    client.record("behavioral", "bad", **{"event_id": "mine"})
    client.log("fatal", "no such level")
    assert client.record_raw({"event_type": "t", "event_name": "no id or time"}) is False
    client.increment("n")
    client.start_emitting()
    assert client.flush(5)
    [request] = update_requests(telemetry_server)
    assert request.json["client"]["dropped"] == 6
    assert [e["event_name"] for e in request.json["events"]] == ["ok"]
    assert request.json["data"] == {"n": 1}


def test_log_below_the_threshold_records_nothing(make_client: MakeClient) -> None:
    client = make_client(log_level="warn")
    for level in telemetry.LEVELS:
        client.log(level, f"at {level}")
    payload = client.take_payload()
    assert payload is not None
    assert [e["event_name"] for e in payload.events] == ["error", "warn"]
    assert payload.dropped == 0


def test_init_refuses_a_bad_log_level_max_events_or_filter() -> None:
    for options in ({"log_level": "warning"}, {"max_events": -1}, {"max_events": 1.5},
                    {"event_filter": "not callable"}):
        with pytest.raises(ValueError, match=r"log_level|max_events|event_filter"):
            telemetry.Client().init(uuid.uuid4(), consent=True, **options)


def test_events_under_500s_and_a_lost_answer_arrive_exactly_once(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime
) -> None:
    client = make_client()
    for number in range(300):
        client.record("metric", "tick", n=number)
    telemetry_server.script(500, times=2)
    telemetry_server.script(drop_after_store=True)  # stored, but the answer is lost
    virtual_time.advance(8)  # room for the backoffs (at most 1 + 2 + 4 s), not a next cycle
    client.start_emitting()
    assert client.flush(10)
    for number in range(300, 320):
        client.record("metric", "tick", n=number)
    telemetry_server.script(503)
    virtual_time.advance(8)
    assert client.flush(10)

    sent = sent_events(telemetry_server)
    per_id = Counter(event["event_id"] for event in sent)
    assert len(per_id) == 320
    assert all(count == 4 for count in list(per_id.values())[:300])  # sent 4 times ...
    assert all(count == 2 for count in list(per_id.values())[300:])
    stored = stored_events(telemetry_server)  # ... and the server has each once
    assert len(stored) == 320
    assert [e["attrs"]["n"] for e in stored] == list(range(320))
    assert len({e["event_id"] for e in stored}) == 320
    assert telemetry_server.stats()["events"] == {"metric": {"tick": 320}}


def test_a_payload_with_only_events_is_data_not_a_check_in(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    client = make_client()
    client.increment("first")  # so that flush() waits for the first cycle
    client.start_emitting()
    assert client.flush(5)
    checked_in = len(update_requests(telemetry_server))
    assert client.flush(5) and len(update_requests(telemetry_server)) == checked_in  # nothing
    client.record("behavioral", "install-success")
    assert client.flush(5)
    requests_now = update_requests(telemetry_server)
    assert len(requests_now) == checked_in + 1
    assert requests_now[-1].json["data"] == {}
    assert [e["event_name"] for e in requests_now[-1].json["events"]] == ["install-success"]


def test_no_events_no_events_field(make_client: MakeClient, telemetry_server: Server) -> None:
    client = make_client()
    client.increment("n")
    client.start_emitting()
    assert client.flush(5)
    assert all("events" not in r.json for r in update_requests(telemetry_server))


def test_the_server_can_disable_one_event_type_but_not_logs(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    telemetry_server.policy.update(disabled_keys=["events:behavioral"])
    client = make_client()
    client.increment("first")
    client.start_emitting()
    assert client.flush(5)  # the answer brings the policy
    client.record("behavioral", "login")
    client.log("error", "boom")
    client.record("metric", "size", n=1)
    assert client.flush(5)
    assert [(e["event_type"], e["event_name"]) for e in stored_events(telemetry_server)] == [
        ("log", "error"), ("metric", "size"),
    ]
    assert client.status().server_disabled_keys == frozenset({"events:behavioral"})


def test_the_app_disabled_event_keys_stay_disabled(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    telemetry_server.policy.update(enabled_keys=["events:log", "events:metric:size"])
    client = make_client(disabled_keys=["events:log", "events:metric:size"])
    client.increment("first")
    client.start_emitting()
    assert client.flush(5)  # the answer brings the policy
    client.log("error", "boom")
    client.record("metric", "size", n=1)
    client.record("metric", "count", n=1)
    assert client.flush(5)
    assert [e["event_name"] for e in stored_events(telemetry_server)] == ["count"]


def test_the_server_can_disable_every_event(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    client = make_client()
    client.record("behavioral", "before")  # buffered, then disabled: dropped
    telemetry_server.script(body={"disable_keys": ["events"]})
    client.start_emitting()
    assert client.flush(5)
    client.log("error", "boom")
    client.increment("still-counted")
    assert client.flush(5)
    assert [e["event_name"] for e in stored_events(telemetry_server)] == ["before"]
    assert telemetry_server.stats()["keys"] == {"still-counted": 1}


def test_an_event_filter_drops_silently_or_fails_closed(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    def no_secrets(event: Dict[str, Any]) -> bool:
        if event["event_name"] == "explode":
            raise RuntimeError("filter bug")
        return "secret" not in event

    client = make_client(event_filter=no_secrets)
    client.record("behavioral", "login", user="u")
    client.record("behavioral", "login", secret="hunter2")
    client.record("behavioral", "explode")
    client.start_emitting()
    assert client.flush(5)
    [request] = update_requests(telemetry_server)
    assert [e.get("user") for e in request.json["events"]] == ["u"]
    assert request.json["client"]["dropped"] == 1  # only the failure counts
    assert "hunter2" not in request.body.decode("utf-8", "replace")


def test_max_events_overflow_is_counted_in_dropped_events(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(max_events=5)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for number in range(12):
            client.record("metric", "n", n=number)
    client.start_emitting()
    assert client.flush(5)
    [request] = update_requests(telemetry_server)
    assert [e["n"] for e in request.json["events"]] == [0, 1, 2, 3, 4]
    assert request.json["client"]["dropped_events"] == 7
    assert request.json["client"]["dropped"] == 0
    assert sum("max_events=5" in r.getMessage() for r in caplog.records) == 1
    client.record("metric", "n", n=12)
    assert client.flush(5)
    last = update_requests(telemetry_server)[-1].json
    assert [e["n"] for e in last["events"]] == [12]
    assert "dropped_events" not in last["client"]  # reported once, then reset


def test_off_mode_records_nothing(tmp_path: Path) -> None:
    client = telemetry.Client()
    client.init(uuid.uuid4(), consent=False, state_dir=tmp_path / "state")
    recorder = client.with_attrs(a=1)
    client.record("behavioral", "login", user="u")
    client.log("error", "boom")
    recorder.record("behavioral", "x")
    recorder.log("error", "y")
    assert client.record_raw({"anything": "goes"}) is True  # off: not even checked
    assert client.event_target is NULL_EVENTS
    assert client.take_payload() is None
    assert client._events.event_count == 0


def test_consent_withdrawn_forgets_buffered_events(make_client: MakeClient) -> None:
    client = make_client()
    client.record("behavioral", "login")
    client.set_consent(False)
    client.set_consent(True)
    payload = client.take_payload()
    assert payload is not None and payload.events == ()


def test_a_server_stop_stops_events_too(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    telemetry_server.policy.update(stop=True)
    client = make_client()
    client.record("behavioral", "before")
    client.start_emitting()
    client.flush(5)
    client.record("behavioral", "after")
    assert client.event_target is NULL_EVENTS
    assert client._events.event_count == 0


def test_local_mode_writes_one_line_per_event(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(consent="local", endpoint=None)
    client.record("behavioral", "deploy-start", project="my app", n=2)
    client.log("error", "disk full")
    with caplog.at_level(logging.INFO, logger="telemetry"):
        client.start_emitting()
        assert client.flush(5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[telemetry]")]
    event_lines = [line for line in lines if line.startswith("[telemetry] event ")]
    assert len(event_lines) == 2
    assert re.fullmatch(
        r'\[telemetry\] event behavioral/deploy-start event_id=[0-9a-f]{32} '
        r'event_time=2027-01-15T08:00:00\.000000Z project="my app" n=2',
        event_lines[0],
    ), event_lines[0]
    assert event_lines[1].startswith("[telemetry] event log/error ")
    assert event_lines[1].endswith(' message="disk full"')


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() in a threaded process
def test_a_forked_child_starts_with_no_events(make_client: MakeClient) -> None:
    client = make_client()
    client.record("behavioral", "parent")
    events = client._events
    read_end, write_end = os.pipe()
    events._lock.acquire()  # as if a parent thread were inside an event call
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                signal.alarm(10)  # a deadlock on the inherited lock ends the child
                client.record("behavioral", "child")
                payload = client.take_payload()
                report = [] if payload is None else [e["event_name"] for e in payload.events]
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
    finally:
        events._lock.release()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report_bytes = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    assert json.loads(report_bytes) == ["child"]
    payload = client.take_payload()
    assert payload is not None
    assert [e["event_name"] for e in payload.events] == ["parent"]


def test_the_spool_hands_events_to_the_next_process_with_their_ids(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path
) -> None:
    instance = uuid.uuid4()
    first = make_client(instance_id=instance, endpoint=dead_endpoint())
    first.record("behavioral", "install-success", version="1.0")
    first.log("error", "offline")
    first.start_emitting()
    first.stop_emitting(timeout=1.0)
    (spooled,) = State("testapp", root=tmp_path / "state").spool.payloads()
    ids = [event["event_id"] for event in spooled.events]
    assert len(ids) == 2

    second = make_client(instance_id=instance)
    second.start_emitting()
    assert second.flush(5)
    stored = stored_events(telemetry_server)
    assert [e["event_id"] for e in stored] == ids
    assert [e["event_time"] for e in stored] == [WALL_TEXT, WALL_TEXT]
    assert State("testapp", root=tmp_path / "state").spool.payloads() == []


def test_a_payload_too_big_is_split_across_events() -> None:
    chunk = "".join(chr(0x21 + (i * 7919) % 90) for i in range(1000))
    events = [
        {"event_id": f"{i:032x}", "event_time": WALL_TEXT, "event_type": "t", "event_name": "n",
         **{f"a{k}": chunk for k in range(14)}}
        for i in range(800)
    ]
    from datetime import datetime, timezone

    payload = Payload(instance_id=str(uuid.uuid4()), timestamp=datetime.now(timezone.utc),
                      data={"k": 1}, events=events, dropped=3, dropped_events=4)
    requests, dropped = split_to_fit(payload)
    assert dropped == 0 and len(requests) >= 3
    parts = [request.payload for request in requests]
    assert [e for part in parts for e in part.events] == events
    assert [part.data for part in parts if part.data] == [{"k": 1}]
    assert sum(part.dropped for part in parts) == 3
    assert sum(part.dropped_events for part in parts) == 4
    assert len({part.payload_id for part in parts}) == len(parts)
    assert all(len(r.body) < SERVER_LIMITS.max_raw_bytes for r in requests)


def test_events_survive_the_codec_and_the_spools_decoder() -> None:
    from datetime import datetime, timezone

    from telemetry._wire import decode_payload, encode_payload

    events: List[Dict[str, Any]] = [
        {"event_id": f"{i:032x}", "event_time": WALL_TEXT, "event_type": "t",
         "event_name": "n", "i": i, "s": "\u00e9\ud800"}
        for i in range(300)
    ]
    payload = Payload(instance_id=str(uuid.uuid4()), timestamp=datetime.now(timezone.utc),
                      data={"k": 1}, events=events, dropped_events=2)
    body = json.loads(encode_payload(payload))
    assert body["events"] == events and body["client"]["dropped_events"] == 2
    assert decode_payload(encode_payload(payload)) == payload
    plain = Payload(instance_id=str(uuid.uuid4()), timestamp=datetime.now(timezone.utc))
    assert "events" not in json.loads(encode_payload(plain))
    assert not plain.carries_data and payload.carries_data
