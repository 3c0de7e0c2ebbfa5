"""The emitter's logic through its seams: a real buffer, a scripted sink, virtual time.

No network and no files: the sink is a script of ``SendResult``s, the steering
and the spool record what they are given. The same behaviour end to end, with
the real server over loopback, is in ``test_emission.py``.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from datetime import datetime, timezone
from typing import Any, Deque, Dict, Iterator, List, Optional

import pytest
from conftest import VirtualTime

from telemetry._buffer import Buffer
from telemetry._emitter import Emitter, Phase, Schedule
from telemetry._sinks import Outcome, SendResult
from telemetry._source import BufferSource
from telemetry._wire import Payload, Request, Response, WireLimits

INSTANCE = "3f0c2f5e-8a7b-4c1d-9e2f-0123456789ab"
NS = 1_000_000_000
DELIVERED = SendResult(Outcome.DELIVERED)
RETRY = SendResult(Outcome.RETRY, detail="HTTP 503")
REJECTED = SendResult(Outcome.REJECTED, detail="HTTP 400")


class ScriptedSink:
    """Answers each request with the next scripted result (then ``DELIVERED``)."""

    def __init__(self, *results: SendResult) -> None:
        self.script: Deque[SendResult] = deque(results)
        self.requests: List[Request] = []

    def __call__(self, request: Request, timeout: float) -> SendResult:
        self.requests.append(request)
        return self.script.popleft() if self.script else DELIVERED

    @property
    def payloads(self) -> List[Payload]:
        return [request.payload for request in self.requests]


class RecordingSteering:
    def __init__(self, resume_after: float = 0.0) -> None:
        self.responses: List[Response] = []
        self.rate_limits: List[float] = []
        self._resume_after = resume_after

    def apply(self, response: Response) -> None:
        self.responses.append(response)

    def rate_limited(self, seconds: float) -> None:
        self.rate_limits.append(seconds)

    def resume_after(self) -> float:
        return self._resume_after


class Spooled:
    def __init__(self, payload: Payload) -> None:
        self.payload = payload
        self.settled: List[str] = []

    def done(self) -> None:
        self.settled.append("done")

    def release(self) -> None:
        self.settled.append("release")


class RecordingSpool:
    """Keeps what it is given; hands out ``held`` when claimed."""

    def __init__(self, *held: Payload) -> None:
        self.saved: List[Request] = []
        self.held = [Spooled(payload) for payload in held]

    def save(self, requests: List[Request]) -> int:
        self.saved += requests
        return 0

    def trim(self) -> int:
        return 0

    def claim(self, limit: int) -> List[Spooled]:
        claimed, self.held = self.held[:limit], self.held[limit:]
        return claimed


class Rig:
    """An emitter wired to fakes, in virtual time."""

    def __init__(self, sink: ScriptedSink, *held: Payload, **options: Any) -> None:
        self.time = VirtualTime()
        self.buffer = Buffer()
        self.source = BufferSource(self.buffer, wall_clock=lambda: 1_800_000_000.0)
        self.source.instance_id = INSTANCE
        self.sink = sink
        self.steering = RecordingSteering()
        self.spool = RecordingSpool(*held)
        settings: Dict[str, Any] = {
            "schedule": Schedule(default_interval=60, min_interval=1, max_interval=3600),
            "clock": self.time.clock,
            "wait": self.time.wait,
            "rng": random.Random(7),
        }
        settings.update(options)
        self.emitter = Emitter(source=self.source, steering=self.steering, sink=sink,
                               spool=self.spool, **settings)


@pytest.fixture
def rigs() -> Iterator[List[Rig]]:
    made: List[Rig] = []
    yield made
    for rig in made:
        rig.emitter.stop(timeout=1.0)


def started(rigs: List[Rig], *results: SendResult, **options: Any) -> Rig:
    """A running emitter whose first (check-in) cycle is done; the sink then answers ``results``."""
    rig = Rig(ScriptedSink(), **options)
    rigs.append(rig)
    rig.emitter.start()
    assert rig.time.wait_for_waits(1)  # the first cycle sent its check-in
    rig.sink.script.extend(results)
    rig.sink.requests.clear()
    return rig


def test_a_delivered_payload_leaves_pending_and_its_response_is_applied(
    rigs: List[Rig],
) -> None:
    answer = SendResult(Outcome.DELIVERED, Response(next_update=120 * NS, disable_keys=("x",)))
    rig = started(rigs, answer)
    rig.buffer.increment("hits")
    assert rig.emitter.flush(timeout=5)
    assert [p.data for p in rig.sink.payloads] == [{"hits": 1}]
    assert rig.steering.responses[-1] == answer.response
    assert rig.emitter.pending == []


def test_retries_keep_the_payload_and_its_id_then_the_next_cycle_resends(
    rigs: List[Rig],
) -> None:
    rig = started(rigs, *[RETRY] * 200)
    rig.time.advance(100)  # room for some cycles' backoffs, then time stands still
    rig.buffer.increment("hits")
    assert rig.emitter.flush(timeout=0.3) is False  # every attempt failed, until its timeout
    assert len(rig.sink.requests) > 4  # a waiting flush tries again after each failed cycle
    assert len({p.payload_id for p in rig.sink.payloads}) == 1
    (kept,) = rig.emitter.pending
    assert kept.data == {"hits": 1}
    tried = len(rig.sink.requests)
    rig.sink.script.clear()  # the server is back
    rig.time.advance(1000)
    assert rig.emitter.flush(timeout=5)  # delivered at last, with the same id
    assert rig.sink.payloads[tried].payload_id == kept.payload_id


def test_a_waiting_flush_retries_failed_cycles_until_delivered(rigs: List[Rig]) -> None:
    rig = started(rigs, RETRY, RETRY, RETRY, RETRY)
    rig.time.advance(100)
    rig.buffer.increment("hits")
    assert rig.emitter.flush(timeout=5)  # the cycle failed; the next try after a backoff
    assert len(rig.sink.requests) == 5
    assert len({p.payload_id for p in rig.sink.payloads}) == 1
    assert rig.emitter.pending == []


def test_backoffs_follow_the_schedule_and_its_random_source(rigs: List[Rig]) -> None:
    rig = started(rigs, RETRY, RETRY, RETRY, DELIVERED)
    rig.time.advance(100)
    waits_before = len(rig.time.waits)
    rig.buffer.increment("hits")
    assert rig.emitter.flush(timeout=5)
    rng = random.Random(7)
    schedule = rig.emitter.schedule
    schedule.interval(None, rng)  # the first cycle's wait
    expected = [schedule.backoff(attempt, rng) for attempt in range(3)]
    assert rig.time.waits[waits_before:waits_before + 3] == pytest.approx(expected)


def test_a_rejected_payload_is_dropped_and_counted_in_the_next(rigs: List[Rig]) -> None:
    rig = started(rigs, REJECTED)
    rig.buffer.append("list", "a")
    rig.buffer.append("list", "b")
    assert rig.emitter.flush(timeout=5)
    assert rig.emitter.pending == []
    rig.buffer.increment("next")
    assert rig.emitter.flush(timeout=5)
    assert rig.sink.payloads[-1].dropped == 3  # the key and its two elements


def _second_interval() -> float:
    """The wait ``Schedule.interval`` gives at its second call with ``Random(7)``."""
    rng = random.Random(7)
    schedule = Schedule(default_interval=60, min_interval=1, max_interval=3600)
    schedule.interval(None, rng)  # the first cycle's
    return schedule.interval(None, rng)


@pytest.mark.parametrize(
    ("retry_after", "expected"), [(30.0, 30.0), (10**9, 3600.0), (None, _second_interval())]
)
def test_rate_limited_keeps_the_payload_and_waits(
    rigs: List[Rig], retry_after: Optional[float], expected: float
) -> None:
    rig = started(rigs, SendResult(Outcome.RATE_LIMITED, retry_after=retry_after))
    rig.buffer.increment("hits")
    assert rig.emitter.flush(timeout=0.5) is False  # a flush never cuts a 429 wait short
    assert rig.emitter.not_before == pytest.approx(expected)  # the clock stands at 0
    assert [p.data for p in rig.emitter.pending] == [{"hits": 1}]


def test_a_stop_applies_steering_then_discards_everything(rigs: List[Rig]) -> None:
    rig = started(rigs, SendResult(Outcome.DELIVERED, Response(stop=True)))
    rig.buffer.increment("hits")
    assert rig.emitter.flush(timeout=5) is False
    assert rig.steering.responses[-1].stop
    assert rig.emitter.phase is Phase.DISCARDED
    assert rig.emitter.pending == []
    assert rig.emitter.start() is False  # stopped for good


def test_pending_is_bounded_and_the_overflow_is_counted(rigs: List[Rig]) -> None:
    rig = started(rigs, *[RETRY] * 12, max_pending=2,
                  schedule=Schedule(min_interval=1000, max_interval=1000, retries=0, jitter=0))
    for cycle in range(4):
        rig.buffer.increment(f"k{cycle}")
        waits = len(rig.time.waits)
        rig.time.advance(1000)  # exactly one more (failing) cycle
        assert rig.time.wait_for_waits(waits + 1)
    assert [list(p.data) for p in rig.emitter.pending] == [["k2"], ["k3"]]
    assert sum(p.dropped for p in rig.emitter.pending) + rig.buffer.dropped == 2


def test_a_payload_over_the_limits_is_split_by_key(rigs: List[Rig]) -> None:
    rig = started(rigs, limits=WireLimits(max_raw_bytes=4000))
    for index in range(10):
        rig.buffer.set(f"k{index}", "v" * 900)
    assert rig.emitter.flush(timeout=5)
    payloads = rig.sink.payloads
    assert len(payloads) > 1 and len({p.payload_id for p in payloads}) == len(payloads)
    assert all(len(r.body) <= 4000 for r in rig.sink.requests if not r.gzipped)
    merged: Dict[str, Any] = {}
    for payload in payloads:
        merged.update(payload.data)
    assert merged == {f"k{index}": "v" * 900 for index in range(10)}


def test_stop_spools_what_was_undelivered_encoded_once(rigs: List[Rig]) -> None:
    rig = started(rigs, *[RETRY] * 8, schedule=Schedule(min_interval=1000, max_interval=1000,
                                                        retries=0))
    rig.buffer.increment("sent once")
    # The flush's cycle fails; rather than sit out the flush's timeout in real time, the
    # stop ends it: it must still say False (a delivery would have made it True first).
    flushed: List[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(rig.emitter.flush(timeout=5)))
    flusher.start()
    assert rig.time.wait_for_waits(2)  # the cycle failed: the emitter waits to retry
    tried = rig.sink.requests[-1]
    rig.buffer.increment("never sent")
    rig.emitter.stop(timeout=1.0)
    flusher.join(5)
    assert flushed == [False]
    assert rig.emitter.phase is Phase.STOPPED
    saved = rig.spool.saved
    assert saved[0] is tried  # the request the sink saw: not encoded a second time
    assert {key for request in saved for key in request.payload.data} == {
        "sent once", "never sent"}


def spooled_payload(key: str) -> Payload:
    return Payload(instance_id=INSTANCE, timestamp=datetime.now(timezone.utc), data={key: 1})


def test_start_takes_back_the_spool_up_to_max_pending_and_sends_it_first(
    rigs: List[Rig],
) -> None:
    held = [spooled_payload(f"old{index}") for index in range(3)]
    rig = Rig(ScriptedSink(), *held, max_pending=2)
    rigs.append(rig)
    spooled = list(rig.spool.held)
    assert rig.emitter.start()
    assert rig.time.wait_for_waits(1)  # the first cycle: no check-in, the spool is the news
    # One, leaving room in ``pending`` (2) for the first cycle's own payload.
    assert [p.data for p in rig.sink.payloads] == [{"old0": 1}]
    assert [s.settled for s in spooled] == [["done"], [], []]
    assert rig.spool.held == spooled[1:]  # never claimed: they stay for a later process


def test_a_spooled_payload_undelivered_at_stop_goes_back_as_it_was(rigs: List[Rig]) -> None:
    rig = Rig(ScriptedSink(*[RETRY] * 4), spooled_payload("old"),
              schedule=Schedule(min_interval=1000, max_interval=1000, retries=0))
    rigs.append(rig)
    (spooled,) = rig.spool.held
    assert rig.emitter.start()
    assert rig.time.wait_for_waits(1)
    rig.emitter.stop(timeout=1.0)
    assert spooled.settled == ["release"]
    assert rig.spool.saved == []  # the file is still there: nothing is saved twice


def test_the_phase_moves_one_way(rigs: List[Rig]) -> None:
    rig = Rig(ScriptedSink())
    rigs.append(rig)
    emitter = rig.emitter
    seen = [(emitter.phase, emitter.running)]
    assert emitter.flush(timeout=1) is False  # not started: nothing is sent
    starts = [emitter.start(), emitter.start()]
    seen.append((emitter.phase, emitter.running))
    emitter.stop(timeout=1.0)
    seen.append((emitter.phase, emitter.running))
    starts.append(emitter.start())
    assert seen == [(Phase.READY, False), (Phase.RUNNING, True), (Phase.STOPPED, False)]
    assert starts == [True, False, False]


class GatedSource:
    """A source whose ``take`` waits, mid-take, until the test lets it finish."""

    def __init__(self, inner: BufferSource) -> None:
        self.inner = inner
        self.taking = threading.Event()
        self.may_finish = threading.Event()

    def take(self) -> Optional[Payload]:
        self.taking.set()
        assert self.may_finish.wait(10), "the test never let the take finish"
        return self.inner.take()

    def has_data(self) -> bool:
        return self.inner.has_data()

    def count_dropped(self, items: int) -> None:
        self.inner.count_dropped(items)


class GatedData(Dict[str, Any]):
    """Payload data whose encoding waits, mid-way, until the test lets it finish."""

    encoding = threading.Event()
    may_finish = threading.Event()

    def items(self) -> Any:
        GatedData.encoding.set()
        assert GatedData.may_finish.wait(10), "the test never let the encoding finish"
        return super().items()


def test_flush_from_another_thread_is_not_blocked_by_a_big_take_and_encode() -> None:
    """While 100,000 items are being taken and encoded, flush() gets the emitter's lock."""
    buffer = Buffer()
    for index in range(100_000):
        buffer.append_unique("values", index % 9_000) if index < 9_000 else buffer.increment(
            f"counter{index}")
    inner = BufferSource(buffer, wall_clock=lambda: 1_800_000_000.0)
    inner.instance_id = INSTANCE
    source = GatedSource(inner)
    sink = ScriptedSink()
    time_ = VirtualTime()
    emitter = Emitter(source=source, steering=RecordingSteering(), sink=sink,
                      clock=time_.clock, wait=time_.wait)
    emitter.start()
    try:
        assert source.taking.wait(10)  # the emitter thread is inside take()
        # A flush with no time to wait still needs the lock: it returns only if the
        # take does not hold it.
        assert _returns_in_another_thread(lambda: emitter.flush(timeout=0))
        source.may_finish.set()
        assert emitter.flush(timeout=30)
        (payload,) = sink.payloads
        assert payload.items == 100_000
        # Now the encoding: a payload whose data blocks while it is encoded.
        gated = Payload(instance_id=INSTANCE, timestamp=datetime.now(timezone.utc),
                        data=GatedData(big=list(range(100_000))))
        inner.instance_id = None  # the next cycle takes nothing from the buffer
        emitter.add_pending(gated, on_done=lambda: None, on_return=lambda: None)
        flushing = threading.Thread(target=emitter.flush, args=(30,))
        flushing.start()
        assert GatedData.encoding.wait(10)  # the emitter thread is encoding
        assert _returns_in_another_thread(lambda: emitter.flush(timeout=0))
        GatedData.may_finish.set()
        flushing.join(30)
        assert sink.payloads[-1] is gated
    finally:
        source.may_finish.set()
        GatedData.may_finish.set()
        emitter.stop(timeout=1.0)


