"""Reliability suite: faults, hostile input and load, with nothing lost and nothing counted twice.

Each test drives the real client against the real ``server_stub`` over loopback.
Time is virtual (``make_client`` + ``VirtualTime``) wherever the client waits;
only the server's scripted delays and the client's short ``send_timeout`` are real.
Randomness is seeded: the fault mixes by the seeds in their test ids, the Hypothesis
properties by ``derandomize`` (the same examples every run, so CI is repeatable; run
them with more examples and ``--hypothesis-seed`` by hand to explore further).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, NoReturn, Optional, Tuple

import pytest
from _net import RawAnswer, raw_http
from conftest import VirtualTime, dead_endpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import telemetry
from server_stub import Server, serve
from telemetry._wire import decode_payload, encode_payload

MakeClient = Callable[..., telemetry.Client]
NS = 1_000_000_000


def updates_of(server: Server, instance_id: object) -> int:
    return sum(1 for r in server.requests if r.path == f"/v1/update/{instance_id}")


# -- a seeded random mix of server faults ------------------------------------------------


class Fault(NamedTuple):
    """One scripted answer (the keyword arguments of ``Server.script``) and its class."""

    kind: str
    script: Dict[str, Any]


RETRY_AFTER_MAX = 5  # seconds; 429 and 503 ask for at most this
SLOW_DELAY = 1.0  # seconds the server holds a "slow" answer (the client gives up at 0.2)
SEND_TIMEOUT = 0.2


def random_faults(rng: random.Random, count: int) -> List[Fault]:
    """``count`` scripted answers drawn from every fault class (``500-burst`` gives several)."""
    kinds = [
        "ok", "500-burst", "503-retry-after", "429", "408", "slow", "drop",
        "drop-after-store", "html-200", "wrong-shape", "odd-next-update",
    ]
    faults: List[Fault] = []
    while len(faults) < count:
        kind = rng.choice(kinds)
        if kind == "ok":
            faults.append(Fault(kind, {}))
        elif kind == "500-burst":
            # A 500 may come after the server stored the payload (a crash after commit).
            for _ in range(rng.randint(2, 6)):
                faults.append(Fault(kind, {"status": 500, "store": rng.random() < 0.3}))
        elif kind == "503-retry-after":
            faults.append(Fault(kind, {"status": 503, "store": rng.random() < 0.3,
                                       "headers": {"Retry-After": str(rng.randint(0, 3))}}))
        elif kind == "429":
            form = rng.choice(["seconds", "next_update", "none"])
            seconds = rng.randint(0, RETRY_AFTER_MAX)
            script: Dict[str, Any] = {"status": 429}
            if form == "seconds":
                script["headers"] = {"Retry-After": str(seconds)}
            elif form == "next_update":
                script["body"] = {"next_update": seconds * NS}
            faults.append(Fault(kind, script))
        elif kind == "408":
            faults.append(Fault(kind, {"status": 408}))
        elif kind == "slow":
            # Answered (and, without a status, stored) after the client gave up.
            status = rng.choice([None, 200, 500])
            faults.append(Fault(kind, {"status": status, "delay": SLOW_DELAY,
                                       "store": status == 200}))
        elif kind == "drop":
            faults.append(Fault(kind, {"drop": True}))
        elif kind == "drop-after-store":
            faults.append(Fault(kind, {"drop_after_store": True}))
        elif kind == "html-200":
            # Not a JSON object: a failed attempt, whether or not the server stored it.
            faults.append(Fault(kind, {"status": 200, "body": b"<html>",
                                       "headers": {"Content-Type": "text/html"},
                                       "store": rng.random() < 0.5}))
        elif kind == "wrong-shape":
            body = rng.choice([[1, 2], {"stop": "yes"}, {"disable_keys": 5},
                               {"enable_keys": [1]}, {"error": 7}, "text", None, 3])
            # A JSON object (its bad fields ignored) or an empty body is a delivery: the
            # server must have stored it. Anything else is retried, stored or not.
            store = body is None or isinstance(body, dict) or rng.random() < 0.5
            faults.append(Fault(kind, {"status": 200, "body": body, "store": store}))
        else:  # odd-next-update: a delivery whose schedule hint is useless
            value = rng.choice([0, -5 * NS, 10**18, "soon", 1.5, 10**30, 10**400, None])
            faults.append(Fault(kind, {"status": rng.choice([200, 201, 202]),
                                       "body": {"next_update": value}, "store": True}))
    return faults[:count]


class SteppedTime(VirtualTime):
    """``VirtualTime`` that also tells when the emitter is parked: in a wait that ends
    past the horizon, so nothing happens until a flush, a stop or ``advance``."""

    def __init__(self) -> None:
        super().__init__()
        self.parked_on: Optional[threading.Event] = None
        self._park = threading.Condition()

    def wait(self, event: threading.Event, seconds: float) -> None:
        with self._park:
            self.waits.append(seconds)
            end = self.now + seconds
            while end > self.horizon and not event.is_set():
                self.parked_on = event
                self._park.notify_all()
                self._park.wait(0.01)  # the event is set without telling us: poll it
            self.parked_on = None
            if end <= self.horizon:
                self.now = max(self.now, end)

    def advance(self, seconds: float) -> None:
        with self._park:
            self.horizon = self.now + seconds
            self.parked_on = None
            self._park.notify_all()

    def wait_parked(self, timeout: float) -> Optional[threading.Event]:
        """The event the emitter is parked on, once it is; None at ``timeout``."""
        with self._park:
            self._park.wait_for(lambda: self.parked_on is not None, timeout)
            return self.parked_on


CYCLE_HORIZON = 500.0  # room for every backoff of a cycle; under 900, the shortest interval


def run_cycle(client: telemetry.Client, clock: SteppedTime) -> bool:
    """One cycle now, through ``flush``; returns with the emitter parked again.

    Virtual time lets the cycle's backoffs pass, and a 429 wait the emitter is holding
    (which a flush never cuts short), but not the 1000 s interval after it.
    """
    emitter = client._emitter
    assert emitter is not None
    rate_limited = max(0.0, emitter._not_before - clock.now)
    clock.advance(rate_limited + CYCLE_HORIZON)
    delivered = client.flush(timeout=10)
    assert settled(client, clock), f"the emitter never settled: {emitter_state(client)}"
    return delivered


def settled(client: telemetry.Client, clock: SteppedTime, timeout: float = 10.0) -> bool:
    """Wait until the emitter is parked between cycles, or its thread has ended (a stop).

    Parked in a retry's backoff is mid-cycle: time is let run until that cycle is over.
    """
    emitter = client._emitter
    assert emitter is not None
    for _ in range(int(timeout / 0.05)):
        parked_on = clock.wait_parked(0.05)
        if parked_on is emitter._wakeup:
            return True
        if parked_on is not None:  # a backoff, on the stop event
            clock.advance(CYCLE_HORIZON)
        thread = emitter._thread
        if thread is None or not thread.is_alive():
            return True
    return False


def emitter_state(client: telemetry.Client) -> str:
    """Where the emitter thread is, for a failure message."""
    emitter = client._emitter
    thread = emitter._thread if emitter is not None else None
    if thread is None or not thread.is_alive():
        return "no emitter thread running"
    frame = sys._current_frames().get(thread.ident or 0)
    return "".join(traceback.format_stack(frame)) if frame is not None else "running"


SEEDS = [11, 2024, 31337, 424242, 9001]
FAULTS_PER_SEED = 40
ROUNDS = 12  # collection rounds run alongside the faults
BATCH = 250  # calls of each kind per thread and round
THREADS = 4


def expected_totals() -> Dict[str, Any]:
    calls = THREADS * ROUNDS * BATCH
    return {
        "calls": calls,
        "bytes": sum((worker + 1) * ROUNDS * BATCH for worker in range(THREADS)),
        "worker": [{"value": w, "count": ROUNDS * BATCH} for w in range(THREADS)],
        # The server lists a counting set's values in the order of their JSON text.
        "round": [{"value": r, "count": THREADS * BATCH} for r in sorted(range(ROUNDS), key=str)],
    }


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed={seed}" for seed in SEEDS])
def test_random_server_faults_lose_nothing_and_count_nothing_twice(
    make_client: MakeClient, telemetry_server: Server, seed: int
) -> None:
    clock = SteppedTime()
    faults = random_faults(random.Random(seed), FAULTS_PER_SEED)
    for fault in faults:
        telemetry_server.script(**fault.script)
    client = make_client(
        send_timeout=SEND_TIMEOUT,
        default_interval=1000.0,
        min_interval=1000.0,  # cycles run on flush() only: each round is one cycle
        max_interval=1000.0,
        max_pending=64,  # beyond SPEC's default of 8: losing the oldest is counted, not lost
        rng=random.Random(seed),
        clock=clock.clock,
        wait=clock.wait,
    )
    barrier = threading.Barrier(THREADS + 1, timeout=30)
    failures: List[BaseException] = []

    def collect(worker: int) -> None:
        try:
            for round_ in range(ROUNDS):
                barrier.wait()
                for _ in range(BATCH):
                    client.increment("calls")
                    client.add("bytes", worker + 1)
                    client.append_unique("worker", worker)
                    client.append_unique("round", round_)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=collect, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    client.start_emitting()
    # Once parked between cycles, the first (unrequested) cycle is over: from here on,
    # every cycle is one flush(), and a flush waits for exactly its own cycle.
    assert settled(client, clock), emitter_state(client)
    # Each round: the threads collect while the emitter runs a cycle through the faults.
    for _ in range(ROUNDS):
        barrier.wait()
        run_cycle(client, clock)
    for thread in threads:
        thread.join(30)
    assert not failures, failures
    # Let the rest of the script run out: each cycle answers at least one scripted request.
    cycles = 0
    while telemetry_server.scripts_pending and cycles < FAULTS_PER_SEED:
        client.increment("drain")  # something to send, or flush() makes no request
        run_cycle(client, clock)
        cycles += 1
    assert telemetry_server.scripts_pending == 0, f"script not used up after {cycles} cycles"
    # The faults have stopped: delivery completes within two more cycles.
    delivered = run_cycle(client, clock) or run_cycle(client, clock)
    client.stop_emitting(timeout=5)

    plan = Counter(fault.kind for fault in faults)
    stats = telemetry_server.stats()
    assert delivered, f"seed {seed}: not delivered; plan {dict(plan)}"
    expected = expected_totals()
    if cycles:
        expected["drain"] = cycles
    assert stats["keys"] == dict(sorted(expected.items())), f"seed {seed}; plan {dict(plan)}"
    assert stats["dropped"] == 0
    state = client._state
    assert state is not None and state.spooled() == []


@pytest.mark.parametrize("status", [200, 429])
def test_a_next_update_too_big_for_a_float_is_the_longest_wait(
    make_client: MakeClient, telemetry_server: Server, virtual_time: VirtualTime, status: int
) -> None:
    # Found by the fuzz below: 10**400 / 1e9 raised OverflowError, which killed the
    # emitter thread after a 200, and turned a 429 into an immediate retry.
    telemetry_server.script(status=status, body={"next_update": 10**400}, store=status == 200)
    client = make_client(max_interval=600.0)
    client.increment("x")
    client.start_emitting()
    assert virtual_time.wait_for_waits(1)
    assert virtual_time.waits[0] == pytest.approx(600.0, rel=0.1)
    assert updates_of(telemetry_server, client.instance_id) == 1  # not retried at once
    emitter = client._emitter
    assert emitter is not None and emitter._thread is not None and emitter._thread.is_alive()


def test_the_seeds_cover_every_fault_class() -> None:
    kinds = Counter(
        fault.kind
        for seed in SEEDS
        for fault in random_faults(random.Random(seed), FAULTS_PER_SEED)
    )
    assert set(kinds) == {
        "ok", "500-burst", "503-retry-after", "429", "408", "slow", "drop",
        "drop-after-store", "html-200", "wrong-shape", "odd-next-update",
    }, kinds


# -- fuzz: whatever the server answers ------------------------------------------------------


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_ANY_INT = st.integers() | st.sampled_from([0, -1, 10**18, 2**63, 2**64, 10**30, 10**400])
# Shaped like a response, with every field's value drawn from anything JSON.
_RESPONSE_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "next_update": _ANY_INT | _JSON,
        "stop": st.booleans() | _JSON,
        "error": st.text(max_size=40) | _JSON,
        "disable_keys": st.lists(st.text(max_size=6), max_size=3) | _JSON,
        "enable_keys": st.lists(st.text(max_size=6), max_size=3) | _JSON,
        "extra": _JSON,
    },
)
_BODIES = (
    st.none()
    | st.binary(max_size=64)
    | _JSON
    | _RESPONSE_LIKE
    | _RESPONSE_LIKE.map(lambda value: json.dumps(value).encode())
    | st.sampled_from([b"<html>", b"{", b"null", b'{"next_update": 1e999}', b"[" * 5000,
                       b'{"next_update": ' + b"9" * 5000 + b"}", b"\xff\xfe", b" " * 10])
)
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                     blacklist_characters="\x7f"), max_size=40)
_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Retry-After": _HEADER_TEXT
        | st.integers(-5, 10**30).map(str)
        | st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
                           "Mon, 01 Jan 0001 00:00:00 +2359", "1e9", "0x10", "-1", ""]),
        "Content-Type": _HEADER_TEXT | st.sampled_from(["application/json", "text/html"]),
        "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "x"]),
        "Location": _HEADER_TEXT,
        "X-Anything": _HEADER_TEXT,
    },
)
_STATUSES = st.sampled_from(
    [200, 201, 202, 204, 299, 301, 302, 304, 307, 308, 400, 401, 404, 408, 410, 413, 415,
     422, 429, 451, 499, 500, 502, 503, 504, 599]
)
STOPPING = (410, 451)


def _stores(status: int) -> bool:
    """Scripted 2xx answers store the payload (the client may take it as delivered: a
    server answering 2xx without storing would lose data whatever the client does)."""
    return 200 <= status < 300


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(answers=st.lists(st.tuples(_STATUSES, _BODIES, _HEADERS), min_size=1, max_size=2))
def test_any_server_answer_never_raises_nor_kills_the_emitter(
    make_client: MakeClient, tmp_path: Path, fail_on_internal_errors: List[BaseException],
    answers: List[Tuple[int, Any, Dict[str, str]]],
) -> None:
    # A server and state of its own: an example cut short by a stop leaves neither
    # scripted answers nor a remembered stop to the next.
    with serve() as server:
        check_any_answer(make_client, server, tmp_path / uuid.uuid4().hex,
                         fail_on_internal_errors, answers)


def check_any_answer(
    make_client: MakeClient, telemetry_server: Server, state_dir: Path,
    fail_on_internal_errors: List[BaseException],
    answers: List[Tuple[int, Any, Dict[str, str]]],
) -> None:
    clock = SteppedTime()
    client = make_client(
        endpoint=telemetry_server.url, state_dir=state_dir,
        default_interval=1000.0, min_interval=1000.0, max_interval=1000.0,
        clock=clock.clock, wait=clock.wait,
    )
    for status, body, headers in answers:
        telemetry_server.script(status=status, body=body, headers=headers,
                                store=_stores(status))
    calls = 0

    def collect() -> None:
        nonlocal calls
        client.increment(f"fuzzed-{calls}")  # one item each: lost or stored, never merged
        calls += 1

    collect()
    client.start_emitting()
    assert settled(client, clock), emitter_state(client)
    while telemetry_server.scripts_pending and not client.status().server_stopped:
        collect()
        run_cycle(client, clock)
    assert fail_on_internal_errors == []
    if client.status().server_stopped:  # only JSON true or 410/451 may stop it
        assert any(status in STOPPING or (200 <= status < 300 and _says_stop(body))
                   for status, body, _ in answers), answers
        client.stop_emitting(timeout=1)
        return
    emitter = client._emitter
    assert emitter is not None and emitter._thread is not None and emitter._thread.is_alive()
    # A normal answer is delivered again, and nothing was lost without being counted.
    client.increment("probe")
    assert run_cycle(client, clock) or run_cycle(client, clock)
    client.stop_emitting(timeout=1)
    mine = [p for p in telemetry_server.stored_payloads()
            if p["instance_id"] == str(client.instance_id)]
    stored = Counter(key for p in mine for key in p["data"])
    assert stored["probe"] == 1
    assert all(count == 1 for count in stored.values()), stored  # nothing twice
    # Nothing lost without being counted. (A payload the server stored while answering
    # with a retry, then refused for good with a 4xx, is counted as dropped too.)
    dropped = sum(p["client"]["dropped"] for p in mine)
    delivered = sum(1 for key in stored if key.startswith("fuzzed-"))
    assert delivered <= calls <= delivered + dropped


def _says_stop(body: Any) -> bool:
    if isinstance(body, bytes):
        try:
            body = json.loads(body)
        except ValueError:
            return False
    return isinstance(body, dict) and body.get("stop") is True


# -- fuzz: whatever the application collects ------------------------------------------------


class _StrKey(str):
    pass


class _HugeInt(int):
    """An int with more digits than ``str(int)`` allows (4300), and a short repr."""

    def __repr__(self) -> str:
        return f"_HugeInt(~{self.bit_length()} bits)"


def _nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


_KEYS: st.SearchStrategy[Any] = (
    st.text(max_size=8)
    | st.sampled_from(["k", "k:sub", "x" * 256, "x" * 257, "", "\ud800", "é:ü", "a b"])
    | st.builds(_StrKey, st.text(min_size=1, max_size=4))
    | st.sampled_from([None, 5, 1.5, b"k", ("k",), frozenset()])
)
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([2**64, -(2**63), -0.0, 5e-324, 1.7976931348623157e308,
                       "\ud800", "\x00", "x" * 1025, "\u2028"])
)
# More digits than str(int) allows: accepted by the buffer as a scalar, unencodable.
_HUGE_INTS = st.sampled_from([10**5000, -(10**4400)]).map(_HugeInt)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=3) | st.tuples(children)
    | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3),
    max_leaves=8,
) | st.sampled_from([object(), {1, 2}, b"bytes", 1j, _nested(33), _nested(31)]) | _HUGE_INTS
_CALLS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), _KEYS, _VALUES),
        st.tuples(st.just("set_nested"), _KEYS, _KEYS, _VALUES),
        st.tuples(st.just("add"), _KEYS, st.integers() | _SCALARS | _HUGE_INTS),
        st.tuples(st.just("increment"), _KEYS),
        st.tuples(st.just("append"), _KEYS, _VALUES),
        st.tuples(st.just("append_unique"), _KEYS, _VALUES),
        st.just(("reset",)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(calls=_CALLS)
def test_any_collection_call_is_delivered_intact(
    make_client: MakeClient, telemetry_server: Server,
    fail_on_internal_errors: List[BaseException], calls: List[Tuple[Any, ...]],
) -> None:
    client = make_client(max_items=50, max_values_per_key=5)
    client.start_emitting()
    seen = len(telemetry_server.requests)
    for call in calls:
        getattr(client, call[0])(*call[1:])  # never raises
    assert client.flush(timeout=10)
    assert fail_on_internal_errors == []
    emitter = client._emitter
    assert emitter is not None and emitter._thread is not None and emitter._thread.is_alive()
    sent = [r for r in telemetry_server.requests[seen:] if r.path.startswith("/v1/update/")]
    stored = {p["payload_id"]: p for p in telemetry_server.stored_payloads()}
    for request in sent:
        assert request.status == 200, (request.status, request.decoded_body)
        assert request.decoded_body is not None
        payload = decode_payload(request.decoded_body)  # the client's own codec agrees
        assert json.loads(encode_payload(payload)) == request.json
        assert stored[payload.payload_id]["data"] == request.json["data"]
    client.stop_emitting(timeout=1)


def test_an_int_too_long_to_encode_drops_only_its_key(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by the fuzz above: json refuses an int of more than 4300 digits; encoding
    # raised ValueError and killed the emitter thread. The buffer now refuses such a
    # value ("huge"), but a counter can still grow past it ("grown").
    client = make_client()
    client.set("huge", 10**5000)
    for _ in range(10):
        client.add("grown", 10**4299)  # each fits; the sum (4301 digits) does not
    client.increment("kept")
    client.start_emitting()
    assert client.flush(timeout=5)
    client.increment("after")
    assert client.flush(timeout=5)
    stats = telemetry_server.stats()
    assert stats["keys"] == {"after": 1, "kept": 1}
    assert stats["dropped"] == 2  # huge and grown, one item each
    assert "cannot be encoded" in caplog.text


def test_an_int_too_long_to_encode_never_reaches_the_spool(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(endpoint=dead_endpoint())
    client.start_emitting()
    for _ in range(10):
        client.add("grown", 10**4299)  # each fits; the sum (4301 digits) does not
    client.increment("kept")
    client.stop_emitting(timeout=0.5)  # the last data was never encoded: now it is
    state = client._state
    assert state is not None
    spooled = state.spooled()
    assert [key for payload in spooled for key in payload.data] == ["kept"]
    # The drop is counted: on the spooled payload, or carried by the next one.
    assert sum(payload.dropped for payload in spooled) + client._buffer.dropped == 1
    assert "cannot be encoded" in caplog.text


def test_an_int_too_long_to_encode_inside_a_container_is_a_rejected_value(
    make_client: MakeClient, fail_on_internal_errors: List[BaseException]
) -> None:
    client = make_client()
    client.append("list", [10**5000])
    client.set("mapping", {"n": 10**5000})
    client.set("scalar", -(10**5000))
    client.add("counter", 10**5000)
    errors = list(fail_on_internal_errors)
    fail_on_internal_errors.clear()  # reported here, not by the fixture
    assert errors == []
    payload = client.take_payload()
    assert payload is not None and payload.data == {} and payload.dropped == 4


# -- process faults: SIGKILL mid-send ----------------------------------------------------------


CHILD_APP = textwrap.dedent(
    """
    import sys, threading, telemetry
    role, instance, endpoint, state_dir = sys.argv[1:5]
    telemetry.init(instance, app="killapp", endpoint=endpoint, consent=True,
                   state_dir=state_dir, send_timeout=30)
    if role == "spool":  # the server is unreachable: everything goes to the spool
        for _ in range(7):
            telemetry.increment("spooled")
        telemetry.append_unique("from", "first")
        telemetry.start_emitting()
        telemetry.stop_emitting(timeout=1.0)
    elif role == "killed":  # claims the spool and sends it; killed while the server holds it
        telemetry.start_emitting()
        threading.Event().wait()
    else:  # "deliver"
        telemetry.start_emitting()
        delivered = telemetry.flush(10)
        telemetry.stop_emitting(timeout=2.0)
        sys.exit(0 if delivered else 3)
    """
)


def run_child(
    role: str, instance: uuid.UUID, endpoint: str, state_dir: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DO_NOT_TRACK")}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_APP, role, str(instance), endpoint, str(state_dir)],
        env=env,
    )


def spool_files(state_dir: Path) -> List[str]:
    spool = state_dir / "killapp" / "state" / "telemetry-spool"
    return sorted(os.listdir(spool)) if spool.exists() else []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("held", ["then-stored", "then-dropped"])
def test_killed_mid_send_the_spooled_data_is_delivered_exactly_once(
    telemetry_server: Server, tmp_path: Path, held: str
) -> None:
    instance, state_dir = uuid.uuid4(), tmp_path / "state"
    # 1. An app that cannot reach the server stops: its data is handed to the spool.
    first = run_child("spool", instance, dead_endpoint(), state_dir)
    assert first.wait(30) == 0
    (spooled,) = spool_files(state_dir)
    # 2. The next start claims the spool file and sends it; the server holds the
    #    request (and later stores it, or drops it); the app is SIGKILLed meanwhile.
    telemetry_server.script(delay=1.5, drop=held == "then-dropped")
    killed = run_child("killed", instance, telemetry_server.url, state_dir)
    try:
        assert telemetry_server.wait_for(lambda: telemetry_server.scripts_pending == 0, 30)
        assert spool_files(state_dir) == [f"{spooled}.claimed-{killed.pid}"]
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)  # reaped: its pid is dead, not a zombie that still "exists"
    # 3. The next start takes over the dead process's claim and delivers it.
    third = run_child("deliver", instance, telemetry_server.url, state_dir)
    assert third.wait(30) == 0
    # Both sends of the payload have been answered (the held one last, or first).
    assert telemetry_server.wait_for_requests(2, timeout=10)
    held_status = 200 if held == "then-stored" else None  # None: dropped, unanswered
    assert sorted(r.status or 0 for r in telemetry_server.requests) == sorted(
        [held_status or 0, 200])
    stats = telemetry_server.stats()
    assert stats["keys"] == {"from": [{"value": "first", "count": 1}], "spooled": 7}
    assert stats["payloads"] == 1
    assert spool_files(state_dir) == []
    ids = {r.json["payload_id"] for r in telemetry_server.requests if r.json}
    assert ids == {spooled.removesuffix(".json")}  # one payload_id, sent twice


# -- process faults: a full disk, a read-only state directory -----------------------------------


def break_disk(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Make writes under ``root`` fail as a full disk (ENOSPC: writing data fails) or a
    read-only file system (EROFS: every change fails) would. Tests run as root, which
    chmod cannot stop, so the failure is injected into the ``os`` calls themselves."""
    real_open, real_write, real_close = os.open, os.write, os.close
    full_fds: set[int] = set()
    prefix = str(root)

    def under(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix)

    def refuse(path: Any = "") -> NoReturn:
        raise OSError(code, os.strerror(code), os.fspath(path) if path else None)

    def open_(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and under(path) and code == errno.EROFS:
            refuse(path)
        fd = real_open(path, flags, mode, **kwargs)
        if writing and under(path):
            full_fds.add(fd)
        return fd

    def write(fd: int, data: Any) -> int:
        if fd in full_fds:
            refuse()
        return real_write(fd, data)

    def close(fd: int) -> None:
        full_fds.discard(fd)
        real_close(fd)

    def changing(real: Callable[..., Any]) -> Callable[..., Any]:
        def change(path: Any, *args: Any, **kwargs: Any) -> Any:
            if under(path) and code == errno.EROFS:
                refuse(path)
            return real(path, *args, **kwargs)
        return change

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "close", close)
    for name in ("mkdir", "rename", "replace", "link", "unlink", "chmod", "utime", "rmdir"):
        monkeypatch.setattr(os, name, changing(getattr(os, name)))


