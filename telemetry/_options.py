"""``Options``: the settings ``init()`` takes, checked once, typed for the rest of the run.

A bad setting raises ``ValueError`` naming it (misuse is the one thing
``init()`` raises for). What is made from the settings alone is made here: the
sink and the emitter (the client wires them to its buffer and steering).
Loaded by ``init()``, not on ``import telemetry``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from typing import Any, Callable, Dict, FrozenSet, Optional, Union

import attrs

from telemetry._buffer import DEFAULT_MAX_ITEMS, DEFAULT_MAX_VALUES_PER_KEY
from telemetry._consent import normalize_consent
from telemetry._emitter import Emitter, PayloadSource, Schedule, Spool, Steering, Wait, event_wait
from telemetry._events import DEFAULT_LOG_LEVEL, DEFAULT_MAX_EVENTS, EventFilter, parse_log_level
from telemetry._log import logger
from telemetry._sinks import HTTPSink, LogSink, Sink


def parse_disabled_keys(keys: Iterable[str]) -> FrozenSet[str]:
    """``disabled_keys`` as a frozenset of str; raises ``ValueError`` for anything else."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise ValueError(f"disabled_keys must be a collection of str keys, not {keys!r}")
    items = list(keys)
    if not all(isinstance(key, str) for key in items):
        raise ValueError(f"disabled_keys must hold str keys, got {items!r}")
    return frozenset(str.__str__(key) for key in items)


def _count_from(least: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if type(value) is not int or value < least:
            raise ValueError(f"{attribute.name} must be an int >= {least}, not {value!r}")

    return check


def _seconds(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be a number of seconds, not {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be more than 0 seconds, not {value!r}")


def _not_below_min_interval(
    instance: Options, attribute: attrs.Attribute[float], value: float
) -> None:
    if not value >= instance.min_interval:
        raise ValueError(f"max_interval {value!r} is below min_interval {instance.min_interval!r}")


def _callable_or_none(
    instance: object, attribute: attrs.Attribute[Optional[EventFilter]], value: object
) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{attribute.name} must be callable, not {value!r}")


def _monotonic_if_none(clock: Optional[Callable[[], float]]) -> Callable[[], float]:
    return time.monotonic if clock is None else clock


def _time_if_none(clock: Optional[Callable[[], float]]) -> Callable[[], float]:
    return time.time if clock is None else clock


def _event_wait_if_none(wait: Optional[Wait]) -> Wait:
    return event_wait if wait is None else wait


@attrs.frozen(kw_only=True)
class Options:
    """What ``init()`` was given, checked (see ``Client.init`` for each one's meaning)."""

    app: str = "telemetry"
    endpoint: Optional[str] = None
    consent: Optional[str] = attrs.field(default=None, converter=normalize_consent)
    """The application's ``consent=`` as a mode, or None."""
    disabled_keys: FrozenSet[str] = attrs.field(
        default=frozenset(), converter=parse_disabled_keys
    )
    max_items: int = attrs.field(default=DEFAULT_MAX_ITEMS, validator=_count_from(0))
    max_values_per_key: int = attrs.field(
        default=DEFAULT_MAX_VALUES_PER_KEY, validator=_count_from(0)
    )
    default_interval: float = attrs.field(default=3600.0, validator=_seconds)
    min_interval: float = attrs.field(default=60.0, validator=[_seconds, _positive])
    max_interval: float = attrs.field(
        default=86400.0, validator=[_seconds, _not_below_min_interval]
    )
    max_pending: int = attrs.field(default=8, validator=_count_from(1))
    log_level: str = attrs.field(default=DEFAULT_LOG_LEVEL, converter=parse_log_level)
    max_events: int = attrs.field(default=DEFAULT_MAX_EVENTS, validator=_count_from(0))
    event_filter: Optional[EventFilter] = attrs.field(default=None, validator=_callable_or_none)
    send_timeout: float = attrs.field(default=10.0, validator=[_seconds, _positive])
    verify: Union[bool, str, None] = None
    proxies: Optional[Dict[str, str]] = None
    sink: Optional[Sink] = None
    state_dir: Union[str, os.PathLike[str], None] = None
    clock: Callable[[], float] = attrs.field(default=None, converter=_monotonic_if_none)
    wait: Wait = attrs.field(default=None, converter=_event_wait_if_none)
    rng: Optional[random.Random] = None
    wall_clock: Callable[[], float] = attrs.field(default=None, converter=_time_if_none)

    def make_emitter(
        self, *, source: PayloadSource, steering: Steering, sink: Sink, spool: Optional[Spool]
    ) -> Emitter:
        """An emitter (not started) between ``source`` and ``sink``, timed as configured."""
        schedule = Schedule(
            default_interval=self.default_interval,
            min_interval=self.min_interval,
            max_interval=self.max_interval,
        )
        return Emitter(
            source=source, steering=steering, sink=sink, spool=spool, schedule=schedule,
            max_pending=self.max_pending, send_timeout=self.send_timeout,
            clock=self.clock, wait=self.wait, rng=self.rng,
        )

    def make_sink(self, *, local: bool, endpoint: Optional[str]) -> Sink:
        """Where payloads go: the ``sink`` given, else logged (``local``, or no endpoint)
        or POSTed to ``endpoint``."""
        if self.sink is not None:
            return self.sink
        if local:
            return LogSink()
        if not endpoint:
            logger.warning(
                "telemetry: no endpoint configured (init(endpoint=...) or TELEMETRY_ENDPOINT); "
                "payloads are logged instead of sent"
            )
            return LogSink()
        return HTTPSink(
            endpoint, verify=self.verify, proxies=self.proxies, wall_clock=self.wall_clock
        )

    def resolved_endpoint(self, environ: Any = os.environ) -> Optional[str]:
        """The endpoint given, else ``TELEMETRY_ENDPOINT``; None when neither is set."""
        return self.endpoint or environ.get("TELEMETRY_ENDPOINT") or None