def _returns_in_another_thread(call: Any) -> bool:
    """Whether ``call()`` returns in another thread while this one waits (up to 5 s)."""
    done = threading.Event()

    def run() -> None:
        call()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return done.wait(5)


class FixedJitter(random.Random):
    """A random source whose ``uniform`` always answers ``fraction`` of its range."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


SCHEDULE = Schedule(default_interval=3600, min_interval=60, max_interval=86400)


@pytest.mark.parametrize(
    ("next_update", "fraction", "expected"),
    [
        (None, 0.5, 3600.0),  # no instruction: the default interval
        (0, 0.5, 3600.0),  # not positive: the default
        (-5 * NS, 0.5, 3600.0),
        (120 * NS, 0.5, 120.0),  # honoured
        (1 * NS, 0.5, 60.0),  # raised to min_interval
        (10**6 * NS, 0.5, 86400.0),  # lowered to max_interval
        (10**400, 0.5, 86400.0),  # too big for a float: the longest wait
        (120 * NS, 0.0, 108.0),  # -10 % jitter
        (120 * NS, 1.0, 132.0),  # +10 %
    ],
)
def test_interval_table(next_update: Optional[int], fraction: float, expected: float) -> None:
    assert SCHEDULE.interval(next_update, FixedJitter(fraction)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("attempt", "fraction", "expected"),
    [(0, 1.0, 1.0), (1, 1.0, 2.0), (3, 1.0, 8.0), (5, 1.0, 30.0), (40, 1.0, 30.0),
     (2, 0.0, 0.0), (2, 0.5, 2.0)],
)
def test_backoff_table(attempt: int, fraction: float, expected: float) -> None:
    """Full jitter: uniform between 0 and min(cap, base * 2**attempt)."""
    assert SCHEDULE.backoff(attempt, FixedJitter(fraction)) == pytest.approx(expected)


class SlowDiskSpool(RecordingSpool):
    """A spool whose ``save`` blocks until the test lets it go (a disk that hangs)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go_on = threading.Event()
        self.finished = threading.Event()

    def save(self, requests: List[Request]) -> int:
        self.entered.set()
        self.go_on.wait(30)
        lost = super().save(requests)
        self.finished.set()
        return lost