DISK_FAULTS = {"disk-full": errno.ENOSPC, "read-only": errno.EROFS}


@pytest.mark.parametrize("code", list(DISK_FAULTS.values()), ids=list(DISK_FAULTS))
def test_a_broken_disk_never_stops_collection_nor_raises(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int,
) -> None:
    state_dir = tmp_path / "state"
    break_disk(monkeypatch, state_dir, code)
    # Writes an instance id, a first-run marker, the server's policy, then the spool.
    telemetry_server.policy.update(disabled_keys=["secret"])
    client = make_client(instance_id=None, state_dir=state_dir)
    assert client.instance_id is not None  # not saved, but used for this whole process
    client.increment("hits")
    client.set("version", "1.4.2")
    client.start_emitting()
    assert client.flush(timeout=5)
    client.increment("hits")
    client.increment("secret")  # disabled by the server, though that was not saved
    assert client.flush(timeout=5)
    assert telemetry_server.stats()["keys"] == {"hits": 2, "version": "1.4.2"}
    # The server goes away: the stop cannot deliver, and cannot spool either.
    telemetry_server.script(drop=True, times=4)
    client.increment("late")
    client.stop_emitting(timeout=2)
    client.increment("after-stop")  # collection still works
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(os.strerror(code) in message and "instance id" in message for message in warnings)
    assert any(os.strerror(code) in message and "spool" in message for message in warnings)
    # It was said "spool full" here, which misled: the disk was broken.
    assert "1 undelivered items could not be kept in the spool" in " ".join(warnings)
    assert "spool full" not in " ".join(warnings)
    assert state_dir.exists() is False or not any(state_dir.rglob("*.json"))
    assert telemetry_server.stats()["keys"] == {"hits": 2, "version": "1.4.2"}


