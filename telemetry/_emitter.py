"""The emitter thread: schedule, retries, pending payloads, shutdown and fork.

One daemon thread per client. Each cycle takes a new payload from its
``PayloadSource``, then sends pending payloads oldest first through its
``Sink``; what the server answers goes to its ``Steering``. A payload leaves
``pending`` only when the server has it (or refused it for good), so nothing is
lost, and it keeps its ``payload_id`` across retries, restarts and the
``Spool``, so nothing is counted twice (``docs/protocol.md``). Collection calls
never touch the emitter's lock, and the emitter never holds it while it takes,
encodes or sends a payload.
"""

from __future__ import annotations

import collections
import enum
import logging
import random
import threading
import time
from typing import Callable, Deque, List, Optional, Protocol, Sequence

import attrs

from telemetry._log import QuietLog, logger, report_internal_error
from telemetry._sinks import Outcome, SendResult, Sink
from telemetry._wire import (
    MAX_DURATION_NS,
    SERVER_LIMITS,
    Payload,
    Request,
    Response,
    WireLimits,
    split_to_fit,
)

_SEND_FAILED = "telemetry: sending failed (%s); will retry"

SERVER_WAIT_FLOOR = 1.0
"""The shortest wait the server can ask for (seconds), whatever it says: after a
429 or a 503 with ``Retry-After`` the floor doubles while such answers repeat, up
to ``max_interval``; a ``next_update`` is never taken below it either."""
SPOOL_RESERVE_SHARE = 0.25
SPOOL_RESERVE_MAX = 0.5
"""Of ``stop(timeout)``, the final send leaves this share (at most this many
seconds) for writing the spool, so the whole stop keeps within ``timeout``."""

Wait = Callable[[threading.Event, float], object]
"""``wait(event, seconds)``: block until ``event`` is set or ``seconds`` pass."""


def event_wait(event: threading.Event, seconds: float) -> object:
    return event.wait(seconds)


@attrs.frozen
class Schedule:
    """Timing of cycles and retries, in seconds (``docs/protocol.md``, "Timing and retries")."""

    default_interval: float = 3600.0
    min_interval: float = 60.0
    max_interval: float = 86400.0
    jitter: float = 0.1
    retries: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    failed_cycles_before_quiet: int = 3

    def interval(self, next_update_ns: Optional[int], rng: random.Random) -> float:
        """The wait before the next cycle: clamped, then spread by the jitter."""
        seconds = None
        if next_update_ns and next_update_ns > 0:
            # Capped first: a JSON integer can be too big for a float. Floored: a
            # server must not be able to make the client send in a tight loop.
            seconds = max(min(next_update_ns, MAX_DURATION_NS) / 1e9, SERVER_WAIT_FLOOR)
        base = self.default_interval if seconds is None else seconds
        clamped = min(max(base, self.min_interval), self.max_interval)
        return clamped * (1 + rng.uniform(-self.jitter, self.jitter))

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (0-based)."""
        # The exponent is capped first: a float cannot hold 2**1024.
        return rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2.0 ** min(attempt, 64)))


class PayloadSource(Protocol):
    """Where payloads come from: the buffer, seen from the emitter."""

    def take(self) -> Optional[Payload]:
        """Everything collected since the last take, as a new payload; None when off."""

    def has_data(self) -> bool:
        """Whether a take now would carry anything (items or drop counts)."""

    def count_dropped(self, items: int) -> None:
        """Report ``items`` lost in emission (rejected, overflow) with the next payload."""


class Steering(Protocol):
    """Applies what the server said after a delivery (keys, ``stop``) to the client."""

    def apply(self, response: Response) -> None: ...

    def rate_limited(self, seconds: float) -> None:
        """A 429 asked not to send for ``seconds``: remember it for the next process."""

    def resume_after(self) -> float:
        """Seconds that a 429 remembered from an earlier process still asks to wait."""


class Spooled(Protocol):
    """A payload taken back from the spool: ``done()`` once delivered, else ``release()``."""

    payload: Payload

    def done(self) -> None: ...
    def release(self) -> None: ...


class Spool(Protocol):
    """Where encoded payloads wait when the process stops before they were delivered."""

    def save(self, requests: List[Request]) -> int:
        """Keep ``requests`` for a later process; returns how many items were lost."""

    def trim(self) -> int:
        """Drop the oldest payloads beyond the spool's bounds; returns the items lost."""

    def claim(self, limit: int) -> Sequence[Spooled]:
        """Take back, for this process, the ``limit`` oldest payloads earlier ones left."""


