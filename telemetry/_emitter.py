"""The emitter thread: schedule, retries, pending payloads, shutdown and fork (SPEC §4).

One daemon thread per client. Each cycle takes the buffer as a new payload,
then sends pending payloads oldest first; a payload leaves ``pending`` only
when the server has it (or refused it for good), so nothing is lost, and it
keeps its ``payload_id`` across retries, restarts and the spool, so nothing is
counted twice. Collection calls never touch the emitter's lock.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import zlib
from typing import Callable, Deque, List, Optional, Protocol, Tuple

import attrs

from telemetry._log import QuietLog, logger, report_internal_error
from telemetry._sinks import RATE_LIMITED, REJECTED, RETRY, Request, SendResult, Sink
from telemetry._wire import Payload, Response, iter_encoded_payload, new_payload_id

GZIP_THRESHOLD = 1024
MAX_BODY_BYTES = 1024 * 1024  # the server refuses more (compressed), SPEC §7
MAX_RAW_BYTES = 10 * 1024 * 1024  # ... or more once decompressed
MAX_DURATION_NS = 2**63 - 1  # the longest Go duration

_SEND_FAILED = "telemetry: sending failed (%s); will retry"

Wait = Callable[[threading.Event, float], object]
"""``wait(event, seconds)``: block until ``event`` is set or ``seconds`` pass."""


def event_wait(event: threading.Event, seconds: float) -> object:
    return event.wait(seconds)


@attrs.frozen
class Schedule:
    """Timing of cycles and retries, in seconds (SPEC §4)."""

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
            # Capped first: a JSON integer can be too big for a float.
            seconds = min(next_update_ns, MAX_DURATION_NS) / 1e9
        base = self.default_interval if seconds is None else seconds
        clamped = min(max(base, self.min_interval), self.max_interval)
        return clamped * (1 + rng.uniform(-self.jitter, self.jitter))

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (0-based)."""
        return rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))


class Spool(Protocol):
    """Where payloads go when the process stops before they were delivered."""

    def spool(self, payloads: List[Payload]) -> int: ...


@attrs.define(eq=False)
class _Pending:
    """An undelivered payload; ``on_done`` runs once it has left for good."""

    payload: Payload
    request: Optional[Request] = None
    on_done: Optional[Callable[[], None]] = None
    on_return: Optional[Callable[[], None]] = None


# Longest the encoder runs before it hands the GIL back (seconds). A hand-off costs
# a system call, and up to the interpreter's switch interval (5 ms) before this
# thread gets the GIL back from a busy application thread: not after every piece.
_PAUSE_INTERVAL = 0.001


def _pause() -> None:
    # Hand the GIL to the application's threads between encoding chunks.
    time.sleep(0)


def encode_request(payload: Payload) -> Tuple[Request, int]:
    """Encode (and gzip over 1 KiB) in chunks, handing the GIL back between them.

    Each piece is compressed as it comes (zlib releases the GIL while it works),
    so no step joins or compresses the whole body in one long call.
    Returns the request and the size of its uncompressed body.
    """
    raw_pieces: List[bytes] = []
    raw_size = 0
    compressor = None
    body_pieces: List[bytes] = []
    clock = time.perf_counter
    pause_at = clock() + _PAUSE_INTERVAL
    for text in iter_encoded_payload(payload):
        piece = text.encode("utf-8")
        raw_size += len(piece)
        if compressor is not None:
            body_pieces.append(compressor.compress(piece))
        else:
            raw_pieces.append(piece)
            if raw_size > GZIP_THRESHOLD:
                compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip container
                body_pieces = [compressor.compress(b"".join(raw_pieces))]
        if clock() >= pause_at:
            _pause()
            pause_at = clock() + _PAUSE_INTERVAL
    if compressor is None:
        return Request(payload, b"".join(raw_pieces)), raw_size
    body_pieces.append(compressor.flush())
    return Request(payload, b"".join(body_pieces), gzipped=True), raw_size


