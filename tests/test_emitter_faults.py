"""Emission under server faults: nothing lost, nothing counted twice, no crash.

Each test drives the real client against the real ``server_stub`` over loopback.
Time is virtual (``make_client`` + ``VirtualTime``) wherever the client waits;
only the server's scripted delays and the client's short ``send_timeout`` are real.
Randomness is seeded: the fault mixes by the seeds in their test ids, the Hypothesis
properties by ``derandomize`` (the same examples every run, so CI is repeatable; run
them with more examples and ``--hypothesis-seed`` by hand to explore further).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
from conftest import VirtualTime, emitter_of, state_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import telemetry
from server_stub import Server, serve

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
        self.parked_until = 0.0
        self.parks = 0  # waits that parked, so far
        self._park = threading.Condition()

    def wait(self, event: threading.Event, seconds: float) -> None:
        with self._park:
            self.waits.append(seconds)
            end = self.now + seconds
            counted = False
            while end > self.horizon and not event.is_set():
                self.parked_on = event
                self.parked_until = end
                if not counted:
                    self.parks += 1
                    counted = True
                self._park.notify_all()
                self._park.wait(0.01)  # the event is set without telling us: poll it
            self.parked_on = None
            self._park.notify_all()
            if end <= self.horizon:
                self.now = max(self.now, end)

    def advance(self, seconds: float) -> None:
        with self._park:
            self.horizon = self.now + seconds
            self.parked_on = None
            self._park.notify_all()

    def let_the_parked_wait_pass(self) -> None:
        """Move the horizon to the end of the wait the emitter is parked in, however long."""
        with self._park:
            if self.parked_on is not None:
                self.horizon = max(self.horizon, self.parked_until)
                self.parked_on = None
                self._park.notify_all()

    def parked(self) -> bool:
        """Parked, and not about to wake (its event is not set)."""
        return self.parked_on is not None and not self.parked_on.is_set()

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Until ``condition()`` (checked whenever the emitter waits, parks or wakes)."""
        with self._park:
            return self._park.wait_for(condition, timeout)

    def poke(self) -> None:
        """Have ``wait_until`` check its condition again."""
        with self._park:
            self._park.notify_all()

    def wait_parked(self, timeout: float) -> Optional[threading.Event]:
        """The event the emitter is parked on, once it is; None at ``timeout``."""
        with self._park:
            self._park.wait_for(lambda: self.parked_on is not None, timeout)
            return self.parked_on


CYCLE_HORIZON = 500.0  # room for every backoff of a cycle; under 900, the shortest interval
HANG_GUARD = 30.0  # seconds: a guard against a hang (never reached when the test passes)


def run_cycle(client: telemetry.Client, clock: SteppedTime) -> bool:
    """One cycle now, through ``flush``, retried until the flush has its answer; returns
    that answer, with the emitter parked again.

    While the flush waits, every wait the emitter parks in with something to resend
    is let pass in virtual time: the backoffs, a 429 wait (which a flush never cuts
    short), however long. A failing cycle is retried, against the next scripted
    answers, until one delivers or the server says stop; nothing is waited out in
    real time but the server's scripted delays and the client's send timeout.
    """
    emitter = emitter_of(client)
    answer: List[bool] = []

    def flush() -> None:
        try:
            answer.append(client.flush(timeout=HANG_GUARD))
        finally:
            clock.poke()

    flusher = threading.Thread(target=flush, name="test-flush", daemon=True)
    rate_limited = max(0.0, emitter.not_before - clock.now)
    clock.advance(rate_limited + CYCLE_HORIZON)
    flusher.start()
    for _ in range(10_000):  # bounded: each turn is a resend, or the emitter parking anew
        parks = clock.parks
        clock.wait_until(lambda: not flusher.is_alive() or clock.parked(), HANG_GUARD)
        if not flusher.is_alive():
            break
        if clock.parked() and (emitter.pending or emitter.not_before > clock.now):
            clock.let_the_parked_wait_pass()  # a resend the flush is waiting for
        else:  # nothing to resend: the flush's own cycle is coming, or its answer is
            clock.wait_until(
                lambda: not flusher.is_alive() or clock.parks != parks, HANG_GUARD  # noqa: B023
            )
    flusher.join(HANG_GUARD)
    assert answer, f"the flush never returned: {emitter_state(client)}"
    assert settled(client, clock), f"the emitter never settled: {emitter_state(client)}"
    return answer[0]


def settled(client: telemetry.Client, clock: SteppedTime, timeout: float = 10.0) -> bool:
    """Wait until the emitter is parked between cycles, or its thread has ended (a stop).

    Parked in a retry's backoff is mid-cycle: time is let run until that cycle is over.
    """
    emitter = emitter_of(client)
    for _ in range(int(timeout / 0.05)):
        parked_on = clock.wait_parked(0.05)
        if parked_on is emitter.wakeup:
            return True
        if parked_on is not None:  # a backoff, on the stop event
            clock.advance(CYCLE_HORIZON)
        thread = emitter.thread
        if thread is None or not thread.is_alive():
            return True
    return False


def emitter_state(client: telemetry.Client) -> str:
    """Where the emitter thread is, for a failure message."""
    thread = emitter_of(client).thread
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
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path, seed: int
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
        max_pending=64,  # beyond the default of 8: losing the oldest is counted, not lost
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
    assert state_of(tmp_path).spool.payloads() == []


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
    thread = emitter_of(client).thread
    assert thread is not None and thread.is_alive()


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
    thread = emitter_of(client).thread
    assert thread is not None and thread.is_alive()
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
