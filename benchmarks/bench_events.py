"""Event-call benchmarks: ``record``/``log``/``record_raw``/``with_attrs`` beside the floor.

The floor is ``bench_client.floor`` (a locked dictionary increment), timed in the
same rounds as each call. Both are timed in the thread's CPU time
(``time.thread_time``), so that other processes taking the CPU away (a shared
machine) do not count; a single-threaded loop's CPU time is its wall time less
those interruptions. Calls go through the module-level functions to the
default client, which ``bench_client.init_default_client()`` turns on; the
buffered events are taken out before every round, so every round measures the
path of an event that is kept (not of one dropped for want of room).
"""

from __future__ import annotations

import time
import timeit
from typing import Any, Dict, Tuple

import telemetry
from benchmarks.bench_client import FLOOR_STMT, best_beside_floor, figures, floor

__all__ = ["EVENT_CALLS", "event_calls"]

_RAW = {
    "event_id": "0123456789abcdef0123456789abcdef",
    "event_time": "2026-11-23T10:00:00.250000Z",
    "event_type": "behavioral",
    "event_name": "ui-click",
    "button": "save",
}

_NAMESPACE: Dict[str, Any] = {
    "floor": floor,
    "record": telemetry.record,
    "log": telemetry.log,
    "record_raw": telemetry.record_raw,
    "with_attrs": telemetry.with_attrs,
    "raw": _RAW,
}

EVENT_CALLS: Dict[str, str] = {
    "record, 2 attrs": "record('behavioral', 'login', user='u1', ok=True)",
    "record, no attrs": "record('behavioral', 'app-start')",
    "recorder.record, 1+1 attrs": "recorder.record('behavioral', 'login', user='u1')",
    "log below threshold": "log('debug', 'cache miss')",
    "log below threshold, 1 attr": "log('debug', 'cache miss', key='k')",
    "log, recorded": "log('info', 'started')",
    "record_raw": "record_raw(raw)",
    "with_attrs, 1 attr": "with_attrs(service='api')",
}
"""name -> statement. ``log('debug', ...)`` is below the default threshold (info)."""


def _best_ns(stmt: str, number: int, rounds: int) -> Tuple[float, float]:
    """Best-of-``rounds`` ns per call of ``stmt`` and of the floor, rounds interleaved."""
    subject = timeit.Timer(stmt, globals=_NAMESPACE, timer=time.thread_time)
    baseline = timeit.Timer(FLOOR_STMT, globals=_NAMESPACE, timer=time.thread_time)
    # No events left over before a round: each is kept, not dropped.
    return best_beside_floor(subject, baseline, telemetry.take_payload, number, rounds)


def event_calls(number: int = 5_000, rounds: int = 20) -> Dict[str, Dict[str, float]]:
    """ns/call of each event call (default client) beside the floor, and the ratio.

    ``number`` stays below ``max_events`` (10,000): every call is a kept event.
    Telemetry's mode (on, or off under ``bench_client.consent_off()``) decides
    which path is measured.
    """
    _NAMESPACE["recorder"] = telemetry.with_attrs(service="api")  # on today's default client
    results: Dict[str, Dict[str, float]] = {}
    for name, stmt in EVENT_CALLS.items():
        results[name] = figures(*_best_ns(stmt, number, rounds))
    telemetry.take_payload()
    return results