@pytest.mark.parametrize("code", list(DISK_FAULTS.values()), ids=list(DISK_FAULTS))
def test_a_spool_on_a_broken_disk_is_delivered_once_when_it_heals(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, code: int,
) -> None:
    instance, state_dir = uuid.uuid4(), tmp_path / "state"
    offline = make_client(instance_id=instance, endpoint=dead_endpoint(), state_dir=state_dir)
    offline.increment("spooled")
    offline.start_emitting()
    offline.stop_emitting(timeout=0.5)
    with monkeypatch.context() as patch:
        break_disk(patch, state_dir, code)
        # Read-only: the spool file cannot be claimed (renamed), so it stays for later;
        # full: it is claimed and delivered. Either way, new data flows.
        during = make_client(instance_id=instance, state_dir=state_dir)
        during.increment("during")
        during.start_emitting()
        assert during.flush(timeout=5)
        during.stop_emitting(timeout=2)
    after = make_client(instance_id=instance, state_dir=state_dir)
    after.start_emitting()
    after.flush(timeout=5)
    after.stop_emitting(timeout=2)
    assert telemetry_server.stats()["keys"] == {"during": 1, "spooled": 1}
    assert after._state is not None and after._state.spooled() == []


# -- security ------------------------------------------------------------------------------
# Covered elsewhere, so not repeated here: bodies over 1 MiB / 10 MiB decompressed and gzip
# bombs with bounded memory (tests/test_app_validation.py), 0600 files in 0700 directories
# (tests/test_state.py::test_directories_0700_and_files_0600).