def test_stop_keeps_its_bound_however_slow_the_spool_is(
    rigs: List[Rig], caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(ScriptedSink(*[RETRY] * 10))
    rigs.append(rig)
    spool = SlowDiskSpool()
    rig.emitter.spool = spool
    assert rig.emitter.start()
    assert rig.time.wait_for_waits(1)  # the first send failed; a backoff waits
    rig.buffer.increment("hits")
    stopping = threading.Thread(target=rig.emitter.stop, args=(0.5,))
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        stopping.start()
        stopping.join(10)
        try:
            assert not stopping.is_alive(), "stop() waited for the disk"
            assert spool.entered.is_set() and spool.saved == []
        finally:
            spool.go_on.set()
    assert "still being written" in caplog.text
    assert spool.finished.wait(10)  # finished in the background: nothing lost
    assert [r.payload.data for r in spool.saved] == [{"hits": 1}]


def test_consent_withdrawn_while_a_stop_still_spools_keeps_nothing(
    rigs: List[Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(ScriptedSink(*[RETRY] * 10))
    rigs.append(rig)
    rig.buffer.increment("hits")
    assert rig.emitter.start()
    assert rig.time.wait_for_waits(1)  # the first send failed: the payload is pending
    taking, go_on = threading.Event(), threading.Event()
    real_take = rig.source.take

    def slow_take(*args: Any) -> Optional[Payload]:
        if threading.current_thread().name == "telemetry-spool-writer":
            taking.set()  # the stop's writer holds the leftovers, not yet on disk
            go_on.wait(30)
        return real_take(*args)

    monkeypatch.setattr(rig.source, "take", slow_take)
    stopping = threading.Thread(target=rig.emitter.stop, args=(0.5,))
    stopping.start()
    try:
        assert taking.wait(10)
        rig.emitter.discard()  # consent withdrawn now
    finally:
        go_on.set()
    stopping.join(10)
    for thread in threading.enumerate():
        if thread.name == "telemetry-spool-writer":
            thread.join(10)
    assert rig.spool.saved == []  # nothing of it may wait on disk for a later process
    assert rig.emitter.phase is Phase.DISCARDED


def test_consent_withdrawn_during_the_final_send_sends_nothing_more(rigs: List[Rig]) -> None:
    sending, go_on = threading.Event(), threading.Event()

    class HoldingSink(ScriptedSink):
        def __call__(self, request: Request, timeout: float) -> SendResult:
            result = super().__call__(request, timeout)
            if len(self.requests) == 2:  # the final send's first payload
                sending.set()
                go_on.wait(30)
            return result

    rig = Rig(HoldingSink(RETRY))  # the first attempt fails: its payload stays pending
    rigs.append(rig)
    rig.buffer.increment("first")
    assert rig.emitter.start()
    assert rig.time.wait_for_waits(1)  # a backoff waits, cut short by the stop
    rig.buffer.increment("second")  # the final send takes it: two payloads to send
    stopping = threading.Thread(target=rig.emitter.stop, args=(5.0,))
    stopping.start()
    try:
        assert sending.wait(10)
        rig.emitter.discard()  # consent withdrawn while the final send is under way
    finally:
        go_on.set()
    stopping.join(10)
    # The payload on the wire could not be called back; the one after it never left.
    assert [p.data for p in rig.sink.payloads] == [{"first": 1}] * 2