class Phase(enum.Enum):
    """Where the emitter is in its life; it only ever moves down this list."""

    READY = "ready"
    """Built, thread not started."""
    RUNNING = "running"
    """The thread runs cycles."""
    STOPPING = "stopping"
    """``stop()`` was called: one final send, bounded by its deadline."""
    STOPPED = "stopped"
    """Stopped; what was undelivered went to the spool."""
    DISCARDED = "discarded"
    """Stopped without sending; pending payloads were forgotten (consent off, server stop)."""


@attrs.define(eq=False)
class _Pending:
    """An undelivered payload; ``on_done`` runs once it has left for good."""

    payload: Payload
    request: Optional[Request] = None
    on_done: Optional[Callable[[], None]] = None
    on_return: Optional[Callable[[], None]] = None


class Emitter:
    """The background sender of one client."""

    def __init__(
        self,
        *,
        source: PayloadSource,
        steering: Steering,
        sink: Sink,
        spool: Optional[Spool] = None,
        schedule: Schedule = Schedule(),
        max_pending: int = 8,
        send_timeout: float = 10.0,
        limits: Optional[WireLimits] = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = event_wait,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.source = source
        self.steering = steering
        self.sink = sink
        self.spool = spool
        self.schedule = schedule
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self.limits = limits or SERVER_LIMITS
        self._clock = clock
        self._wait = wait
        self._rng = rng or random.Random()
        self._quiet = QuietLog()
        self._reset_state()

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._cycle_done = threading.Condition(self._lock)
        self._wakeup = threading.Event()  # set to run a cycle now (flush) or to stop
        self._stop_event = threading.Event()  # set once: abandon backoff waits
        self._pending: Deque[_Pending] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self.phase = Phase.READY
        self._taking = False  # a payload is taken but not yet pending (flush must wait)
        self._claiming = False  # the spool is being taken back (flush must wait)
        self._stop_deadline = float("inf")
        self._not_before = float("-inf")  # a 429 asked us not to send before this
        self._retry_at = float("-inf")  # a waiting flush's next try after a failed cycle...
        self._retry_ticket = 0  # ... for flushes up to this ticket (a newer one sends now)
        self._rate_limited_in_a_row = 0
        self._next_update: Optional[int] = None
        self._failed_cycles = 0
        self._flush_requested = 0  # tickets handed to flush() callers
        self._flush_delivered = 0  # the latest ticket whose data has all been delivered
        self._flush_waiters = 0

    # -- what tests and status() may look at --------------------------------

    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def pending(self) -> List[Payload]:
        """The undelivered payloads, oldest first (a copy)."""
        with self._lock:
            return [entry.payload for entry in self._pending]

    @property
    def not_before(self) -> float:
        """A 429 asked not to send before this time (the emitter's clock)."""
        return self._not_before

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    @property
    def wakeup(self) -> threading.Event:
        """The event the thread waits on between cycles."""
        return self._wakeup

    # -- control, called from the application's threads ----------------------

    def add_pending(self, payload: Payload, on_done: Callable[[], None],
                    on_return: Callable[[], None]) -> None:
        """Queue a payload to send after those pending; ``on_done`` once it left for good,
        ``on_return`` if it is still undelivered at a stop (it is not spooled again)."""
        with self._lock:
            self._pending.append(_Pending(payload, on_done=on_done, on_return=on_return))

    def start(self) -> bool:
        """Start the thread; False when it already runs (or has stopped for good).

        The thread first takes back what the spool holds (at most
        ``max_pending - 1`` payloads; the rest stay for later), so however much
        the spool holds costs the caller nothing.
        """
        with self._lock:
            if self.phase is not Phase.READY:
                return False
            self.phase = Phase.RUNNING
            self._claiming = self.spool is not None
            self._thread = threading.Thread(target=self._run, name="telemetry-emitter",
                                            daemon=True)
            self._thread.start()
            return True

    def flush(self, timeout: float) -> bool:
        """Send what is buffered and pending now; True once all of it was delivered.

        Waits through retries and a server's 429 wait (never cutting it short),
        and returns False only when ``timeout`` seconds pass first, or at a stop.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self.phase is not Phase.RUNNING:
                return False
            if (not self._pending and not self._taking and not self._claiming
                    and not self.source.has_data()):
                return True
            self._flush_requested += 1
            ticket = self._flush_requested
            self._flush_waiters += 1
            self._wakeup.set()
            try:
                while self._flush_delivered < ticket:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.phase is not Phase.RUNNING:
                        return False
                    self._cycle_done.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def stop(self, timeout: float) -> None:
        """Final send, then spool whatever is still undelivered; returns within ``timeout``.

        The final send ends early enough to leave time for the spool. Should
        the disk be slower still, the spool is finished by a background thread
        after this returns: the caller's bound holds whatever the disk does.
        """
        timeout = max(timeout, 0.0)
        deadline = time.monotonic() + timeout
        send_deadline = deadline - min(timeout * SPOOL_RESERVE_SHARE, SPOOL_RESERVE_MAX)
        with self._lock:
            thread = self._thread
            if thread is None or self.phase is not Phase.RUNNING:
                return
            self.phase = Phase.STOPPING
            self._stop_deadline = send_deadline
            self._wakeup.set()
            self._stop_event.set()
            self._cycle_done.notify_all()
        thread.join(max(0.0, send_deadline - time.monotonic()))
        writer = threading.Thread(target=self._abandon_reporting_errors,
                                  name="telemetry-spool-writer", daemon=True)
        writer.start()
        writer.join(max(0.0, deadline - time.monotonic()))
        if writer.is_alive():
            logger.warning("telemetry: the spool was still being written when stop_emitting() "
                           "timed out; it is finished in the background")

    def discard(self) -> None:
        """Stop without sending and forget everything pending (consent withdrawn, server stop)."""
        with self._lock:
            self.phase = Phase.DISCARDED
            self._wakeup.set()
            self._stop_event.set()
            self._cycle_done.notify_all()
            leaving = list(self._pending)
            self._pending.clear()
        for entry in leaving:
            if entry.on_done is not None:
                entry.on_done()

    def after_fork_in_child(self) -> None:
        """The parent keeps its thread and its pending payloads; the child starts afresh."""
        self._reset_state()
        self._quiet = QuietLog()

    def _ready(self) -> bool:
        return self.phase is Phase.READY

    def _given_up(self) -> bool:
        """Stopped or discarded: undelivered payloads are no longer this thread's to send."""
        return self.phase in (Phase.STOPPED, Phase.DISCARDED)

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._take_back_spool()
            # The first send happens at once, unless an earlier process got a 429
            # (never waiting longer than a 429 could ask for: the wall clock may jump).
            due = self._clock() + min(self.steering.resume_after(), self.schedule.max_interval)
            self._not_before = due
            while True:
                self._wakeup.clear()
                if self.phase is not Phase.RUNNING:
                    break
                now = self._clock()
                with self._lock:
                    flush_wanted = (self._flush_waiters > 0
                                    and self._flush_requested > self._flush_delivered)
                    retry_at = (self._retry_at if self._flush_requested <= self._retry_ticket
                                else float("-inf"))
                scheduled = now >= due
                if flush_wanted:
                    # Now, but never before a server's 429 wait ends, nor hammering a
                    # server that keeps failing while the same flush waits.
                    due = min(due, max(now, self._not_before, retry_at))
                if now < due:
                    self._wait(self._wakeup, due - now)
                    continue
                delay = self._cycle(final=False, check_in=scheduled)
                if delay is None:
                    return  # the server said stop
                due = self._clock() + delay
            # The final send; under a server's Retry-After it is left to the spool.
            if not self._given_up() and self._clock() >= self._not_before:
                self._cycle(final=True)
        except Exception as exc:
            report_internal_error("emitter thread", exc)
        finally:
            with self._lock:
                self._claiming = False
                self._cycle_done.notify_all()

    def _take_back_spool(self) -> None:
        """Trim the spool to its bounds, then queue the oldest payloads it holds."""
        spool = self.spool
        if spool is None:
            return
        try:
            lost = spool.trim()
            if lost:
                self.source.count_dropped(lost)
                logger.warning("telemetry: the spool held more than its bounds; the oldest "
                               "payloads (%d items) were dropped", lost)
            # Room is left for the first cycle's own payload, or it would push the
            # oldest spooled one out of ``pending`` again at once.
            claimed = list(spool.claim(max(1, self.max_pending - 1)))
        finally:
            with self._lock:
                self._claiming = False
        with self._lock:
            given_up = self._given_up()
            if not given_up:
                self._pending.extendleft(
                    _Pending(c.payload, on_done=c.done, on_return=c.release)
                    for c in reversed(claimed)
                )
        if given_up:  # discarded or stopped meanwhile: they stay for a later process
            for spooled in claimed:
                spooled.release()

    def _cycle(self, *, final: bool, check_in: bool = False) -> Optional[float]:
        """One send cycle; returns seconds until the next, or None after a server stop.

        A scheduled cycle with nothing to send still sends an empty payload
        (``check_in``): that is how the server keeps steering the client.
        """
        with self._lock:
            ticket = self._flush_requested
            self._taking = True
        try:
            # Taken outside the lock: converting a big buffer takes a while, and
            # flush() or stop() from the application must not wait for it.
            payload = self.source.take()
        finally:
            with self._lock:
                self._taking = False
        empty = payload is None or not payload.carries_data
        orphan = None
        with self._lock:
            if payload is not None and (not empty or (check_in and not self._pending)):
                if self.phase is Phase.STOPPED:
                    orphan = _Pending(payload)  # stop() gave up meanwhile: spool it
                else:
                    self._pending.append(_Pending(payload))
                    self._trim_pending()
            batch = list(self._pending)
        if orphan is not None:
            self._spool_leftovers([orphan])
        delay = self._send_batch(batch, final=final)
        with self._lock:
            if not self._pending and self.phase is Phase.RUNNING:  # not discarded
                self._flush_delivered = max(self._flush_delivered, ticket)
                self._retry_at = float("-inf")
            elif self._not_before <= self._clock():
                # A flush that still waits tries again after a backoff that keeps
                # growing while cycles fail (never at once: the server may be down).
                attempt = self.schedule.retries + self._failed_cycles
                self._retry_at = self._clock() + self.schedule.backoff(attempt, self._rng)
                self._retry_ticket = ticket
            self._cycle_done.notify_all()
        return delay

    def _trim_pending(self) -> None:
        while len(self._pending) > self.max_pending:
            oldest = self._pending.popleft()
            logger.warning("telemetry: too many undelivered payloads; the oldest was dropped")
            self.source.count_dropped(oldest.payload.items + oldest.payload.dropped)
            if oldest.on_done is not None:
                oldest.on_done()

    def _send_batch(self, batch: List[_Pending], *, final: bool) -> Optional[float]:
        work = collections.deque(batch)
        failed = False
        while work:
            entry = work.popleft()
            if self.phase is Phase.DISCARDED or (self._given_up() and not final):
                break  # consent withdrawn (or the server's stop): not one more send
            if entry.request is None:
                parts = self._prepare(entry)
                if parts is not None:
                    work.extendleft(reversed(parts))
                    continue
            result = self._deliver(entry, retries=0 if final else self.schedule.retries)
            if result is None:
                failed = True
                break
            if result.outcome is Outcome.RATE_LIMITED:
                return self._rate_limited(result.retry_after, result.detail)
            self._rate_limited_in_a_row = 0
            if result.outcome is Outcome.REJECTED:
                self._finish(entry)
                self._quiet.log(logging.WARNING,
                                "telemetry: server rejected a payload (%s); it was dropped",
                                result.detail)
                self.source.count_dropped(entry.payload.items + entry.payload.dropped)
                continue
            for field in result.response.ignored:
                # A fixed field name: one quiet message per field, not one per cycle.
                self._quiet.log(logging.WARNING,
                                f"telemetry: server response field {field!r} has the wrong "
                                "type; ignored")
            # Apply the response before the entry leaves ``pending``: a flush must
            # not see "nothing left" while a stop is still being applied.
            self.steering.apply(result.response)
            if result.response.stop:
                self.discard()
                return None
            self._finish(entry)
            if result.response.next_update is not None:
                self._next_update = result.response.next_update
        if failed:
            self._failed_cycles += 1
            if self._failed_cycles >= self.schedule.failed_cycles_before_quiet:
                return self.schedule.max_interval
        elif self._failed_cycles:
            logger.info("telemetry: delivered again after %d failed cycles", self._failed_cycles)
            self._failed_cycles = 0
        return self.schedule.interval(self._next_update, self._rng)

    def _rate_limited(self, retry_after: Optional[float], detail: str) -> float:
        """After the server asked to wait (a 429, a 503 with ``Retry-After``): how long
        to wait (also remembered across restarts)."""
        self._rate_limited_in_a_row += 1
        wait = retry_after
        if wait is None:
            wait = self.schedule.interval(self._next_update, self._rng)
        # At least a second, doubling while such answers repeat: a server answering
        # "Retry-After: 0" (or a date in the past) must not get a tight loop.
        floor = SERVER_WAIT_FLOOR * 2.0 ** min(self._rate_limited_in_a_row - 1, 64)
        wait = min(max(wait, floor), self.schedule.max_interval)
        self._not_before = self._clock() + wait
        self.steering.rate_limited(wait)
        self._quiet.log(logging.INFO, "telemetry: the server asked to wait (%s); waiting %.0f s",
                        detail, wait)
        return wait

    def _finish(self, entry: _Pending) -> None:
        with self._lock:
            try:
                self._pending.remove(entry)
            except ValueError:
                return  # already handed to the spool by a stop that timed out
        if entry.on_done is not None:
            entry.on_done()

    def _deliver(self, entry: _Pending, *, retries: int) -> Optional[SendResult]:
        """Send one prepared payload with retries; None when every attempt failed."""
        request = entry.request
        assert request is not None
        for attempt in range(retries + 1):
            if attempt and self._wait_backoff(self.schedule.backoff(attempt - 1, self._rng)):
                return None
            timeout = min(self.send_timeout, self._stop_deadline - time.monotonic())
            if timeout <= 0:
                return None
            try:
                result = self.sink(request, timeout)
            except Exception as exc:  # a sink's failure is a failed attempt, not our crash
                result = SendResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}")
            if result.outcome is not Outcome.RETRY:
                self._quiet.forget(_SEND_FAILED)
                return result
            self._quiet.log(logging.WARNING, _SEND_FAILED, result.detail)
        return None

    def _wait_backoff(self, seconds: float) -> bool:
        """Wait before a retry; True when shutdown cut the wait short."""
        self._wait(self._stop_event, seconds)
        return self._stop_event.is_set()

    def _prepare(self, entry: _Pending) -> Optional[List[_Pending]]:
        """Encode ``entry``; None when it fits as it is, else the parts that replace it.

        A payload too big for the server is split by key into new payloads.
        """
        requests, dropped = split_to_fit(entry.payload, self.limits)
        if dropped:
            self.source.count_dropped(dropped)
        if len(requests) == 1 and requests[0].payload is entry.payload:
            entry.request = requests[0]
            return None
        parts = [_Pending(request.payload, request) for request in requests]
        with self._lock:
            if entry in self._pending:
                index = self._pending.index(entry)
                del self._pending[index]
                for offset, part in enumerate(parts):
                    self._pending.insert(index + offset, part)
        if entry.on_done is not None:
            entry.on_done()
        return parts

    def _abandon_reporting_errors(self) -> None:
        try:
            self._abandon()
        except Exception as exc:
            report_internal_error("spool writer", exc)

    def _abandon(self) -> None:
        """After a stop: spool what is still pending, then the buffer's last data."""
        with self._lock:
            if self.phase is Phase.DISCARDED:
                return  # consent withdrawn meanwhile: nothing may be kept
            self.phase = Phase.STOPPED
            leftovers = list(self._pending)
            self._pending.clear()
        last = self.source.take()
        if last is not None and last.carries_data:
            leftovers.append(_Pending(last))
        self._spool_leftovers(leftovers)

    def _spool_leftovers(self, leftovers: List[_Pending]) -> None:
        to_spool: List[Request] = []
        for entry in leftovers:
            if entry.on_return is not None:
                entry.on_return()  # a claimed spool file goes back as it was
            elif not entry.payload.carries_data:
                continue  # an empty check-in can go
            elif entry.request is not None:
                to_spool.append(entry.request)  # encoded once already
            else:
                # Never encoded yet: what cannot be encoded must not reach the spool.
                parts, dropped = split_to_fit(entry.payload, self.limits)
                if dropped:
                    self.source.count_dropped(dropped)
                to_spool += parts
        with self._lock:
            if self.phase is Phase.DISCARDED or not to_spool:
                return  # consent withdrawn while this stop was under way: not kept
        if self.spool is None:
            lost = sum(r.payload.items + r.payload.dropped for r in to_spool)
            logger.warning("telemetry: %d undelivered payloads (%d items) were lost at stop",
                           len(to_spool), lost)
            return
        dropped = self.spool.save(to_spool)
        if dropped:
            # The spool's bounds, or a disk error it has logged: say what, not why.
            logger.warning("telemetry: %d undelivered items could not be kept in the spool; "
                           "they were dropped", dropped)
