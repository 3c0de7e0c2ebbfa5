"""The event buffer, its checks and ``Recorder`` (telemetry/_events.py), without an emitter."""

from __future__ import annotations

import enum
import gc
import json
import logging
import re
import threading
from typing import Any, Dict, List

import pytest

from telemetry._events import (
    LEVELS,
    MAX_EVENT_BYTES,
    EventBuffer,
    EventTarget,
    Recorder,
    format_event_time,
    parse_log_level,
)
from telemetry._wire import EncodedEvents

WALL = 1_800_000_000.123456
WALL_TEXT = "2027-01-15T08:00:00.123456Z"
EVENT_ID = re.compile(r"[0-9a-f]{32}")


class _Client:
    """What a ``Recorder`` needs of a client: its current event target."""

    def __init__(self, target: EventTarget) -> None:
        self.event_target = target


def make(**options: Any) -> EventBuffer:
    options.setdefault("wall_clock", lambda: WALL)
    return EventBuffer(**options)


def record(buffer: EventBuffer, event_type: object, event_name: object, **attrs: Any) -> None:
    buffer.record(event_type, event_name, attrs)


def test_an_event_in_wire_form_is_flat_with_its_id_and_time() -> None:
    buffer = make()
    record(buffer, "behavioral", "login-start", user="u1", ok=True, tries=2, ratio=0.5, note=None)
    snapshot = buffer.take()
    assert snapshot.rejected == 0 and snapshot.dropped_events == 0
    [event] = snapshot.events
    assert EVENT_ID.fullmatch(event.pop("event_id"))
    assert event == {
        "event_time": WALL_TEXT, "event_type": "behavioral", "event_name": "login-start",
        "user": "u1", "ok": True, "tries": 2, "ratio": 0.5, "note": None,
    }
    assert buffer.take().events == []


def test_events_keep_recording_order_and_distinct_ids() -> None:
    buffer = make()
    for number in range(50):
        record(buffer, "metric", "tick", n=number)
    events = buffer.take().events
    assert [event["n"] for event in events] == list(range(50))
    assert len({event["event_id"] for event in events}) == 50


def test_event_time_is_when_record_was_called() -> None:
    now = [100.0]
    buffer = EventBuffer(wall_clock=lambda: now[0])
    record(buffer, "metric", "a")
    now[0] = 200.5
    record(buffer, "metric", "b")
    now[0] = 999.0
    assert [e["event_time"] for e in buffer.take().events] == [
        "1970-01-01T00:01:40.000000Z", "1970-01-01T00:03:20.500000Z",
    ]


def test_taken_events_carry_their_times_as_format_event_time_writes_them() -> None:
    times = [WALL, WALL + 0.5, WALL + 0.9999996, WALL + 1.25, 0.0000004, 1.9999996, -0.5, WALL]
    clock = iter(times)
    buffer = make(wall_clock=lambda: next(clock))
    for number in range(len(times)):
        record(buffer, "metric", "n", n=number)  # all but the first on the quick path
    taken = buffer.take().events
    assert [event["event_time"] for event in taken] == [format_event_time(t) for t in times]
    assert taken[2]["event_time"] == format_event_time(WALL + 1)  # rounded up to the next second


def test_format_event_time_rounds_to_microseconds() -> None:
    assert format_event_time(0.0000004) == "1970-01-01T00:00:00.000000Z"
    assert format_event_time(1.9999996) == "1970-01-01T00:00:02.000000Z"
    assert format_event_time(WALL) == WALL_TEXT