def split_to_fit(payload: Payload) -> Tuple[List[Request], int]:
    """Requests that each fit the server's size limits, split by key and by event; and
    items dropped.

    Data and events are split apart first, then each in halves. A key that cannot
    fit even alone, or cannot be encoded at all (an int with more digits than
    ``str()`` allows), is dropped and counted.
    """
    try:
        request, raw_size = encode_request(payload)
    except ValueError as exc:
        problem = f"cannot be encoded ({exc})"
    else:
        if len(request.body) <= MAX_BODY_BYTES and raw_size <= MAX_RAW_BYTES:
            return [request], 0
        problem = "is too large to send even alone"
    keys = list(payload.data)
    events = list(payload.events)
    if len(keys) + len(events) <= 1:
        what = f"key {keys[0]!r}" if keys else "event" if events else "(empty)"
        logger.warning("telemetry: payload %s %s; dropped", what, problem)
        return [], payload.items + payload.dropped
    if keys and events:
        halves = [(keys, []), ([], events)]
    elif keys:
        halves = [(keys[: len(keys) // 2], []), (keys[len(keys) // 2 :], [])]
    else:
        halves = [([], events[: len(events) // 2]), ([], events[len(events) // 2 :])]
    requests: List[Request] = []
    dropped = 0
    for index, (part_keys, part_events) in enumerate(halves):
        piece = attrs.evolve(
            payload,
            payload_id=new_payload_id(),
            data={key: payload.data[key] for key in part_keys},
            events=part_events,
            dropped=payload.dropped if index == 0 else 0,
            dropped_events=payload.dropped_events if index == 0 else 0,
            items=-1,
        )
        part_requests, part_dropped = split_to_fit(piece)
        requests += part_requests
        dropped += part_dropped
    return requests, dropped


class Emitter:
    """The background sender of one client.

    ``take_payload`` snapshots the buffer; ``on_response`` applies what the
    server said after each delivery and returns False when the server said
    stop; ``count_dropped`` reports items lost here (rejected, overflow).
    """

    def __init__(
        self,
        *,
        sink: Sink,
        take_payload: Callable[[], Optional[Payload]],
        on_response: Callable[[Response], bool],
        count_dropped: Callable[[int], None],
        has_data: Callable[[], bool],
        schedule: Schedule = Schedule(),
        max_pending: int = 8,
        send_timeout: float = 10.0,
        spool: Optional[Spool] = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = event_wait,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.sink = sink
        self._take_payload = take_payload
        self._on_response = on_response
        self._count_dropped = count_dropped
        self._has_data = has_data
        self.schedule = schedule
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self._spool = spool
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
        self._stopping = False
        self._abandoned = False
        self._stop_deadline = float("inf")
        self._not_before = float("-inf")  # a 429 asked us not to send before this
        self._next_update: Optional[int] = None
        self._failed_cycles = 0
        self._flush_requested = 0
        self._flush_completed = 0
        self._all_delivered = True

    # -- control, called from the application's threads ----------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def add_pending(self, payload: Payload, on_done: Callable[[], None],
                    on_return: Callable[[], None]) -> None:
        """Queue a payload recovered from the spool (call before ``start``, oldest first)."""
        with self._lock:
            self._pending.append(_Pending(payload, on_done=on_done, on_return=on_return))

    def start(self) -> bool:
        """Start the thread; False when it already runs (or has stopped for good)."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = threading.Thread(target=self._run, name="telemetry-emitter",
                                            daemon=True)
            self._thread.start()
            return True

    def flush(self, timeout: float) -> bool:
        """Run a cycle now and wait for it, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._thread is None or self._stopping:
                return False
            if not self._pending and not self._has_data():
                return True
            self._flush_requested += 1
            ticket = self._flush_requested
            self._wakeup.set()
            while self._flush_completed < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    return False
                self._cycle_done.wait(remaining)
            return self._all_delivered and not self._stopping

    def stop(self, timeout: float) -> None:
        """Final send, bounded by ``timeout``; spool whatever is still undelivered."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            thread = self._thread
            if thread is None or self._stopping:
                return
            self._stopping = True
            self._stop_deadline = deadline
            self._wakeup.set()
            self._stop_event.set()
            self._cycle_done.notify_all()
        thread.join(max(0.0, deadline - time.monotonic()))
        self._abandon()

    def discard(self) -> None:
        """Stop without sending and forget everything pending (consent withdrawn, server stop)."""
        with self._lock:
            self._stopping = True
            self._abandoned = True
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

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            due = self._clock()  # the first send happens at once
            while True:
                self._wakeup.clear()
                if self._stopping:
                    break
                now = self._clock()
                with self._lock:
                    flush_wanted = self._flush_requested > self._flush_completed
                scheduled = now >= due
                if flush_wanted and now >= self._not_before:
                    due = min(due, now)
                if now < due:
                    self._wait(self._wakeup, due - now)
                    continue
                delay = self._cycle(final=False, check_in=scheduled)
                if delay is None:
                    return  # the server said stop
                due = self._clock() + delay
            # The final send; under a server's Retry-After it is left to the spool.
            if not self._abandoned and self._clock() >= self._not_before:
                self._cycle(final=True)
        except Exception as exc:
            report_internal_error("emitter thread", exc)
        finally:
            with self._lock:
                self._flush_completed = self._flush_requested
                self._cycle_done.notify_all()

    def _cycle(self, *, final: bool, check_in: bool = False) -> Optional[float]:
        """One send cycle; returns seconds until the next, or None after a server stop.

        A scheduled cycle with nothing to send still sends an empty payload
        (``check_in``): that is how the server keeps steering the client.
        """
        with self._lock:
            ticket = self._flush_requested
            payload = self._take_payload()
            empty = payload is None or not payload.carries_data
            if payload is not None and (not empty or (check_in and not self._pending)):
                self._pending.append(_Pending(payload))
                self._trim_pending()
            batch = list(self._pending)
        delay = self._send_batch(batch, final=final)
        with self._lock:
            self._flush_completed = max(self._flush_completed, ticket)
            self._all_delivered = not self._pending
            self._cycle_done.notify_all()
        return delay

    def _trim_pending(self) -> None:
        while len(self._pending) > self.max_pending:
            oldest = self._pending.popleft()
            logger.warning("telemetry: too many undelivered payloads; the oldest was dropped")
            self._count_dropped(oldest.payload.items + oldest.payload.dropped)
            if oldest.on_done is not None:
                oldest.on_done()

    def _send_batch(self, batch: List[_Pending], *, final: bool) -> Optional[float]:
        work = collections.deque(batch)
        failed = False
        while work:
            entry = work.popleft()
            if self._abandoned and not final:
                break
            if entry.request is None:
                parts = self._prepare(entry)
                if parts is not None:
                    work.extendleft(reversed(parts))
                    continue
            result = self._deliver(entry, retries=0 if final else self.schedule.retries)
            if result is None:
                failed = True
                break
            if result.outcome == RATE_LIMITED:
                wait = result.retry_after
                if wait is None:
                    wait = self.schedule.interval(self._next_update, self._rng)
                wait = min(max(wait, 0.0), self.schedule.max_interval)
                self._not_before = self._clock() + wait
                self._quiet.log(logging.INFO, "telemetry: server is rate limiting; waiting %.0f s",
                                wait)
                return wait
            if result.outcome == REJECTED:
                self._finish(entry)
                self._quiet.log(logging.WARNING,
                                "telemetry: server rejected a payload (%s); it was dropped",
                                result.detail)
                self._count_dropped(entry.payload.items + entry.payload.dropped)
                continue
            # Apply the response before the entry leaves ``pending``: a flush must
            # not see "nothing left" while a stop is still being applied.
            if not self._on_response(result.response):
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
                result = SendResult(RETRY, detail=f"{type(exc).__name__}: {exc}")
            if result.outcome != RETRY:
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
        requests, dropped = split_to_fit(entry.payload)
        if dropped:
            self._count_dropped(dropped)
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

    def _abandon(self) -> None:
        """After a stop: spool what is still pending, then the buffer's last data."""
        with self._lock:
            self._abandoned = True
            leftovers = list(self._pending)
            self._pending.clear()
            last = self._take_payload()
        if last is not None and last.carries_data:
            leftovers.append(_Pending(last))
        to_spool = []
        for entry in leftovers:
            if entry.on_return is not None:
                entry.on_return()  # a claimed spool file goes back as it was
            elif not entry.payload.carries_data:
                continue  # an empty check-in can go
            elif entry.request is not None:
                to_spool.append(entry.payload)  # encoded once already: it encodes
            else:
                # Never encoded yet: what cannot be encoded must not reach the spool.
                parts, dropped = split_to_fit(entry.payload)
                if dropped:
                    self._count_dropped(dropped)
                to_spool += [part.payload for part in parts]
        if not to_spool:
            return
        if self._spool is None:
            lost = sum(p.items + p.dropped for p in to_spool)
            logger.warning("telemetry: %d undelivered payloads (%d items) were lost at stop",
                           len(to_spool), lost)
            return
        dropped = self._spool.spool(to_spool)
        if dropped:
            # The spool's bounds, or a disk error it has logged: say what, not why.
            logger.warning("telemetry: %d undelivered items could not be kept in the spool; "
                           "they were dropped", dropped)
