"""``Client``: the consent lifecycle, and the wiring of buffer → source → emitter → sink.

This module is the one place that holds process-wide state: ``DEFAULT_CLIENT``,
which the module-level functions in ``telemetry/__init__.py`` delegate to.

``import telemetry`` loads this module, the buffer and consent rules only; the
rest of the pipeline (attrs, state files, wire types, the emitter, sinks) is
imported by ``init()``, the one place that does so, so an application that
imports telemetry but never initialises it does not pay for it.
"""

from __future__ import annotations

import atexit
import os
import random
import threading
import uuid
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    NamedTuple,
    Optional,
    Protocol,
    Union,
)

from telemetry import _consent
from telemetry._buffer import DEFAULT_MAX_ITEMS, DEFAULT_MAX_VALUES_PER_KEY, Buffer
from telemetry._events import (
    DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_EVENTS,
    EVENT_TYPE_BEHAVIORAL,
    EVENT_TYPE_LOG,
    EVENT_TYPE_METRIC,
    NULL_EVENTS,
    EventBuffer,
    EventFilter,
    EventTarget,
    Recorder,
)
from telemetry._log import capture_internal_errors, logger, report_internal_error

if TYPE_CHECKING:
    from telemetry._emitter import Emitter, Wait
    from telemetry._options import Options
    from telemetry._sinks import Sink
    from telemetry._source import BufferSource
    from telemetry._state import State
    from telemetry._steering import ClientSteering
    from telemetry._wire import Payload

AT_EXIT_TIMEOUT = 1.0

InstanceId = Union[uuid.UUID, str, None]


class Collector(Protocol):
    """The collection calls; a ``Buffer`` when on, ``NullCollector`` when off."""

    def set(self, key: object, value: object) -> None: ...
    def set_nested(self, key: object, subkey: object, value: object) -> None: ...
    def add(self, key: object, amount: object) -> None: ...
    def increment(self, key: object) -> None: ...
    def append(self, key: object, value: object) -> None: ...
    def append_unique(self, key: object, value: object) -> None: ...
    def reset(self) -> None: ...


class NullCollector:
    """Telemetry is off (or not initialised): every collection call does nothing."""

    def set(self, key: object, value: object) -> None:
        pass

    def set_nested(self, key: object, subkey: object, value: object) -> None:
        pass

    def add(self, key: object, amount: object) -> None:
        pass

    def increment(self, key: object) -> None:
        pass

    def append(self, key: object, value: object) -> None:
        pass

    def append_unique(self, key: object, value: object) -> None:
        pass

    def reset(self) -> None:
        pass


NULL_COLLECTOR = NullCollector()


def parse_instance_id(instance_id: InstanceId) -> Optional[uuid.UUID]:
    """The instance id as a UUID; raises ``ValueError`` for a nil or unparsable one."""
    if instance_id is None:
        return None
    if isinstance(instance_id, uuid.UUID):
        parsed = instance_id
    elif isinstance(instance_id, str):
        try:
            parsed = uuid.UUID(instance_id)
        except ValueError:
            raise ValueError(f"instance_id {instance_id!r} is not a UUID") from None
    else:
        raise ValueError(f"instance_id must be a uuid.UUID or a UUID string, not {instance_id!r}")
    if parsed.int == 0:
        raise ValueError("instance_id must not be the nil UUID")
    return parsed


def fast_hash(data: Union[str, bytes, bytearray, memoryview]) -> str:
    """xxh32 hex digest of ``data``, for anonymising values. Not cryptographic.

    A ``str`` is hashed as UTF-8 (lone surrogates kept as they are); anything
    that is neither ``str`` nor bytes-like is hashed as its ``str()``.
    """
    import xxhash  # noqa: PLC0415 - loaded on first use: `import telemetry` stays light

    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = (data if isinstance(data, str) else str(data)).encode("utf-8", "surrogatepass")
    return xxhash.xxh32_hexdigest(data)


