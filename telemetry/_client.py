"""``Client``: wires buffer, consent and emitter together; owns the default instance.

This module is the one place that holds process-wide state: ``DEFAULT_CLIENT``,
which the module-level functions in ``telemetry/__init__.py`` delegate to.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional, Protocol, Union

from telemetry import _consent
from telemetry._buffer import DEFAULT_MAX_ITEMS, DEFAULT_MAX_VALUES_PER_KEY, Buffer
from telemetry._log import logger

if TYPE_CHECKING:  # the wire types (and attrs) load with the emitter, not on import
    from telemetry._wire import Payload

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


def fast_hash(data: Union[bytes, str]) -> str:
    """xxh32 hex digest of ``data``, for anonymising values. Not cryptographic."""
    import xxhash  # noqa: PLC0415 - only hosts that hash pay for the import

    return xxhash.xxh32_hexdigest(data.encode("utf-8") if isinstance(data, str) else data)


class Client:
    """One application's telemetry: buffer, consent decision and emitter.

    Collection calls go to ``NULL_COLLECTOR`` until ``init()`` decides that
    telemetry is on, so they cost next to nothing when it is off.
    """

    def __init__(self) -> None:
        self.collector: Collector = NULL_COLLECTOR
        """Where collection calls go now: the buffer, or a null object when off."""
        self._buffer: Optional[Buffer] = None
        self._initialized = False
        self.instance_id: Optional[uuid.UUID] = None
        self.app = ""
        self.decision = _consent.Decision(_consent.OFF, "init() was not called")
        # Guards the lifecycle (init, start/stop, consent); collection never takes it.
        self._lifecycle_lock = threading.RLock()
        _register_fork_handler(self)

    def init(
        self,
        instance_id: InstanceId = None,
        *,
        app: str = "telemetry",
        consent: _consent.ConsentArgument = None,
        disabled_keys: Iterable[str] = (),
        max_items: int = DEFAULT_MAX_ITEMS,
        max_values_per_key: int = DEFAULT_MAX_VALUES_PER_KEY,
    ) -> None:
        """Initialise once, at start-up. Raises only for misuse.

        Raises ``ValueError`` for a nil or unparsable ``instance_id`` or a bad
        argument, ``RuntimeError`` when called a second time.
        """
        with self._lifecycle_lock:
            if self._initialized:
                raise RuntimeError("telemetry.init() was already called for this client")
            parsed_id = parse_instance_id(instance_id)
            consent_mode = _consent.normalize_consent(consent)
            if isinstance(disabled_keys, str):
                raise ValueError("disabled_keys must be a collection of keys, not a str")
            disabled = frozenset(disabled_keys)
            if not all(isinstance(key, str) for key in disabled):
                raise ValueError("disabled_keys must hold str keys")
            if max_items < 0 or max_values_per_key < 0:
                raise ValueError("max_items and max_values_per_key must not be negative")
            self._initialized = True
            self.app = app
            self.instance_id = parsed_id or uuid.uuid4()
            self.decision = _consent.resolve(
                app=app, consent=consent_mode, env=os.environ, persisted=None
            )
            self._buffer = Buffer(
                max_items=max_items,
                max_values_per_key=max_values_per_key,
                disabled_keys=disabled,
            )
            if self.decision.mode != _consent.OFF:
                self.collector = self._buffer
            logger.debug("telemetry initialised: mode %s (%s)", self.decision.mode,
                         self.decision.rule)

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

    @staticmethod
    def fast_hash(data: Union[bytes, str]) -> str:
        """xxh32 hex digest of ``data``. Not cryptographic."""
        return fast_hash(data)

    # -- snapshots -------------------------------------------------------------

    def take_payload(self, now: Optional[datetime] = None) -> Optional[Payload]:
        """Take the whole buffer out (O(1) under its lock) as a new ``Payload``.

        Returns None when telemetry is off or not initialised.
        """
        from telemetry._wire import Payload  # noqa: PLC0415 - attrs loads with the emitter

        buffer = self._buffer
        if buffer is None or self.collector is NULL_COLLECTOR or self.instance_id is None:
            return None
        snapshot = buffer.take()
        return Payload(
            instance_id=str(self.instance_id),
            timestamp=now or datetime.now(timezone.utc),
            data=snapshot.data,
            dropped=snapshot.dropped,
            items=snapshot.items,
        )

    def _after_fork_in_child(self) -> None:
        self._lifecycle_lock = threading.RLock()
        if self._buffer is not None:
            self._buffer.after_fork_in_child()


def _register_fork_handler(client: Client) -> None:
    if not hasattr(os, "register_at_fork"):
        return
    ref = weakref.ref(client)

    def after_in_child() -> None:
        alive = ref()
        if alive is not None:
            alive._after_fork_in_child()

    os.register_at_fork(after_in_child=after_in_child)


DEFAULT_CLIENT = Client()
"""The process-wide client the module-level functions act on."""