class Color(str, enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 3


def test_subclasses_of_str_and_int_are_sent_as_plain_values() -> None:
    buffer = make()
    record(buffer, "behavioral", "paint", color=Color.RED, size=Size.BIG)
    [event] = buffer.take().events
    assert type(event["color"]) is str and event["color"] == "red"
    assert type(event["size"]) is int and event["size"] == 3


REJECTED: Dict[str, Any] = {
    "type not a str": (1, "x", {}),
    "type empty": ("", "x", {}),
    "type too long": ("t" * 257, "x", {}),
    "name not a str": ("t", None, {}),
    "name empty": ("t", "", {}),
    "name too long": ("t", "n" * 257, {}),
    "name with NUL": ("t", "a\x00b", {}),
    "name with a forged log line": ("t", "x\nCRITICAL \x1b[31mfake", {"a": [1]}),
    "type with a lone surrogate": ("t\ud800", "x", {}),
    "attr name event_*": ("t", "x", {"event_extra": 1}),
    "attr name empty": ("t", "x", {"": 1}),
    "attr name too long": ("t", "x", {"a" * 257: 1}),
    "attr value a list": ("t", "x", {"a": [1]}),
    "attr value a dict": ("t", "x", {"a": {"b": 1}}),
    "attr value an object": ("t", "x", {"a": object()}),
    "attr value bytes": ("t", "x", {"a": b"x"}),
    "attr str too long": ("t", "x", {"a": "x" * 1025}),
    "attr str with NUL": ("t", "x", {"a": "x\x00"}),
    "attr str with a lone surrogate": ("t", "x", {"a": "\udc80"}),
    "attr int over 64 bits": ("t", "x", {"a": 2**63}),
    "attr int under 64 bits": ("t", "x", {"a": -(2**63) - 1}),
    "attr float nan": ("t", "x", {"a": float("nan")}),
    "attr float inf": ("t", "x", {"a": float("-inf")}),
    "event over 16 KiB": ("t", "x", {f"a{i}": "\x01" * 1000 for i in range(3)}),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_every_bad_event_is_rejected_and_counted(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    event_type, event_name, attrs = REJECTED[case]
    buffer = make()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        buffer.record(event_type, event_name, dict(attrs))
        buffer.record(event_type, event_name, dict(attrs))
    snapshot = buffer.take()
    assert snapshot.events == []
    assert snapshot.rejected == 2
    [warning] = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    # Whatever the app passed, the line can be written to a UTF-8 log and forges no line.
    warning.encode("utf-8")
    assert warning.isprintable()


def test_the_largest_acceptable_event_is_kept() -> None:
    buffer = make()
    attrs = {f"a{i}": "x" * 1024 for i in range(14)}
    record(buffer, "t", "x", **attrs)
    [event] = buffer.take().events
    assert len(json.dumps(event).encode()) <= MAX_EVENT_BYTES


def test_one_warning_per_type_and_name(caplog: pytest.LogCaptureFixture) -> None:
    buffer = make()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for _ in range(3):
            record(buffer, "a", "x", bad=[1])
            record(buffer, "a", "y", bad=[1])
            record(buffer, "a", "x", other={})
    assert len(caplog.records) == 2
    assert buffer.take().rejected == 9


def test_a_good_event_after_a_bad_one_of_the_same_name_is_kept() -> None:
    buffer = make()
    record(buffer, "a", "x", value="y" * 2000)
    record(buffer, "a", "x", value="y")
    record(buffer, "a", "x", value="y" * 2000)
    snapshot = buffer.take()
    assert [e["value"] for e in snapshot.events] == ["y"]
    assert snapshot.rejected == 2


def test_log_is_an_event_of_type_log_named_by_level() -> None:
    buffer = make(log_level="trace")
    for level in LEVELS:
        buffer.log(level, f"at {level}", {"code": 7}, None)
    events = buffer.take().events
    assert [(e["event_type"], e["event_name"], e["message"], e["code"]) for e in events] == [
        ("log", level, f"at {level}", 7) for level in LEVELS
    ]


@pytest.mark.parametrize("threshold", LEVELS)
def test_log_below_the_threshold_records_nothing(threshold: str) -> None:
    buffer = make(log_level=threshold)
    for level in LEVELS:
        buffer.log(level, "m", {}, None)
    snapshot = buffer.take()
    assert [e["event_name"] for e in snapshot.events] == list(
        LEVELS[: LEVELS.index(threshold) + 1]
    )
    assert snapshot.rejected == 0


@pytest.mark.parametrize("level", ["warning", "INFO", "fatal", None, ["info"], 3])
def test_an_unknown_level_is_rejected(level: object) -> None:
    buffer = make()
    buffer.log(level, "m", {}, None)
    assert buffer.take() == ([], 1, 0)


def test_parse_log_level_refuses_unknown_levels() -> None:
    assert parse_log_level("debug") == "debug"
    with pytest.raises(ValueError, match="log_level"):
        parse_log_level("warning")
    with pytest.raises(ValueError, match="log_level"):
        EventBuffer(log_level="loud")


def test_the_message_wins_over_an_attribute_named_message() -> None:
    buffer = make()
    buffer.log("error", "the message", {"message": "attr"}, {"message": "bound", "svc": "a"})
    [event] = buffer.take().events
    assert event["message"] == "the message" and event["svc"] == "a"


def test_max_events_bounds_the_buffer_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = make(max_events=3)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for number in range(10):
            record(buffer, "metric", "n", n=number)
    snapshot = buffer.take()
    assert [e["n"] for e in snapshot.events] == [0, 1, 2]
    assert snapshot.dropped_events == 7 and snapshot.rejected == 0
    assert len([r for r in caplog.records if "max_events=3" in r.getMessage()]) == 1
    record(buffer, "metric", "n", n=10)  # room again, and the counts start from zero
    snapshot = buffer.take()
    assert [e["n"] for e in snapshot.events] == [10] and snapshot.dropped_events == 0


def test_threads_racing_past_the_room_check_are_trimmed_and_counted_at_take(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ``record`` takes no lock: threads that all saw room may overshoot ``max_events``
    # by a few. That state, made here by lowering the bound after the appends:
    buffer = make(max_events=10)
    for number in range(6):
        record(buffer, "metric", "n", n=number)
    buffer.max_events = 4
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        snapshot = buffer.take()
    assert [e["n"] for e in snapshot.events] == [0, 1, 2, 3]  # the first ones stay
    assert snapshot.dropped_events == 2 and snapshot.rejected == 0
    assert len([r for r in caplog.records if "max_events=4" in r.getMessage()]) == 1


@pytest.mark.parametrize("max_events", [100_000, 1_000])
def test_records_from_many_threads_are_each_kept_or_counted_once(max_events: int) -> None:
    buffer = make(max_events=max_events)
    threads, calls = 8, 5_000
    start = threading.Barrier(threads)

    def worker(number: int) -> None:
        start.wait()
        for call in range(calls):
            record(buffer, "metric", "n", thread=number, call=call)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    snapshot = buffer.take()
    kept = [(event["thread"], event["call"]) for event in snapshot.events]
    assert len(kept) == min(max_events, threads * calls) and len(set(kept)) == len(kept)
    assert len(kept) + snapshot.dropped_events == threads * calls
    for number in range(threads):  # each thread's events in its call order
        mine = [call for thread, call in kept if thread == number]
        assert mine == sorted(mine)


def test_the_event_list_is_emptied_in_place_never_replaced() -> None:
    # ``record`` appends to the list it read without a lock: a list swapped out
    # under it would lose that event. (A forked child starts a new one.)
    buffer = make()
    events = buffer._events
    record(buffer, "metric", "n", n=1)
    buffer.take()
    record(buffer, "metric", "n", n=2)
    buffer.set_disabled_keys(["events:behavioral"])
    buffer.reset()
    assert buffer._events is events and not events


def test_the_filter_sees_the_wire_form_and_a_false_answer_drops_silently() -> None:
    seen: List[Dict[str, Any]] = []

    def keep_logins(event: Dict[str, Any]) -> bool:
        seen.append(dict(event))
        return bool(event["event_name"] == "login")

    buffer = make(event_filter=keep_logins)
    record(buffer, "behavioral", "login", user="u")
    record(buffer, "behavioral", "page", path="/secret")
    snapshot = buffer.take()
    assert [e["event_name"] for e in snapshot.events] == ["login"]
    assert snapshot.rejected == 0 and snapshot.dropped_events == 0
    assert seen[0]["event_id"] == snapshot.events[0]["event_id"]
    assert seen[0]["event_time"] == WALL_TEXT
    assert seen[1] == {**seen[1], "event_type": "behavioral", "path": "/secret"}


def test_a_filter_that_raises_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: Dict[str, Any]) -> bool:
        raise KeyError("oops")

    buffer = make(event_filter=broken)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        record(buffer, "behavioral", "login")
        assert buffer.record_raw(
            {"event_id": "a" * 32, "event_time": WALL_TEXT, "event_type": "b", "event_name": "c"}
        ) is False
    assert buffer.take() == ([], 2, 0)
    assert any("event_filter raised KeyError" in r.getMessage() for r in caplog.records)


def test_a_filter_cannot_change_what_is_sent() -> None:
    def meddle(event: Dict[str, Any]) -> bool:
        event["user"] = "changed"
        event["event_id"] = "0" * 32
        return True

    buffer = make(event_filter=meddle)
    record(buffer, "behavioral", "login", user="u")
    [event] = buffer.take().events
    assert event["user"] == "u" and event["event_id"] != "0" * 32


@pytest.mark.parametrize(
    ("disabled", "kept"),
    [
        ({"events"}, []),
        ({"events:behavioral"}, ["log/info", "metric/size"]),
        ({"events:behavioral:login"}, ["behavioral/logout", "log/info", "metric/size"]),
        ({"events:log"}, ["behavioral/login", "behavioral/logout", "metric/size"]),
        ({"other", "events:metric:other"},
         ["behavioral/login", "behavioral/logout", "log/info", "metric/size"]),
    ],
)
def test_disabled_event_keys(disabled: set[str], kept: List[str]) -> None:
    def fill(buffer: EventBuffer) -> None:
        record(buffer, "behavioral", "login")
        record(buffer, "behavioral", "logout")
        buffer.log("info", "m", {}, None)
        record(buffer, "metric", "size", bytes=3)

    def names(buffer: EventBuffer) -> List[str]:
        snapshot = buffer.take()
        assert snapshot.rejected == 0 and snapshot.dropped_events == 0
        return [f"{e['event_type']}/{e['event_name']}" for e in snapshot.events]

    from_start = make(disabled_keys=disabled)
    fill(from_start)
    assert names(from_start) == kept

    later = make()
    fill(later)  # buffered, then disabled: dropped from the buffer
    later.set_disabled_keys(disabled)
    assert names(later) == kept
    later.set_disabled_keys(())
    fill(later)
    assert len(names(later)) == 4


def test_record_raw_keeps_the_id_and_time() -> None:
    buffer = make()
    event = {"event_id": "0123456789abcdef0123456789abcdef", "event_time": "2026-11-23T10:00:00.5Z",
             "event_type": "behavioral", "event_name": "deploy-start", "project": "p"}
    assert buffer.record_raw(event) is True
    assert buffer.take().events == [{**event, "event_time": "2026-11-23T10:00:00.500000Z"}]


def test_record_raw_normalizes_uuid_ids_and_offsets() -> None:
    buffer = make()
    assert buffer.record_raw({
        "event_id": "0123ABCD-89ab-cdef-0123-456789ABCDEF",
        "event_time": "2026-11-23T12:00:00.123456789+02:00",
        "event_type": "behavioral", "event_name": "x",
    })
    [event] = buffer.take().events
    assert event["event_id"] == "0123abcd89abcdef0123456789abcdef"
    assert event["event_time"] == "2026-11-23T10:00:00.123456Z"


RAW_OK: Dict[Any, Any] = {
    "event_id": "f" * 32, "event_time": WALL_TEXT, "event_type": "t", "event_name": "n",
}


@pytest.mark.parametrize(
    "event",
    [
        None,
        ["event_id"],
        {k: v for k, v in RAW_OK.items() if k != "event_id"},
        {k: v for k, v in RAW_OK.items() if k != "event_time"},
        {k: v for k, v in RAW_OK.items() if k != "event_type"},
        {k: v for k, v in RAW_OK.items() if k != "event_name"},
        {**RAW_OK, "event_id": "F" * 31},
        {**RAW_OK, "event_id": 12},
        {**RAW_OK, "event_time": "2026-11-23 10:00"},
        {**RAW_OK, "event_time": "2026-13-23T10:00:00Z"},
        {**RAW_OK, "event_time": 1.5},
        {**RAW_OK, "event_type": ""},
        {**RAW_OK, "event_extra": 1},
        {**RAW_OK, "nested": {"a": 1}},
        {**RAW_OK, "ok": 1, 7: "not a str name"},
    ],
)
def test_record_raw_refuses_a_bad_event(event: object, caplog: pytest.LogCaptureFixture) -> None:
    buffer = make()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        assert buffer.record_raw(event) is False
    assert buffer.take() == ([], 1, 0)
    assert len(caplog.records) == 1


def test_a_recorder_binds_attributes_and_the_call_wins() -> None:
    buffer = make(log_level="debug")
    client = _Client(buffer)
    service = Recorder(client, {"service": "api", "region": "eu"})
    request = service.with_attrs(request="r1", region="us")
    request.record("behavioral", "login", region="ap", user="u")
    request.log("debug", "hi")
    service.record("metric", "m")
    assert request.record_raw({**RAW_OK, "service": "ui"})
    events = buffer.take().events
    assert [{k: v for k, v in e.items() if not k.startswith("event_")} for e in events] == [
        {"service": "api", "region": "ap", "request": "r1", "user": "u"},
        {"service": "api", "region": "us", "request": "r1", "message": "hi"},
        {"service": "api", "region": "eu"},
        {"service": "ui", "region": "us", "request": "r1"},
    ]


def test_a_recorder_is_immutable_and_keeps_a_copy() -> None:
    attrs = {"a": 1}
    recorder = Recorder(_Client(make()), attrs)
    attrs["a"] = 2
    assert dict(recorder.attrs) == {"a": 1}
    chained = recorder.with_attrs(b=2)
    assert dict(recorder.attrs) == {"a": 1} and dict(chained.attrs) == {"a": 1, "b": 2}
    with pytest.raises(AttributeError):
        recorder._attrs = {}
    with pytest.raises(TypeError):
        recorder.attrs["a"] = 3  # type: ignore[index]


def test_a_recorder_follows_its_clients_current_target() -> None:
    from telemetry._events import NULL_EVENTS

    client = _Client(NULL_EVENTS)
    recorder = Recorder(client, {"a": 1})
    recorder.record("t", "before")
    buffer = make()
    client.event_target = buffer
    recorder.record("t", "after")
    assert [e["event_name"] for e in buffer.take().events] == ["after"]


def test_after_fork_the_child_starts_empty_with_a_new_lock() -> None:
    buffer = make()
    record(buffer, "t", "parent")
    buffer._lock.acquire()  # as if a parent thread were inside a call
    buffer.after_fork_in_child()
    record(buffer, "t", "child")
    assert [e["event_name"] for e in buffer.take().events] == ["child"]


def test_a_wall_clock_out_of_range_loses_the_event_not_the_payload() -> None:
    times = iter([1e300, WALL])
    buffer = EventBuffer(wall_clock=lambda: next(times))
    record(buffer, "t", "far")
    record(buffer, "t", "now")
    snapshot = buffer.take()
    assert [e["event_name"] for e in snapshot.events] == ["now"]
    assert snapshot.rejected == 1


ATTR_CASES = sorted(case for case in REJECTED if case.startswith(("attr", "event over")))


@pytest.mark.parametrize("case", ATTR_CASES)
def test_bad_attributes_of_a_known_type_and_name_are_rejected_when_taken(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, attrs = REJECTED[case]
    buffer = make()
    record(buffer, "t", "x", ok=1)  # checked in full: the next ones take the quick path
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        buffer.record("t", "x", dict(attrs))
        buffer.record("t", "x", dict(attrs))
        record(buffer, "t", "x", ok=2)
        snapshot = buffer.take()
    assert [e["ok"] for e in snapshot.events] == [1, 2]
    assert snapshot.rejected == 2
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1


def test_taking_many_events_starts_no_garbage_collection() -> None:
    """A taken event is its JSON text, which the cyclic collector does not track: a dict
    per event would start a collection every few hundred events (the default
    threshold is 700 tracked objects), on the emitter's thread, holding the GIL."""
    buffer = make(max_events=5000)
    for number in range(5000):
        record(buffer, "behavioral", f"click-{number % 50}", page=f"/page/{number % 100}", n=number)
    started: List[int] = []

    def watch(phase: str, info: Dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        snapshot = buffer.take()
    finally:
        gc.callbacks.remove(watch)
    assert len(started) <= 1  # the count may already have been near the threshold
    assert len(snapshot.events) == 5000 and snapshot.events[4999]["n"] == 4999
    assert isinstance(snapshot.events, EncodedEvents)
    assert not any(gc.is_tracked(text) for text in snapshot.events.texts)
