"""Opt-in, server-steered usage telemetry.

Call ``init()`` once at start-up, then the fire-and-forget collection calls
(``set``, ``increment``, ``append_unique`` ...), then ``start_emitting()``.
Every module-level function delegates to one process-wide default ``Client``
(collection calls go straight to its current collector: one call less on the hot path).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from telemetry._buffer import DEFAULT_MAX_ITEMS, DEFAULT_MAX_VALUES_PER_KEY
from telemetry._client import DEFAULT_CLIENT as _DEFAULT
from telemetry._client import Client, InstanceId, fast_hash
from telemetry._consent import ConsentArgument
from telemetry._version import __version__

if TYPE_CHECKING:
    from telemetry._wire import Payload, Response

__all__ = [
    "Client",
    "Payload",
    "Response",
    "__version__",
    "add",
    "append",
    "append_unique",
    "fast_hash",
    "increment",
    "init",
    "reset",
    "set",
    "set_nested",
]

def init(
    instance_id: InstanceId = None,
    *,
    app: str = "telemetry",
    consent: ConsentArgument = None,
    disabled_keys: Iterable[str] = (),
    max_items: int = DEFAULT_MAX_ITEMS,
    max_values_per_key: int = DEFAULT_MAX_VALUES_PER_KEY,
) -> None:
    """Initialise the default client once, at start-up (see ``Client.init``)."""
    _DEFAULT.init(
        instance_id,
        app=app,
        consent=consent,
        disabled_keys=disabled_keys,
        max_items=max_items,
        max_values_per_key=max_values_per_key,
    )

def set(key: str, value: object) -> None:
    """Store ``value`` under ``key``, overwriting."""
    _DEFAULT.collector.set(key, value)

def set_nested(key: str, subkey: str, value: object) -> None:
    """Store ``value`` under ``key`` → ``subkey``."""
    _DEFAULT.collector.set_nested(key, subkey, value)

def add(key: str, amount: int) -> None:
    """Add ``amount`` to the integer counter ``key``; a new key starts at ``amount``."""
    _DEFAULT.collector.add(key, amount)

def increment(key: str) -> None:
    """Add 1 to the integer counter ``key``."""
    _DEFAULT.collector.increment(key)

def append(key: str, value: object) -> None:
    """Append ``value`` to the list ``key``."""
    _DEFAULT.collector.append(key, value)

def append_unique(key: str, value: object) -> None:
    """Add ``value`` to the counting set ``key``, counting how often each value came."""
    _DEFAULT.collector.append_unique(key, value)

def reset() -> None:
    """Empty the buffer."""
    _DEFAULT.collector.reset()

def __getattr__(name: str) -> Any:
    # The wire types need attrs; load them on first use so `import telemetry` stays light.
    if name in ("Payload", "Response"):
        from telemetry import _wire  # noqa: PLC0415

        return getattr(_wire, name)
    raise AttributeError(f"module 'telemetry' has no attribute {name!r}")