INSTANCE = "3f0c5b0e-6b35-4f1e-9c55-1b2a8e5c0d11"


def post_path(server: Server, path: str, body: bytes = b"{}",
              content_type: str = "application/json") -> RawAnswer:
    return raw_http(server, (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1") + body)


def assert_json_error(status: int, headers: Dict[str, str], body: bytes, allowed: Any) -> None:
    assert status in allowed, (status, body)
    assert headers["content-type"] == "application/json"
    assert isinstance(json.loads(body)["error"], str)


def valid_body(instance: str = INSTANCE) -> bytes:
    return json.dumps({"instance_id": instance, "timestamp": "2026-11-23T10:00:00Z",
                       "payload_id": uuid.uuid4().hex, "data": {"k": 1}}).encode()


@pytest.mark.parametrize("path", [
    "/v1/update/../../etc/passwd",
    "/v1/update/..",
    "/v1/update/%2e%2e",
    "/v1/update/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/update/..%2f..%2fv1%2fstats",
    "/v1/update/" + INSTANCE + "/../" + INSTANCE,
    "/v1/update/%2F" + INSTANCE,
    "/v1/update/" + INSTANCE + "%2F..",
    "/v1/update/" + INSTANCE + "junk",
    "/v1/update/" + INSTANCE + "%00",
    "/v1/update/" + INSTANCE + "%0a",
    "/v1/update/" + INSTANCE + ";x",
    "/v1/update/" + INSTANCE[:-1],
    "/v1/update/{" + INSTANCE + "}",
    "/v1/update/urn:uuid:" + INSTANCE,
    "/v1/update/" + INSTANCE.replace("-", ""),
    "/v1/update/" + INSTANCE.replace("3", "\u0663"),  # an Arabic-Indic digit
    "/v1/update/%EF%BC%93" + INSTANCE[1:],  # a fullwidth digit, percent-encoded
    "/v1/instances/../../etc/passwd",
    "/v1/instances/%2e%2e",
    "/v1//update/" + INSTANCE,
    "/V1/UPDATE/" + INSTANCE,
])
def test_the_server_refuses_traversal_and_non_uuid_instance_ids(
    telemetry_server: Server, path: str
) -> None:
    raw = path.encode("utf-8").decode("latin-1")  # as the bytes go on the wire
    status, headers, body = post_path(telemetry_server, raw, valid_body())
    assert_json_error(status, headers, body, {400, 404, 405})
    assert telemetry_server.stats()["payloads"] == 0
    assert telemetry_server.stats()["instances"] == 0
    assert post_path(telemetry_server, f"/v1/update/{INSTANCE}", valid_body())[0] == 200


_PATH_PIECES = st.sampled_from(
    ["/", "..", ".", "%2e", "%2f", "%00", "%0a", "%ff", "%", "v1", "update", "instances",
     "stats", "healthz", INSTANCE, INSTANCE.upper(), "?", "?limit=-1", "#", ";", "~", "\\"]
)
_PATHS = st.lists(_PATH_PIECES | st.text("abcdef0123456789-/.%", max_size=12), max_size=8).map(
    lambda pieces: "/" + "".join(pieces)
) | st.sampled_from([f"/v1/update/{INSTANCE}", "*", f"http://evil.example/v1/update/{INSTANCE}"])


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO"]),
    path=_PATHS,
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8",
                                  "text/plain", "", "application/json;;;", "*/*"]),
    encoding=st.sampled_from([None, "gzip", "identity", "br", "gzip, gzip", ""]),
    body=st.binary(max_size=256) | st.builds(valid_body),
    declared=st.sampled_from(["exact", "short", "none", "junk"]),
)
def test_any_request_line_and_headers_get_a_json_answer(
    telemetry_server: Server, method: str, path: str, content_type: str,
    encoding: Optional[str], body: bytes, declared: str,
) -> None:
    """Extends the body fuzz in tests/test_app_validation.py to methods, paths and headers."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if encoding is not None:
        lines.append(f"Content-Encoding: {encoding}")
    if declared == "exact":
        lines.append(f"Content-Length: {len(body)}")
    elif declared == "short":  # fewer bytes declared than sent: the rest is not read
        lines.append(f"Content-Length: {len(body) // 2}")
    elif declared == "junk":
        lines.append("Content-Length: 12abc")
    status, headers, answer = raw_http(
        telemetry_server, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    )
    assert 200 <= status < 300 or 400 <= status < 500, (status, answer)
    assert headers.get("content-type") == "application/json", (status, answer)
    assert isinstance(json.loads(answer), dict)
    status, _, _ = raw_http(telemetry_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                              b"Connection: close\r\n\r\n")
    assert status == 200


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
    state = client._state
    assert state is not None
    spooled = list(state.spool_dir.iterdir())
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


def test_fast_hash_is_documented_as_not_cryptographic() -> None:
    assert "not cryptographic" in (telemetry.fast_hash.__doc__ or "").lower()
    assert "not cryptographic" in (telemetry.Client.fast_hash.__doc__ or "").lower()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `fast_hash(")]
    assert "not cryptographic" in row.lower()


# -- load --------------------------------------------------------------------------------------


def test_the_soak_runs_tiny_and_loses_nothing() -> None:
    """``benchmarks/soak.py`` at a tiny size, so it cannot rot; the figures come from
    running it by hand (``python benchmarks/soak.py``), never from CI."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # ``benchmarks`` is not installed: it lives next to ``tests``
        sys.path.insert(0, root)
    from benchmarks import soak

    result = soak.soak(4, 3, fault_rate=0.5, seed=7, workers=4, log=lambda message: None)
    assert result["cycles"] == 3
    assert result["faults_scripted"] > 0
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["calls_total_matches"]
    assert result["left_in_spool"] == 0
    assert result["server_p99_ms"] > 0
    assert soak.main(["--instances", "2", "--cycles", "1", "--json"]) == 0
