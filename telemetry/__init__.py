"""Opt-in, server-steered usage telemetry.

Call ``init()`` once at start-up, then the fire-and-forget collection calls
(``set``, ``increment``, ``append_unique`` ...), then ``start_emitting()``.
Every module-level function acts on one process-wide default ``Client``; the
collection calls are its buffer's own methods (no delegation on the hot path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from telemetry._client import DEFAULT_CLIENT as _DEFAULT
from telemetry._client import Client, Status, fast_hash
from telemetry._events import (
    EVENT_TYPE_BEHAVIORAL,
    EVENT_TYPE_LOG,
    EVENT_TYPE_METRIC,
    LEVELS,
    Recorder,
)
from telemetry._version import __version__

if TYPE_CHECKING:
    from typing import Concatenate, ParamSpec, TypeVar

    from telemetry._wire import Payload, Response

    P = ParamSpec("P")
    R = TypeVar("R")

__all__ = [
    "EVENT_TYPE_BEHAVIORAL",
    "EVENT_TYPE_LOG",
    "EVENT_TYPE_METRIC",
    "LEVELS",
    "Client",
    "Payload",
    "Recorder",
    "Response",
    "Status",
    "__version__",
    "add",
    "append",
    "append_unique",
    "fast_hash",
    "flush",
    "increment",
    "init",
    "log",
    "record",
    "record_raw",
    "reset",
    "set",
    "set_consent",
    "set_nested",
    "start_emitting",
    "status",
    "stop_emitting",
    "take_payload",
    "with_attrs",
]


def _delegate(method: Callable[Concatenate[Client, P], R]) -> Callable[P, R]:
    """A module-level function that calls ``method`` on the default client."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return method(_DEFAULT, *args, **kwargs)

    return call


init = _delegate(Client.init)
start_emitting = _delegate(Client.start_emitting)
stop_emitting = _delegate(Client.stop_emitting)
flush = _delegate(Client.flush)
set_consent = _delegate(Client.set_consent)
status = _delegate(Client.status)
take_payload = _delegate(Client.take_payload)


# The collection calls are the default client's buffer's own methods: one call on
# the hot path, no delegation. That buffer lives as long as the client (``init()``
# configures it), and while telemetry is off or not initialised it returns at once.
_BUFFER_CALLS = ("set", "set_nested", "add", "increment", "append", "append_unique")
set = _DEFAULT._buffer.set
set_nested = _DEFAULT._buffer.set_nested
add = _DEFAULT._buffer.add
increment = _DEFAULT._buffer.increment
append = _DEFAULT._buffer.append
append_unique = _DEFAULT._buffer.append_unique

def reset() -> None:
    """Empty the buffer."""
    _DEFAULT.collector.reset()

def record(event_type: str, event_name: str, /, **attrs: Any) -> None:
    """Buffer one event: what happened (type and name), when, and scalar attributes."""
    _DEFAULT.event_target.record(event_type, event_name, attrs, None)

def log(level: str, message: Any, /, **attrs: Any) -> None:
    """A log event at ``level`` (error, warn, info, debug, trace) with a message."""
    _DEFAULT.event_target.log(level, message, attrs, None)

def record_raw(event: Mapping[str, Any]) -> bool:
    """Proxy an event built elsewhere (e.g. by a UI), keeping its id and time."""
    return _DEFAULT.event_target.record_raw(event, None)

def with_attrs(**attrs: Any) -> Recorder:
    """A ``Recorder`` whose events all carry ``attrs``."""
    return Recorder._owning(_DEFAULT, attrs)

def __getattr__(name: str) -> Any:
    # The wire types need attrs; load them on first use so `import telemetry` stays light.
    if name in ("Payload", "Response"):
        from telemetry import _wire  # noqa: PLC0415

        return getattr(_wire, name)
    raise AttributeError(f"module 'telemetry' has no attribute {name!r}")