class Status(NamedTuple):
    """A client's mode, why, identity and where its files are (``telemetry.status()``)."""

    mode: str
    rule: str
    instance_id: Optional[str]
    endpoint: Optional[str]
    emitting: bool
    server_stopped: bool
    server_disabled_keys: FrozenSet[str]
    config_dir: Optional[str]
    state_dir: Optional[str]
    spool_files: int
    spool_bytes: int


class Client:
    """One application's telemetry: buffer, consent decision and emitter.

    The buffer ignores collection calls until ``init()`` decides that
    telemetry is on, so they cost next to nothing when it is off.
    """

    EVENT_TYPE_LOG = EVENT_TYPE_LOG
    EVENT_TYPE_METRIC = EVENT_TYPE_METRIC
    EVENT_TYPE_BEHAVIORAL = EVENT_TYPE_BEHAVIORAL

    def __init__(self) -> None:
        self.event_target: EventTarget = NULL_EVENTS
        """Where event calls go now: the event buffer, or a null object when off."""
        # One buffer for the client's life (``init()`` configures it): the
        # module-level collection calls are the default client's buffer's methods.
        self._buffer = Buffer()
        self._buffer.set_collecting(False)
        self._events = EventBuffer()
        # Set once by init():
        self._options: Optional[Options] = None
        self._state: Optional[State] = None
        self._source: Optional[BufferSource] = None
        self._steering: Optional[ClientSteering] = None
        self._emitter: Optional[Emitter] = None
        self._state_refused: Optional[str] = None  # why the state files are not trusted
        self._emitting_wanted = False
        self._atexit_registered = False
        self.instance_id: Optional[uuid.UUID] = None
        self.app = ""
        self.endpoint: Optional[str] = None
        self.decision = _consent.Decision(_consent.OFF, "init() was not called")
        # Guards the lifecycle (init, start/stop, consent, the server's steering);
        # collection never takes it.
        self._lifecycle_lock = threading.RLock()
        _register_fork_handler(self)

    def init(
        self,
        instance_id: InstanceId = None,
        *,
        app: str = "telemetry",
        endpoint: Optional[str] = None,
        consent: _consent.ConsentArgument = None,
        disabled_keys: Iterable[str] = (),
        max_items: int = DEFAULT_MAX_ITEMS,
        max_values_per_key: int = DEFAULT_MAX_VALUES_PER_KEY,
        log_level: str = DEFAULT_LOG_LEVEL,
        max_events: int = DEFAULT_MAX_EVENTS,
        event_filter: Optional[EventFilter] = None,
        default_interval: float = 3600.0,
        min_interval: float = 60.0,
        max_interval: float = 86400.0,
        max_pending: int = 8,
        send_timeout: float = 10.0,
        verify: Union[bool, str, None] = None,
        proxies: Optional[Dict[str, str]] = None,
        sink: Optional[Sink] = None,
        state_dir: Union[str, os.PathLike[str], None] = None,
        clock: Optional[Callable[[], float]] = None,
        wait: Optional[Wait] = None,
        rng: Optional[random.Random] = None,
        wall_clock: Optional[Callable[[], float]] = None,
    ) -> None:
        """Initialise once, at start-up. Raises only for misuse.

        ``endpoint`` is the collection server's base URL (default: the
        ``TELEMETRY_ENDPOINT`` environment variable). ``log_level`` is the least
        severe level ``log()`` records; ``max_events`` bounds the buffered events;
        ``event_filter(event)`` sees each event in wire form and drops it by
        answering false (or by raising: it fails closed). ``clock``/``wait``/``rng``
        /``wall_clock`` exist so tests can drive time. Raises ``ValueError``
        for a nil or unparsable ``instance_id`` or a bad argument,
        ``RuntimeError`` when called a second time.
        """
        from telemetry._options import Options  # noqa: PLC0415 - see the module docstring
        from telemetry._source import BufferSource  # noqa: PLC0415
        from telemetry._state import State  # noqa: PLC0415
        from telemetry._steering import ClientSteering  # noqa: PLC0415

        with self._lifecycle_lock:
            if self._options is not None:
                raise RuntimeError("telemetry.init() was already called for this client")
            parsed_id = parse_instance_id(instance_id)
            options = Options(
                app=app, endpoint=endpoint, consent=consent, disabled_keys=disabled_keys,
                max_items=max_items, max_values_per_key=max_values_per_key,
                log_level=log_level, max_events=max_events, event_filter=event_filter,
                default_interval=default_interval, min_interval=min_interval,
                max_interval=max_interval, max_pending=max_pending, send_timeout=send_timeout,
                verify=verify, proxies=proxies, sink=sink, state_dir=state_dir,
                clock=clock, wait=wait, rng=rng, wall_clock=wall_clock,
            )
            state = State(app, root=state_dir)  # raises ValueError for a bad app name
            self._options = options
            self._state = state
            self.app = app
            self.endpoint = options.resolved_endpoint()
            self._buffer.configure(
                max_items=options.max_items,
                max_values_per_key=options.max_values_per_key,
                disabled_keys=options.disabled_keys,
            )
            self._events = EventBuffer(
                max_events=options.max_events,
                log_level=options.log_level,
                event_filter=options.event_filter,
                wall_clock=options.wall_clock,
                disabled_keys=options.disabled_keys,
            )
            self._source = BufferSource(self._buffer, options.wall_clock, self._events)
            self._steering = ClientSteering(
                buffer=self._buffer,
                state=state,
                endpoint=self.endpoint,
                wall_clock=options.wall_clock,
                lock=lambda: self._lifecycle_lock,
                silence=self._silence,
                events=self._events,
            )
            self.instance_id = parsed_id
            self._apply_decision(self._resolve(self._read_persisted_consent()))

    # -- consent -----------------------------------------------------------------

    def _read_persisted_consent(self) -> Optional[str]:
        from telemetry._files import UnsafeStateError  # noqa: PLC0415

        assert self._state is not None
        try:
            refusal = self._state.check()
            if refusal is None:
                return self._state.read_consent()
        except UnsafeStateError as exc:
            refusal = str(exc)
        self._refuse_state(refusal)
        return None

    def _refuse_state(self, reason: str) -> None:
        """Never trust these state files again in this process: telemetry stays off."""
        if self._state_refused is None:
            logger.warning(
                "telemetry: refusing the state files (%s): someone else could have planted or "
                "could change them; telemetry is off for this run. Fix their owner or mode "
                "(yours alone: 0700 directories, 0600 files), or remove them.",
                reason,
            )
        self._state_refused = reason
        if self._steering is not None:
            self._steering.state = None  # nothing more is written there

    def _resolve(self, persisted: Optional[str]) -> _consent.Decision:
        if self._state_refused is not None:
            return _consent.Decision(_consent.OFF, f"unsafe state files: {self._state_refused}")
        consent = self._options.consent if self._options is not None else None
        return _consent.resolve(app=self.app, consent=consent, env=os.environ, persisted=persisted)

    def _apply_decision(self, decision: _consent.Decision) -> None:
        """Make the collector, emitter and files match ``decision`` (lifecycle lock held)."""
        from telemetry._files import UnsafeStateError  # noqa: PLC0415

        try:
            self._apply_decision_to_files(decision)
        except UnsafeStateError as exc:  # a file turned unsafe since ``check()``
            self._refuse_state(str(exc))
            self._apply_decision_to_files(self._resolve(None))

    def _apply_decision_to_files(self, decision: _consent.Decision) -> None:
        assert self._state is not None and self._steering is not None
        was_off = self.decision.mode == _consent.OFF
        self.decision = decision
        logger.debug("telemetry mode: %s (%s)", decision.mode, decision.rule)
        if decision.mode == _consent.OFF:
            self._silence()
            if self._emitter is not None:
                self._emitter.discard()
                self._emitter = None
            self._buffer.take()  # data and drop counts alike: what was collected never existed
            self._events.take()
            if self._state_refused is None:
                # However much the spool holds, this thread only sets it aside.
                self._state.delete_all(in_background=True)
            return
        if self.instance_id is None:
            self.instance_id = self._state.instance_id()
        if decision.mode == _consent.ON:
            self._steering.restore()
        if was_off:
            self._buffer.take()  # start empty: nothing from before counts
            self._events.take()
        if self._steering.stopped:
            self._silence()
        else:
            self._collect()
        if self._emitter is not None:
            self._emitter.sink = self._make_sink()
        elif self._emitting_wanted and not self._steering.stopped:
            self._start()

    def _collect(self) -> None:
        """Collection calls go to the buffer, and the emitter may take payloads."""
        assert self._source is not None
        self._buffer.set_collecting(True)
        self.event_target = self._events
        self._source.instance_id = str(self.instance_id)

    def _silence(self) -> None:
        """Collection calls do nothing, and nothing more is taken (off, or the server's stop)."""
        self._buffer.set_collecting(False)
        self.event_target = NULL_EVENTS
        if self._source is not None:
            self._source.instance_id = None

    def set_consent(self, consent: _consent.ConsentArgument) -> None:
        """Persist the user's choice and apply it at once (off deletes everything).

        Raises ``ValueError`` for a value other than True, False or a mode.
        """
        mode = _consent.normalize_consent(consent)
        with self._lifecycle_lock:
            if self._state is None or mode is None:
                logger.warning("telemetry.set_consent() needs init() first and a choice")
                return
            with capture_internal_errors("set_consent"):
                if self._state_refused is None:
                    self._state.write_consent(mode)
                self._apply_decision(self._resolve(mode))

    def status(self) -> Status:
        """The mode, the rule that decided it, identity, endpoint and state paths."""
        state = self._state
        files, size = state.spool.size() if state is not None else (0, 0)
        return Status(
            mode=self.decision.mode,
            rule=self.decision.rule,
            instance_id=str(self.instance_id) if self.instance_id else None,
            endpoint=self.endpoint,
            emitting=self._emitter is not None and self._emitter.running,
            server_stopped=self._steering is not None and self._steering.stopped,
            server_disabled_keys=self._buffer.server_disabled_keys,
            config_dir=str(state.config_dir) if state is not None else None,
            state_dir=str(state.state_dir) if state is not None else None,
            spool_files=files,
            spool_bytes=size,
        )

    @property
    def mode(self) -> str:
        """``off``, ``on`` or ``local``."""
        return self.decision.mode

    # -- collection: one-line delegations to the buffer -----------------------
    # (It stores nothing while telemetry is off: ``Buffer.set_collecting``.)

    @property
    def collector(self) -> Collector:
        """Where collection calls go now: the buffer, or a null object when off."""
        return self._buffer if self._buffer.collecting else NULL_COLLECTOR

    def set(self, key: str, value: object) -> None:
        """Store ``value`` under ``key``, overwriting."""
        self._buffer.set(key, value)

    def set_nested(self, key: str, subkey: str, value: object) -> None:
        """Store ``value`` under ``key`` → ``subkey``."""
        self._buffer.set_nested(key, subkey, value)

    def add(self, key: str, amount: int) -> None:
        """Add ``amount`` to the integer counter ``key``."""
        self._buffer.add(key, amount)

    def increment(self, key: str) -> None:
        """Add 1 to the integer counter ``key``."""
        self._buffer.increment(key)

    def append(self, key: str, value: object) -> None:
        """Append ``value`` to the list ``key``."""
        self._buffer.append(key, value)

    def append_unique(self, key: str, value: object) -> None:
        """Add ``value`` to the counting set ``key``."""
        self._buffer.append_unique(key, value)

    def reset(self) -> None:
        """Empty the buffer."""
        self.collector.reset()

    # -- events: one-line delegations to the event target ---------------------

    def record(self, event_type: str, event_name: str, /, **attrs: Any) -> None:
        """Buffer one event: what happened (type and name), when, and scalar attributes."""
        self.event_target.record(event_type, event_name, attrs, None)

    def log(self, level: str, message: Any, /, **attrs: Any) -> None:
        """A log event at ``level`` (error, warn, info, debug, trace) with a message."""
        self.event_target.log(level, message, attrs, None)

    def record_raw(self, event: Mapping[str, Any]) -> bool:
        """Proxy an event built elsewhere, keeping its ``event_id`` and ``event_time``;
        False (counted as rejected, warned once) when it is not a valid event."""
        return self.event_target.record_raw(event, None)

    def with_attrs(self, **attrs: Any) -> Recorder:
        """A ``Recorder`` whose events all carry ``attrs``."""
        return Recorder._owning(self, attrs)

    @staticmethod
    def fast_hash(data: Union[str, bytes, bytearray, memoryview]) -> str:
        """xxh32 hex digest of ``data``. Not cryptographic."""
        return fast_hash(data)

    # -- snapshots and emission --------------------------------------------------

    def take_payload(self, now: Optional[datetime] = None) -> Optional[Payload]:
        """Take the whole buffer out (O(1) under its lock) as a new ``Payload``.

        Returns None when telemetry is off or not initialised.
        """
        return self._source.take(now) if self._source is not None else None

    def start_emitting(self) -> None:
        """Start the background sender; the first send happens at once."""
        with self._lifecycle_lock, capture_internal_errors("start_emitting"):
            if self._emitter is not None and self._emitter.running:
                logger.info("telemetry: start_emitting() called while already emitting; ignored")
                return
            self._emitting_wanted = True
            if self._options is None:
                logger.info("telemetry: start_emitting() before init(); nothing is sent")
            elif self._buffer.collecting:
                self._start()

    def _start(self) -> None:
        options, state = self._options, self._state
        assert options is not None and self._source is not None and self._steering is not None
        spooling = state is not None and self.decision.mode == _consent.ON
        emitter = options.make_emitter(
            source=self._source,
            steering=self._steering,
            sink=self._make_sink(),
            spool=state.spool if state is not None and spooling else None,
        )
        if state is not None and spooling and state.first_run_notice_due():
            logger.info(
                "telemetry is on for %s; turn it off with `python -m telemetry --app %s off` "
                "or by setting DO_NOT_TRACK=1",
                self.app,
                self.app,
            )
        self._emitter = emitter
        emitter.start()
        if not self._atexit_registered:
            self._atexit_registered = True
            _register_atexit(self)

    def _make_sink(self) -> Sink:
        assert self._options is not None
        local = self.decision.mode == _consent.LOCAL
        return self._options.make_sink(local=local, endpoint=self.endpoint)

    def stop_emitting(self, timeout: float = 2.0) -> None:
        """Final send, then stop; returns within ``timeout`` whatever the network does.

        What could not be delivered is written to the spool and sent at the next start.
        """
        with capture_internal_errors("stop_emitting"):
            emitter = self._emitter
            self._emitting_wanted = False
            if emitter is not None:
                emitter.stop(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Send the buffer and pending payloads now; whether all was delivered in time."""
        emitter = self._emitter
        if emitter is None:
            return False
        try:
            return emitter.flush(timeout)
        except Exception as exc:
            report_internal_error("flush", exc)
            return False

    def _at_exit(self) -> None:
        emitter = self._emitter
        if emitter is not None and emitter.running:
            self.stop_emitting(timeout=AT_EXIT_TIMEOUT)

    def _after_fork_in_child(self) -> None:
        self._lifecycle_lock = threading.RLock()
        self._buffer.after_fork_in_child()
        self._events.after_fork_in_child()
        if self._emitter is not None:
            self._emitter.after_fork_in_child()
            self._emitter = None
        self._emitting_wanted = False


def _register_atexit(client: Client) -> None:
    ref = weakref.ref(client)

    def at_exit() -> None:
        alive = ref()
        if alive is not None:
            alive._at_exit()

    atexit.register(at_exit)


_LIVE_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _register_fork_handler(client: Client) -> None:
    """Reset ``client`` in a forked child (one process-wide handler for all clients)."""
    _LIVE_CLIENTS.add(client)


def _after_fork_in_child() -> None:
    for client in list(_LIVE_CLIENTS):
        client._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


DEFAULT_CLIENT = Client()
"""The process-wide client the module-level functions act on."""
