"""``Client``: wires buffer, consent and emitter together; owns the default instance.

This module is the one place that holds process-wide state: ``DEFAULT_CLIENT``,
which the module-level functions in ``telemetry/__init__.py`` delegate to.
"""

from __future__ import annotations

import atexit
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Optional, Protocol, Union

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
    parse_log_level,
)
from telemetry._log import capture_internal_errors, logger, report_internal_error

# Emission, state files and wire types (with attrs) load on first use, not on
# `import telemetry`: an application with telemetry off never pays for them.
# ruff: noqa: PLC0415
if TYPE_CHECKING:
    from telemetry._emitter import Emitter, Wait
    from telemetry._sinks import Sink
    from telemetry._state import State, Status
    from telemetry._wire import Payload, Response

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


def _parse_disabled_keys(keys: Iterable[str]) -> FrozenSet[str]:
    """``disabled_keys`` as a frozenset of str; raises ``ValueError`` for anything else."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise ValueError(f"disabled_keys must be a collection of str keys, not {keys!r}")
    items = list(keys)
    if not all(isinstance(key, str) for key in items):
        raise ValueError(f"disabled_keys must hold str keys, got {items!r}")
    return frozenset(str.__str__(key) for key in items)


def fast_hash(data: Union[str, bytes, bytearray, memoryview]) -> str:
    """xxh32 hex digest of ``data``, for anonymising values. Not cryptographic.

    A ``str`` is hashed as UTF-8 (lone surrogates kept as they are); anything
    that is neither ``str`` nor bytes-like is hashed as its ``str()``.
    """
    import xxhash

    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = (data if isinstance(data, str) else str(data)).encode("utf-8", "surrogatepass")
    return xxhash.xxh32_hexdigest(data)


class Client:
    """One application's telemetry: buffer, consent decision and emitter.

    Collection calls go to ``NULL_COLLECTOR`` until ``init()`` decides that
    telemetry is on, so they cost next to nothing when it is off.
    """

    EVENT_TYPE_LOG = EVENT_TYPE_LOG
    EVENT_TYPE_METRIC = EVENT_TYPE_METRIC
    EVENT_TYPE_BEHAVIORAL = EVENT_TYPE_BEHAVIORAL

    def __init__(self) -> None:
        self.collector: Collector = NULL_COLLECTOR
        """Where collection calls go now: the buffer, or a null object when off."""
        self.event_target: EventTarget = NULL_EVENTS
        """Where event calls go now: the event buffer, or a null object when off."""
        self._buffer = Buffer()
        self._events = EventBuffer()
        self._initialized = False
        self._options: Dict[str, Any] = {}
        self._consent_argument: Optional[str] = None
        self._state: Optional[State] = None
        self._emitter: Optional[Emitter] = None
        self._emitting_wanted = False
        self._server_stopped = False
        self._atexit_registered = False
        self.instance_id: Optional[uuid.UUID] = None
        self.app = ""
        self.endpoint: Optional[str] = None
        self.decision = _consent.Decision(_consent.OFF, "init() was not called")
        # Guards the lifecycle (init, start/stop, consent); collection never takes it.
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
        with self._lifecycle_lock:
            if self._initialized:
                raise RuntimeError("telemetry.init() was already called for this client")
            parsed_id = parse_instance_id(instance_id)
            consent_mode = _consent.normalize_consent(consent)
            disabled = _parse_disabled_keys(disabled_keys)
            for name, count, least in (
                ("max_items", max_items, 0),
                ("max_values_per_key", max_values_per_key, 0),
                ("max_pending", max_pending, 1),
                ("max_events", max_events, 0),
            ):
                if type(count) is not int or count < least:
                    raise ValueError(f"{name} must be an int >= {least}, not {count!r}")
            intervals = (default_interval, min_interval, max_interval, send_timeout)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in intervals):
                raise ValueError("intervals and send_timeout must be numbers of seconds")
            if not 0 < min_interval <= max_interval or send_timeout <= 0:
                raise ValueError("need 0 < min_interval <= max_interval and send_timeout > 0")
            log_level = parse_log_level(log_level)
            if event_filter is not None and not callable(event_filter):
                raise ValueError(f"event_filter must be callable, not {event_filter!r}")
            from telemetry._state import State

            state = State(app, root=state_dir)  # raises ValueError for a bad app name
            self._initialized = True
            self._state = state
            self.app = app
            self.endpoint = endpoint or os.environ.get("TELEMETRY_ENDPOINT") or None
            self._consent_argument = consent_mode
            self._options = {
                "intervals": (default_interval, min_interval, max_interval),
                "max_pending": max_pending,
                "send_timeout": send_timeout,
                "verify": verify,
                "proxies": proxies,
                "sink": sink,
                "clock": clock or time.monotonic,
                "wait": wait,
                "rng": rng,
                "wall_clock": wall_clock or time.time,
            }
            self._buffer = Buffer(
                max_items=max_items,
                max_values_per_key=max_values_per_key,
                disabled_keys=disabled,
            )
            self._events = EventBuffer(
                max_events=max_events,
                log_level=log_level,
                event_filter=event_filter,
                wall_clock=self._options["wall_clock"],
                disabled_keys=disabled,
            )
            self.instance_id = parsed_id
            self._apply_decision(self._resolve(self._read_persisted_consent()))

    # -- consent -----------------------------------------------------------------

    def _read_persisted_consent(self) -> Optional[str]:
        return self._state.read_consent() if self._state is not None else None

    def _resolve(self, persisted: Optional[str]) -> _consent.Decision:
        return _consent.resolve(
            app=self.app, consent=self._consent_argument, env=os.environ, persisted=persisted
        )

    def _apply_decision(self, decision: _consent.Decision) -> None:
        """Make the collector, emitter and files match ``decision`` (lifecycle lock held)."""
        was_off = self.decision.mode == _consent.OFF
        self.decision = decision
        logger.debug("telemetry mode: %s (%s)", decision.mode, decision.rule)
        if decision.mode == _consent.OFF:
            self.collector = NULL_COLLECTOR
            self.event_target = NULL_EVENTS
            if self._emitter is not None:
                self._emitter.discard()
                self._emitter = None
            self._buffer.take()  # data and drop counts alike: what was collected never existed
            self._events.take()
            if self._state is not None:
                self._state.delete_all()
            return
        if self.instance_id is None:
            self.instance_id = self._state.instance_id() if self._state else uuid.uuid4()
        if decision.mode == _consent.ON and self._state is not None and self.endpoint:
            policy = self._state.read_policy(self.endpoint)
            self._server_stopped = policy.stopped(self._options["wall_clock"]())
            self._buffer.disable_keys(policy.disabled_keys)
            self._sync_event_keys()
        if was_off:
            self._buffer.take()  # start empty: nothing from before counts
            self._events.take()
        self.collector = NULL_COLLECTOR if self._server_stopped else self._buffer
        self.event_target = NULL_EVENTS if self._server_stopped else self._events
        if self._emitter is not None:
            self._emitter.sink = self._make_sink()
        elif self._emitting_wanted and not self._server_stopped:
            self._start()

    def set_consent(self, consent: _consent.ConsentArgument) -> None:
        """Persist the user's choice and apply it at once (off deletes everything).

        Raises ``ValueError`` for a value other than True, False or a mode.
        """
        mode = _consent.normalize_consent(consent)
        with self._lifecycle_lock:
            if not self._initialized or mode is None:
                logger.warning("telemetry.set_consent() needs init() first and a choice")
                return
            with capture_internal_errors("set_consent"):
                if self._state is not None:
                    self._state.write_consent(mode)
                self._apply_decision(self._resolve(mode))

    def status(self) -> Status:
        """The mode, the rule that decided it, identity, endpoint and state paths."""
        from telemetry._state import Status

        state = self._state
        files, size = state.spool_size() if state is not None else (0, 0)
        return Status(
            mode=self.decision.mode,
            rule=self.decision.rule,
            instance_id=str(self.instance_id) if self.instance_id else None,
            endpoint=self.endpoint,
            emitting=self._emitter is not None and self._emitter.running,
            server_stopped=self._server_stopped,
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

    # -- collection: one-line delegations to the collector --------------------

    def set(self, key: str, value: object) -> None:
        """Store ``value`` under ``key``, overwriting."""
        self.collector.set(key, value)

    def set_nested(self, key: str, subkey: str, value: object) -> None:
        """Store ``value`` under ``key`` → ``subkey``."""
        self.collector.set_nested(key, subkey, value)

    def add(self, key: str, amount: int) -> None:
        """Add ``amount`` to the integer counter ``key``."""
        self.collector.add(key, amount)

    def increment(self, key: str) -> None:
        """Add 1 to the integer counter ``key``."""
        self.collector.increment(key)

    def append(self, key: str, value: object) -> None:
        """Append ``value`` to the list ``key``."""
        self.collector.append(key, value)

    def append_unique(self, key: str, value: object) -> None:
        """Add ``value`` to the counting set ``key``."""
        self.collector.append_unique(key, value)

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
        return Recorder(self, attrs)

    @staticmethod
    def fast_hash(data: Union[str, bytes, bytearray, memoryview]) -> str:
        """xxh32 hex digest of ``data``. Not cryptographic."""
        return fast_hash(data)

    # -- snapshots and emission --------------------------------------------------

    def take_payload(self, now: Optional[datetime] = None) -> Optional[Payload]:
        """Take the whole buffer out (O(1) under its lock) as a new ``Payload``.

        Returns None when telemetry is off or not initialised.
        """
        from telemetry._wire import Payload

        if self.collector is NULL_COLLECTOR or self.instance_id is None:
            return None
        snapshot = self._buffer.take()
        events = self._events.take()
        return Payload(
            instance_id=str(self.instance_id),
            timestamp=now or datetime.fromtimestamp(self._options["wall_clock"](), timezone.utc),
            data=snapshot.data,
            dropped=snapshot.dropped + events.rejected,
            items=snapshot.items + len(events.events),
            events=events.events,
            dropped_events=events.dropped_events,
        )

    def _has_data(self) -> bool:
        return self._buffer.has_data() or self._events.has_events()

    def _sync_event_keys(self) -> None:
        """Give the event buffer the disabled keys now in force."""
        self._events.set_disabled_keys(
            self._buffer.app_disabled_keys | self._buffer.server_disabled_keys
        )

    def start_emitting(self) -> None:
        """Start the background sender; the first send happens at once."""
        with self._lifecycle_lock, capture_internal_errors("start_emitting"):
            if self._emitter is not None and self._emitter.running:
                logger.info("telemetry: start_emitting() called while already emitting; ignored")
                return
            self._emitting_wanted = True
            if not self._initialized:
                logger.info("telemetry: start_emitting() before init(); nothing is sent")
            elif self.collector is not NULL_COLLECTOR:
                self._start()

    def _start(self) -> None:
        from telemetry._emitter import Emitter, Schedule, event_wait

        default_interval, min_interval, max_interval = self._options["intervals"]
        state = self._state if self.decision.mode == _consent.ON else None
        options = self._options
        emitter = Emitter(
            sink=self._make_sink(),
            take_payload=self.take_payload,
            on_response=self._apply_response,
            count_dropped=self._buffer.count_dropped,
            has_data=self._has_data,
            schedule=Schedule(
                default_interval=default_interval,
                min_interval=min_interval,
                max_interval=max_interval,
            ),
            max_pending=options["max_pending"],
            send_timeout=options["send_timeout"],
            spool=state,
            clock=options["clock"],
            wait=options["wait"] or event_wait,
            rng=options["rng"],
        )
        if state is not None:
            for index, claimed in enumerate(state.claim()):
                if index < emitter.max_pending:
                    emitter.add_pending(claimed.payload, claimed.done, claimed.release)
                else:
                    claimed.release()  # the next process (or restart) sends these
            if state.first_run_notice_due():
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
        from telemetry._sinks import HTTPSink, LogSink

        custom: Optional[Sink] = self._options.get("sink")
        if custom is not None:
            return custom
        if self.decision.mode == _consent.LOCAL:
            return LogSink()
        if not self.endpoint:
            logger.warning(
                "telemetry: no endpoint configured (init(endpoint=...) or TELEMETRY_ENDPOINT); "
                "payloads are logged instead of sent"
            )
            return LogSink()
        return HTTPSink(
            self.endpoint,
            verify=self._options["verify"],
            proxies=self._options["proxies"],
            wall_clock=self._options["wall_clock"],
        )

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

    def _apply_response(self, response: Response) -> bool:
        """Apply the server's instructions; False when it said stop (emitter thread)."""
        from telemetry._state import ServerPolicy

        if response.error:
            logger.warning("telemetry server says: %s", response.error[:500])
        if response.stop:
            self._stop_by_server()
            return False
        before = self._buffer.server_disabled_keys
        disable = frozenset(response.disable_keys)
        enable = frozenset(response.enable_keys) - disable
        if enable:
            self._buffer.enable_keys(enable)
        if disable:
            self._buffer.disable_keys(disable)
        after = self._buffer.server_disabled_keys
        if after != before:
            self._sync_event_keys()
        if after != before and self._state is not None and self.endpoint:
            self._state.write_policy(self.endpoint, ServerPolicy(disabled_keys=after))
        return True

    def _stop_by_server(self) -> None:
        from telemetry._state import STOP_REMEMBERED_FOR, ServerPolicy

        logger.info("telemetry: the server asked this client to stop sending; stopped")
        self._server_stopped = True
        self.collector = NULL_COLLECTOR
        self.event_target = NULL_EVENTS
        self._buffer.reset()
        self._events.reset()
        if self._state is not None and self.endpoint:
            until = self._options["wall_clock"]() + STOP_REMEMBERED_FOR
            self._state.write_policy(
                self.endpoint,
                ServerPolicy(disabled_keys=self._buffer.server_disabled_keys, stop_until=until),
            )

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
