"""A bounded soak: N simulated instances x M cycles against one ``server_stub``, on loopback.

Run: ``python benchmarks/soak.py [--instances 50] [--cycles 20] [--fault-rate 0.1]
[--seed 1] [--json]``. It stops by itself (every wait is bounded, and ``--deadline``
caps the whole run) and exits 1 unless nothing was lost and nothing counted twice.

Each instance is a real ``telemetry.Client`` with its real HTTP sink. Its emitter
runs on a fast-forward clock (one simulated second is a millisecond), so
backoffs and ``Retry-After`` waits cost next to nothing, and each cycle is a
``flush()``. Before every cycle a seeded share of the requests is scripted to
fail: 5xx (some after storing), 429, 408, dropped connections (before or after
storing), slow answers past the client's timeout, non-JSON 2xx. When the cycles
are over the faults stop and every instance flushes and stops. The server's
totals must then equal what the instances collected, per instance.

Reported: lost and duplicated items (must both be 0), the server's p50/p99
handling time per processed request, the client's p99 round trip, throughput.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make ``server_stub`` and ``telemetry`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import telemetry
from benchmarks._shared import percentile
from server_stub import Server, serve
from telemetry._sinks import HTTPSink, SendResult
from telemetry._wire import Request

__all__ = ["soak"]

SCALE = 0.001  # real seconds per simulated second, for the clients' clocks and waits
SEND_TIMEOUT = 0.3  # real seconds; a "slow" fault answers after SLOW_DELAY
SLOW_DELAY = 0.5
FLUSH_TIMEOUT = 10.0
DRAIN_FLUSHES = 5


def _fast_clock() -> float:
    return time.monotonic() / SCALE


def _fast_wait(event: threading.Event, seconds: float) -> object:
    return event.wait(seconds * SCALE)


def _script_fault(server: Server, rng: random.Random) -> None:
    kind = rng.choice(["500", "500-stored", "503", "429", "408", "drop", "drop-after-store",
                       "html-200", "slow"])
    if kind == "500":
        server.script(status=500)
    elif kind == "500-stored":  # the server stored it, then failed to answer
        server.script(status=500, store=True)
    elif kind == "503":
        server.script(status=503, headers={"Retry-After": "2"})
    elif kind == "429":
        server.script(status=429, headers={"Retry-After": str(rng.randint(0, 30))})
    elif kind == "408":
        server.script(status=408)
    elif kind == "drop":
        server.script(drop=True)
    elif kind == "drop-after-store":
        server.script(drop_after_store=True)
    elif kind == "html-200":
        server.script(status=200, body=b"<html>", store=rng.random() < 0.5)
    else:  # answered (and stored) after the client gave up
        server.script(delay=SLOW_DELAY)


class _TimedApp:
    """The server's WSGI app, timing each request it processes (scripted answers aside)."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()
        self.seconds: List[float] = []

    def __call__(self, environ: Any, start_response: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._app(environ, start_response)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.seconds.append(elapsed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)


class _TimedSink:
    """The HTTP sink, timing each round trip as the client sees it."""

    def __init__(self, endpoint: str, seconds: List[float], lock: threading.Lock) -> None:
        self._sink = HTTPSink(endpoint)
        self._seconds = seconds
        self._lock = lock

    def __call__(self, request: Request, timeout: float) -> SendResult:
        started = time.perf_counter()
        try:
            return self._sink(request, timeout)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self._seconds.append(elapsed)


def _percentile_ms(values: List[float], fraction: float) -> float:
    return round(percentile(sorted(values), fraction) * 1000, 2)


def soak(
    instances: int = 50,
    cycles: int = 20,
    *,
    fault_rate: float = 0.1,
    seed: int = 1,
    workers: int = 8,
    deadline: float = 300.0,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Run the soak; returns its figures (``lost`` and ``duplicated`` must be 0)."""
    rng = random.Random(seed)
    started = time.monotonic()
    give_up_at = started + deadline
    with tempfile.TemporaryDirectory(prefix="telemetry-soak-") as tmp, serve(
        "127.0.0.1", 0, db=str(Path(tmp) / "soak.db")
    ) as server:
        timed_app = _TimedApp(server.app)
        setattr(server, "app", timed_app)  # noqa: B010  # the harness calls server.app
        round_trips: List[float] = []
        round_trips_lock = threading.Lock()
        clients: List[telemetry.Client] = []
        for index in range(instances):
            client = telemetry.Client()
            client.init(
                uuid.uuid4(),
                app="soak",
                consent=True,
                endpoint=server.url,
                sink=_TimedSink(server.url, round_trips, round_trips_lock),
                state_dir=Path(tmp) / f"instance-{index}",
                default_interval=3600.0,
                min_interval=3600.0,
                max_interval=3600.0,
                max_pending=64,
                send_timeout=SEND_TIMEOUT,
                clock=_fast_clock,
                wait=_fast_wait,
                rng=random.Random(seed * 100_003 + index),
            )
            clients.append(client)
        expected = [0] * instances  # items each instance collected
        faults = 0

        def run_cycle(index: int, calls: int) -> bool:
            client = clients[index]
            for _ in range(calls):
                client.increment("calls")
                client.append_unique("instance", index)
            client.set("version", "1.4.2")
            return client.flush(timeout=FLUSH_TIMEOUT)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for client in clients:
                client.start_emitting()
            completed = 0
            for cycle in range(cycles):
                if time.monotonic() > give_up_at:
                    log(f"soak: deadline reached after {cycle} cycles")
                    break
                scripted = sum(1 for _ in range(instances) if rng.random() < fault_rate)
                for _ in range(scripted):
                    _script_fault(server, rng)
                faults += scripted
                batch = [rng.randint(1, 20) for _ in range(instances)]
                for index, calls in enumerate(batch):
                    expected[index] += calls
                list(pool.map(run_cycle, range(instances), batch))
                completed += 1
            # The faults stop: whatever is left in the script is used up, then all deliver.
            undelivered = 0
            for client in clients:
                for _ in range(DRAIN_FLUSHES):
                    if client.flush(timeout=FLUSH_TIMEOUT):
                        break
                else:
                    undelivered += 1
            for client in clients:
                client.stop_emitting(timeout=5.0)
        elapsed = time.monotonic() - started

        stats = server.stats()
        stored = {item["value"]: item["count"] for item in stats["keys"].get("instance", [])}
        lost = sum(max(0, want - stored.get(index, 0)) for index, want in enumerate(expected))
        duplicated = sum(
            max(0, stored.get(index, 0) - want) for index, want in enumerate(expected)
        ) + sum(count for value, count in stored.items() if not 0 <= value < instances)
        spooled = sum(1 for path in Path(tmp).glob("instance-*/soak/state/telemetry-spool/*"))
        calls_ok = stats["keys"].get("calls") == sum(expected)
        server_seconds = list(timed_app.seconds)
        result: Dict[str, Any] = {
            "instances": instances,
            "cycles": completed,
            "fault_rate": fault_rate,
            "seed": seed,
            "faults_scripted": faults,
            "requests": len(server.requests),
            "items_collected": sum(expected),
            "lost": lost,
            "duplicated": duplicated,
            "calls_total_matches": calls_ok,
            "dropped_reported": stats["dropped"],
            "undelivered_instances": undelivered,
            "left_in_spool": spooled,
            "server_p50_ms": _percentile_ms(server_seconds, 0.50),
            "server_p99_ms": _percentile_ms(server_seconds, 0.99),
            "client_round_trip_p99_ms": _percentile_ms(round_trips, 0.99),
            "seconds": round(elapsed, 2),
        }
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds after which no new cycle starts")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.cycles < 0 or not 0 <= args.fault_rate <= 1:
        parser.error("need --instances >= 1, --cycles >= 0 and 0 <= --fault-rate <= 1")
    result = soak(
        args.instances, args.cycles, fault_rate=args.fault_rate, seed=args.seed,
        workers=args.workers, deadline=args.deadline,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:26} {value}")
    clean = (result["lost"] == 0 and result["duplicated"] == 0 and result["calls_total_matches"]
             and result["left_in_spool"] == 0)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
