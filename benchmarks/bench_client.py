"""Client benchmarks: each figure beside its baseline, measured in the same process and run.

Every function returns a plain dict (JSON-ready) and takes its sizes as arguments,
so ``run.py`` can run them full size and ``tests/test_benchmarks.py`` tiny.
The collection-call figures use the module-level functions on the default
client, which ``init_default_client()`` turns on once per process.
"""

from __future__ import annotations

import array
import bisect
import gc
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import tracemalloc
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import telemetry
from telemetry._sinks import SendResult
from telemetry._wire import Request, encode_request

__all__ = [
    "CALLS",
    "FILLS",
    "NEW_VALUE_FLOORS",
    "STALL_FILLS",
    "best_beside_floor",
    "buffer_memory",
    "collection_calls",
    "consent_off",
    "contended",
    "figures",
    "fill_counters",
    "fill_counting_sets",
    "fill_events",
    "fill_lists",
    "fill_mappings",
    "fill_mixed",
    "floor",
    "import_time",
    "init_default_client",
    "isolated_client",
    "server_process",
    "snapshot_encode",
    "spool_start",
    "stall",
    "stall_every_shape",
    "withdraw_spool",
]

# -- the floor: what a fire-and-forget call cannot beat ------------------------------

_floor_lock = threading.Lock()
_floor_counts: Dict[str, int] = {}


def floor(key: str) -> None:
    """A bare locked dictionary increment: the cost every collection call is compared with."""
    with _floor_lock:
        _floor_counts[key] = _floor_counts.get(key, 0) + 1


FLOOR_STMT = "floor('requests')"
# Like for like, the floor of a call that stores a new value each time takes the
# same ``next(fresh)`` argument: its dictionary gains a key per call too (it is
# emptied before each round, as the buffer is).
NEW_VALUE_FLOORS: Dict[str, str] = {"append_unique (miss)": "floor(next(fresh))"}

# name -> (statement, setup run before each round). The setup makes the key exist
# (the "hit" path every call but the first takes) in a buffer emptied first, so
# appends measure the real path, not the per-key cap's rejection path.
CALLS: Dict[str, Tuple[str, Callable[[], None]]] = {
    "increment": ("increment('requests')", lambda: telemetry.increment("requests")),
    "add": ("add('bytes', 512)", lambda: telemetry.add("bytes", 1)),
    "set": ("set_value('version', '1.4.2')", lambda: telemetry.set("version", "1.4.1")),
    "set_nested": ("set_nested('platform', 'os', 'linux')",
                   lambda: telemetry.set_nested("platform", "os", "x")),
    "append": ("append('errors', 'timeout')", lambda: telemetry.append("errors", "timeout")),
    "append_unique (hit)": ("append_unique('agents', 'curl')",
                            lambda: telemetry.append_unique("agents", "curl")),
    # A new distinct value on every call; ``next(fresh)`` is charged to the call.
    "append_unique (miss)": ("append_unique('agents', next(fresh))",
                             lambda: telemetry.append_unique("agents", -1)),
}


def _namespace() -> Dict[str, Any]:
    """The statements' names: the floor and the module-level functions, as a user's
    ``from telemetry import increment`` gets them (looked up now: tests swap the
    default client)."""
    return {
        "floor": floor,
        "increment": telemetry.increment,
        "add": telemetry.add,
        "set_value": telemetry.set,
        "set_nested": telemetry.set_nested,
        "append": telemetry.append,
        "append_unique": telemetry.append_unique,
    }


# Big enough that no round of appends reaches a cap (the buffer is reset between rounds).
_UNBOUNDED = 1 << 40


def init_default_client(state_dir: str) -> None:
    """Turn the process-wide default client on (once), with no emitter and no caps."""
    if telemetry.status().mode != "on":
        telemetry.init(
            uuid.uuid4(),
            app="bench",
            consent=True,
            endpoint="http://127.0.0.1:9",  # never used: the default client does not emit
            state_dir=state_dir,
            max_items=_UNBOUNDED,
            max_values_per_key=_UNBOUNDED,
        )
    if telemetry.status().mode != "on":
        raise RuntimeError(f"telemetry is not on: {telemetry.status().rule}")


def best_beside_floor(
    subject: timeit.Timer, baseline: timeit.Timer, before_round: Callable[[], object],
    number: int, rounds: int,
) -> Tuple[float, float]:
    """Best-of-``rounds`` ns per call of ``subject`` and of ``baseline`` (the floor),
    rounds interleaved, ``before_round()`` before each.

    A first, shorter round warms both up and is not counted.
    """
    best_subject = best_floor = float("inf")
    for round_number in range(rounds + 1):
        before_round()
        calls = number if round_number else max(number // 10, 1)
        floor_ns = baseline.timeit(calls) / calls * 1e9
        subject_ns = subject.timeit(calls) / calls * 1e9
        if round_number:
            best_floor, best_subject = min(best_floor, floor_ns), min(best_subject, subject_ns)
    return best_subject, best_floor


def figures(call_ns: float, floor_ns: float) -> Dict[str, float]:
    """One call's figures: its ns, the floor's, and the ratio."""
    return {
        "ns": round(call_ns, 1),
        "floor_ns": round(floor_ns, 1),
        "ratio": round(call_ns / floor_ns, 3),
    }


def _best_ns(
    stmt: str, setup: Callable[[], None], number: int, rounds: int, floor_stmt: str = FLOOR_STMT,
) -> Tuple[float, float]:
    """Best-of-``rounds`` ns per call of ``stmt`` and of the floor, from a fresh default client."""

    namespace = _namespace()

    def before_round() -> None:
        telemetry.reset()
        _floor_counts.clear()
        namespace["fresh"] = itertools.count()
        setup()

    subject = timeit.Timer(stmt, globals=namespace)
    baseline = timeit.Timer(floor_stmt, globals=namespace)
    return best_beside_floor(subject, baseline, before_round, number, rounds)


def collection_calls(number: int = 200_000, rounds: int = 5) -> Dict[str, Dict[str, float]]:
    """ns/call of each collection call (default client) beside the floor, and the ratio.

    A call in ``NEW_VALUE_FLOORS`` is also measured beside that floor (``new_value_ns``,
    ``new_value_floor_ns``, ``new_value_ratio``). Call ``init_default_client()`` first;
    telemetry's mode decides which path is measured.
    """
    results: Dict[str, Dict[str, float]] = {}
    for name, (stmt, setup) in CALLS.items():
        results[name] = figures(*_best_ns(stmt, setup, number, rounds))
        if name in NEW_VALUE_FLOORS:
            like_for_like = figures(*_best_ns(stmt, setup, number, rounds, NEW_VALUE_FLOORS[name]))
            results[name].update({f"new_value_{field}": value
                                  for field, value in like_for_like.items()})
    telemetry.reset()
    return results


@contextmanager
def consent_off() -> Iterator[None]:
    """Turn the default client off as a user would (``set_consent(False)``), then on again."""
    telemetry.set_consent(False)
    try:
        if telemetry.status().mode != "off":
            raise RuntimeError("set_consent(False) did not turn telemetry off")
        yield
    finally:
        telemetry.set_consent(True)


def contended(
    threads: int = 4, calls_per_thread: int = 50_000, rounds: int = 3
) -> Dict[str, float]:
    """``threads`` threads incrementing one key at once: calls/s beside the contended floor."""

    def run(call: Callable[[str], None]) -> float:
        start = threading.Barrier(threads + 1)

        def worker() -> None:
            start.wait()
            for _ in range(calls_per_thread):
                call("contended")

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in workers:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in workers:
            thread.join()
        return threads * calls_per_thread / (time.perf_counter() - began)

    best_call = best_floor = 0.0
    for _ in range(rounds):
        best_floor = max(best_floor, run(floor))
        best_call = max(best_call, run(telemetry.increment))
    telemetry.reset()
    return {
        "threads": threads,
        "calls_per_s": round(best_call),
        "floor_calls_per_s": round(best_floor),
        "ratio": round(best_floor / best_call, 3),  # > 1: telemetry is slower than the floor
    }


# -- import time ---------------------------------------------------------------------

IMPORT_SUBJECT = "import telemetry"
IMPORT_BASELINE = "import json, threading"


def import_time(runs: int = 15) -> Dict[str, float]:
    """Median wall time of ``python -c 'import telemetry'`` and of the baseline, in ms.

    Both run with bytecode cached in a private ``PYTHONPYCACHEPREFIX`` (one warm-up
    each), as on an installed machine: ``PYTHONDONTWRITEBYTECODE`` would otherwise
    make an editable checkout compile telemetry's modules on every start while the
    baseline's standard library stays compiled. Runs alternate, so load hits both.
    """
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = cache

        def wall_ms(code: str) -> float:
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            return (time.perf_counter() - began) * 1000

        wall_ms(IMPORT_SUBJECT)
        wall_ms(IMPORT_BASELINE)
        subject: List[float] = []
        baseline: List[float] = []
        for _ in range(runs):
            subject.append(wall_ms(IMPORT_SUBJECT))
            baseline.append(wall_ms(IMPORT_BASELINE))
    subject_ms, baseline_ms = statistics.median(subject), statistics.median(baseline)
    return {
        "runs": runs,
        "import_ms": round(subject_ms, 1),
        "baseline_ms": round(baseline_ms, 1),
        "added_ms": round(subject_ms - baseline_ms, 1),
    }


# -- a spool far over its bounds -------------------------------------------------------


def _fill_spool(directory: str, instance_id: str, files: int) -> None:
    """``files`` one-item payloads in the spool's file format, oldest first."""
    from datetime import datetime, timedelta, timezone  # noqa: PLC0415

    from telemetry._wire import Payload, encode_payload  # noqa: PLC0415

    os.makedirs(directory, mode=0o700, exist_ok=True)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    for index in range(files):
        when = start + timedelta(seconds=index)
        payload = Payload(instance_id=instance_id, timestamp=when, data={f"k{index}": 1})
        path = os.path.join(directory, f"{payload.payload_id}.json")
        with open(path, "wb") as stream:
            stream.write(encode_payload(payload))
        os.chmod(path, 0o600)
        age = int(when.timestamp()) * 1_000_000_000
        os.utime(path, ns=(age, age))


def spool_start(
    files: int = 20_000, rounds: int = 3, wait_for_trim: bool = True
) -> Dict[str, float]:
    """``start_emitting()`` on the caller's thread with ``files`` spooled, vs an empty spool.

    With ``wait_for_trim``, also how long the emitter then took to trim the spool
    to its bounds (off the caller's thread) and how many files were left.
    """
    best = {"empty": float("inf"), "full": float("inf")}
    trim_s = float("nan")
    left = -1
    for _ in range(rounds):
        for case in ("empty", "full"):
            with tempfile.TemporaryDirectory() as state_dir:
                instance = uuid.uuid4()
                if case == "full":
                    spool = os.path.join(state_dir, "bench", "state", "telemetry-spool")
                    _fill_spool(spool, str(instance), files)
                client = telemetry.Client()
                # Nowhere to send to, and never due: only the spool's cost is measured.
                client.init(instance, app="bench", consent=True, state_dir=state_dir,
                            endpoint="http://127.0.0.1:9", min_interval=3600.0,
                            send_timeout=0.01)
                started = time.perf_counter()
                client.start_emitting()
                best[case] = min(best[case], time.perf_counter() - started)
                if case == "full" and wait_for_trim:
                    deadline = time.monotonic() + 120
                    while client.status().spool_files > 20 and time.monotonic() < deadline:
                        time.sleep(0.01)  # a benchmark, not a test: polls the emitter's work
                    trim_s = time.perf_counter() - started
                    left = client.status().spool_files
                # Long enough for the emitter to finish trimming (the refused
                # connection fails at once): its thread must be done with the
                # spool before the directory is removed.
                client.stop_emitting(timeout=60)
    return {
        "files": files,
        "start_ms": best["full"] * 1000,
        "baseline_ms": best["empty"] * 1000,
        "trimmed_in_s": trim_s,
        "files_left": left,
    }


def withdraw_spool(files: int = 20_000, rounds: int = 1) -> Dict[str, float]:
    """``set_consent(False)`` on the caller's thread with ``files`` spooled, vs an empty spool.

    Also how long the background thread then took to delete the files (the
    caller does not wait for it). Filling the spool takes seconds, so each
    round has one full case and five empty ones (the best of each is kept).
    """
    best = {"empty": float("inf"), "full": float("inf")}
    deleted_s = float("inf")
    for _ in range(rounds):
        for case in ("empty",) * 5 + ("full",):
            with tempfile.TemporaryDirectory() as state_dir:
                instance = uuid.uuid4()
                spool = os.path.join(state_dir, "bench", "state", "telemetry-spool")
                if case == "full":
                    _fill_spool(spool, str(instance), files)
                client = telemetry.Client()
                client.init(instance, app="bench", consent=True, state_dir=state_dir,
                            endpoint="http://127.0.0.1:9")
                started = time.perf_counter()
                client.set_consent(False)
                best[case] = min(best[case], time.perf_counter() - started)
                for thread in threading.enumerate():
                    if thread.name == "telemetry-spool-delete":
                        thread.join(120)
                if case == "full":
                    deleted_s = min(deleted_s, time.perf_counter() - started)
                    if os.listdir(os.path.dirname(spool)):
                        raise RuntimeError("the withdrawn spool was not deleted")
    return {
        "files": files,
        "off_ms": best["full"] * 1000,
        "baseline_ms": best["empty"] * 1000,
        "deleted_in_s": deleted_s,
    }


# -- buffers of many items -----------------------------------------------------------


def isolated_client(
    state_dir: str, endpoint: str = "http://127.0.0.1:9", **options: Any
) -> telemetry.Client:
    """A new, initialised client of its own (``on``), not the default one."""
    client = telemetry.Client()
    client.init(
        uuid.uuid4(), app="bench", consent=True, endpoint=endpoint, state_dir=state_dir, **options
    )
    if client.mode != "on":
        raise RuntimeError(f"telemetry is not on: {client.decision.rule}")
    return client


def fill_counters(client: telemetry.Client, items: int) -> None:
    """``items`` distinct counter keys."""
    for index in range(items):
        client.increment(f"counter:{index}")


def _members_per_key(total_items: int, per_key: int) -> List[int]:
    """Member counts of container keys holding ``total_items`` items (1 per key + members)."""
    sizes = []
    while total_items >= 2:
        members = min(per_key, total_items - 1)
        sizes.append(members)
        total_items -= members + 1
    return sizes


def fill_mixed(client: telemetry.Client, items: int, per_key: int = 9_999) -> None:
    """``items`` items of every kind: 40 % counters, 10 % values, 10 % mappings,
    20 % lists and 20 % counting sets (``per_key`` values at most per container key).
    """
    tenth = items // 10
    used = 0
    for index in range(tenth):
        client.set(f"value:{index}", f"v{index}")
    used += tenth
    for index in range(tenth // 10):
        for sub in range(9):
            client.set_nested(f"mapping:{index}", f"sub{sub}", index + sub)
    used += tenth // 10 * 10
    for index, members in enumerate(_members_per_key(2 * tenth, per_key)):
        for member in range(members):
            client.append(f"list:{index}", f"event-{member}")
        used += members + 1
    for index, members in enumerate(_members_per_key(2 * tenth, per_key)):
        for member in range(members):
            client.append_unique(f"set:{index}", f"{member:08x}")
        used += members + 1
    for index in range(items - used):  # the rest (about 40 %): counters
        client.increment(f"counter:{index}")


def fill_counting_sets(client: telemetry.Client, items: int, per_key: int = 9_990) -> None:
    """Counting sets of ``per_key`` distinct values each (e.g. hashed user agents):
    10 keys x 9,990 values for 100,000 items."""
    sizes = _members_per_key(items, per_key)
    for index, members in enumerate(sizes):
        for member in range(members):
            client.append_unique(f"agents:{index}", f"{member * 2654435761 % 2**32:08x}")
    _fill_rest(client, items, sizes)


def fill_lists(client: telemetry.Client, items: int, per_key: int = 9_999) -> None:
    """Lists of ``per_key`` elements each."""
    sizes = _members_per_key(items, per_key)
    for index, members in enumerate(sizes):
        for member in range(members):
            client.append(f"events:{index}", f"event-{member}")
    _fill_rest(client, items, sizes)


def fill_mappings(client: telemetry.Client, items: int, per_key: int = 9) -> None:
    """Nested mappings (``set_nested``) of ``per_key`` subkeys each."""
    sizes = _members_per_key(items, per_key)
    for index, members in enumerate(sizes):
        for member in range(members):
            client.set_nested(f"mapping:{index}", f"sub{member}", member)
    _fill_rest(client, items, sizes)


def _fill_rest(client: telemetry.Client, items: int, sizes: List[int]) -> None:
    """The item that container keys could not hold (a key needs two): a counter."""
    if items - sum(members + 1 for members in sizes):
        client.increment("rest")


FILLS: Dict[str, Callable[[telemetry.Client, int], None]] = {
    "counters": fill_counters,
    "mixed": fill_mixed,
}
"""The buffers measured for memory and snapshot+encode time."""


def fill_events(client: telemetry.Client, items: int) -> None:
    """``items`` events of 50 names, each with a few attributes (``max_events`` permitting)."""
    record = client.record
    for index in range(items):
        record("behavioral", f"click-{index % 50}", page=f"/page/{index % 100}", n=index)


STALL_FILLS: Dict[str, Callable[[telemetry.Client, int], None]] = {
    "counters": fill_counters,
    "counting sets": fill_counting_sets,
    "lists": fill_lists,
    "mappings": fill_mappings,
    "mixed": fill_mixed,
    "events": fill_events,
}
"""Every shape of buffer the stall test emits: one kind each, all kinds mixed, and events."""


def buffer_memory(items: int = 100_000) -> Dict[str, Dict[str, float]]:
    """Bytes (tracemalloc) held by a buffer of ``items`` items, per kind of buffer."""
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as state_dir:
        for name, fill in FILLS.items():
            client = isolated_client(state_dir)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                fill(client, items)
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            payload = client.take_payload()
            assert payload is not None
            results[name] = {
                "items": payload.items,
                "bytes": held,
                "mb": round(held / 1e6, 2),
                "bytes_per_item": round(held / max(payload.items, 1), 1),
            }
    return results


def snapshot_encode(items: int = 100_000, rounds: int = 5) -> Dict[str, Dict[str, float]]:
    """ms to take a payload of ``items`` items and encode it (best of ``rounds``)."""
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as state_dir:
        client = isolated_client(state_dir)
        for name, fill in FILLS.items():
            best = float("inf")
            for _ in range(rounds):
                fill(client, items)
                began = time.perf_counter()
                payload = client.take_payload()
                assert payload is not None
                request, raw_size = encode_request(payload)
                best = min(best, time.perf_counter() - began)
                results[name] = {
                    "items": payload.items,
                    "ms": round(best * 1000, 2),
                    "raw_bytes": raw_size,
                    "body_bytes": len(request.body),
                }
    return results


# -- the stall test ------------------------------------------------------------------

# The server stands in for a remote machine: it runs at a lower priority so that
# parsing the big body competes less with the measured threads for this machine's CPUs.
_SERVER_SCRIPT = """
import os, sys
from server_stub import serve
os.nice(10)
with serve(port=0) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


@contextmanager
def server_process() -> Iterator[str]:
    """``server_stub.serve(port=0)`` in a child process; yields its URL.

    Not in this process: parsing a 100,000-item body takes the server's own
    GIL for tens of ms, which is the server's cost, not the emitting client's.
    """
    with subprocess.Popen(
        [sys.executable, "-c", _SERVER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        try:
            url = process.stdout.readline().strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"server_stub did not start: {url!r}")
            yield url
        finally:
            process.stdin.close()  # the server's cue to stop
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


# Calls slower than this are kept with their start time, to tell where they happened.
_SLOW_CALL_NS = 200_000


class SlowCall(NamedTuple):
    """A call slower than ``_SLOW_CALL_NS``: when it began, how long it took, and how
    much CPU time the emitter thread used meanwhile (all ns).

    The emitter can only stall a call while it holds the GIL, which takes CPU: a
    stall during which the emitter barely ran was the operating system's doing
    (another process had the CPU), not telemetry's.
    """

    began: int
    took: int
    emitter_cpu: int


class CallTimes(NamedTuple):
    """Every call's latency (ns), and the slow ones in detail.

    The latencies are an ``array``, which the garbage collector does not track:
    a list of millions of ints would make every collection (triggered by any
    thread, the emitter's included) slower, and blame telemetry for it.
    """

    latencies: array.array[int]
    slow: List[SlowCall]


def _time_calls(
    call: Callable[[str], None], keep_going: Callable[[], bool], emitter_cpu: Callable[[], int]
) -> CallTimes:
    """Time each ``call`` made while ``keep_going()`` with ``perf_counter_ns``."""
    clock = time.perf_counter_ns
    latencies = array.array("q")
    slow: List[SlowCall] = []
    record = latencies.append
    while keep_going():
        cpu = emitter_cpu()
        began = clock()
        call("requests")
        took = clock() - began
        record(took)
        if took > _SLOW_CALL_NS:
            slow.append(SlowCall(began, took, emitter_cpu() - cpu))
    return CallTimes(latencies, slow)


def _thread_cpu_clock(thread: Optional[threading.Thread]) -> Callable[[], int]:
    """CPU time (ns) used so far by ``thread``; always 0 where that cannot be read."""
    if thread is not None and thread.ident is not None and hasattr(time, "pthread_getcpuclockid"):
        clock_id = time.pthread_getcpuclockid(thread.ident)
        return lambda: time.clock_gettime_ns(clock_id)
    return lambda: 0


def _summary(times: CallTimes) -> Dict[str, float]:
    ordered = sorted(times.latencies)
    last = len(ordered) - 1

    def at(fraction: float) -> float:
        return round(ordered[min(last, round(fraction * last))] / 1000, 3)

    return {
        "calls": len(ordered),
        "p50_us": at(0.50),
        "p99_us": at(0.99),
        "max_us": at(1.0),
        "over_1ms": len(ordered) - bisect.bisect_right(ordered, 1_000_000),
        "over_5ms": len(ordered) - bisect.bisect_right(ordered, 5_000_000),
        "max_emitter_cpu_us": round(max((c.emitter_cpu for c in times.slow), default=0) / 1000, 3),
    }


def _slow_calls_between(times: CallTimes, start_ns: int, end_ns: int) -> Dict[str, float]:
    """The slow calls running at some moment of ``[start_ns, end_ns)``: the longest, how
    many took over 1 ms and over 5 ms, and the most emitter CPU time inside one of them.
    """
    calls = [c for c in times.slow if c.began < end_ns and c.began + c.took > start_ns]
    return {
        "seconds": round((end_ns - start_ns) / 1e9, 3),
        "max_us": round(max((c.took for c in calls), default=0) / 1000, 3),
        "over_1ms": sum(c.took > 1_000_000 for c in calls),
        "over_5ms": sum(c.took > 5_000_000 for c in calls),
        "max_emitter_cpu_us": round(max((c.emitter_cpu for c in calls), default=0) / 1000, 3),
    }


class Collection(NamedTuple):
    """One run of the cyclic garbage collector: its generation, how long it took (ns),
    and whether it ran in the emitter's thread."""

    generation: int
    took: int
    in_emitter: bool


@contextmanager
def _collections_watched() -> Iterator[List[Collection]]:
    """Every garbage collection while in the block (watched with ``gc.callbacks``, which
    leaves the collector's settings alone)."""
    collections: List[Collection] = []
    started: Dict[int, int] = {}

    def watch(phase: str, info: Dict[str, int]) -> None:
        if phase == "start":
            started[threading.get_ident()] = time.perf_counter_ns()
        else:
            took = time.perf_counter_ns() - started.pop(threading.get_ident(), 0)
            name = threading.current_thread().name
            collections.append(Collection(info["generation"], took, name == "telemetry-emitter"))

    gc.callbacks.append(watch)
    try:
        yield collections
    finally:
        gc.callbacks.remove(watch)


def _collections_summary(collections: List[Collection]) -> Dict[str, float]:
    """How many collections ran (all of them, and in the emitter's thread), how many of
    them walked the whole heap (generation 2), and the longest one (µs)."""
    return {
        "collections": len(collections),
        "in_emitter": sum(c.in_emitter for c in collections),
        "full": sum(c.generation == 2 for c in collections),
        "max_us": round(max((c.took for c in collections), default=0) / 1000, 3),
    }


class _TimedSink:
    """The HTTP sink, noting when each send began and ended (``perf_counter_ns``)."""

    def __init__(self, url: str) -> None:
        from telemetry._sinks import HTTPSink  # noqa: PLC0415 - the client's own default sink

        self._sink = HTTPSink(url)
        self.sends: List[Tuple[int, int, int]] = []

    def __call__(self, request: Request, timeout: float) -> SendResult:
        began = time.perf_counter_ns()
        try:
            return self._sink(request, timeout)
        finally:
            self.sends.append((began, time.perf_counter_ns(), len(request.body)))


def stall_every_shape(
    items: int = 100_000, baseline_s: float = 1.0, shapes: Optional[List[str]] = None
) -> Dict[str, Dict[str, Any]]:
    """``stall`` for each buffer shape of ``STALL_FILLS`` (or ``shapes``), one server for all."""
    with server_process() as url:
        return {
            shape: stall(items, baseline_s, shape, url=url)
            for shape in (shapes if shapes is not None else list(STALL_FILLS))
        }


def stall(
    items: int = 100_000, baseline_s: float = 1.0, fill: str = "mixed", url: Optional[str] = None
) -> Dict[str, Any]:
    """Latency of ``increment`` on a client while its emitter sends ``items`` items.

    One thread times every ``increment`` call; the client's emitter thread takes,
    encodes and POSTs the full buffer (``flush()``) to ``server_stub`` meanwhile.
    The uncontended baseline is the same loop, on the same client, right after,
    for as long as the emission took (``baseline_s`` at least).
    The emission is also split in two: the client's work (snapshot, encoding,
    compression) until the request is handed to the sink, and the send itself
    (mostly waiting for the server), where this process does next to nothing.
    ``url`` is a running ``server_stub`` in another process (one is started if None).
    """
    if url is None:
        with server_process() as started:
            return stall(items, baseline_s, fill, url=started)
    with tempfile.TemporaryDirectory() as state_dir:
        sink = _TimedSink(url)
        room = {"max_events": items} if fill == "events" else {}
        client = isolated_client(
            state_dir, endpoint=url, min_interval=3600.0, sink=sink, **room
        )
        client.increment("requests")
        threads_before = set(threading.enumerate())
        client.start_emitting()
        emitter = next(
            (thread for thread in threading.enumerate()
             if thread not in threads_before and thread.name == "telemetry-emitter"),
            None,
        )
        try:
            # The first cycle (a check-in, and loading requests) is over once this returns.
            client.increment("warm-up")
            if not client.flush(timeout=30):
                raise RuntimeError("the warm-up payload was not delivered")

            emitter_cpu = _thread_cpu_clock(emitter)
            STALL_FILLS[fill](client, items - 1)  # and "requests": ``items`` in all
            sends_before = len(sink.sends)
            emitting = threading.Event()
            emitting.set()
            during: List[CallTimes] = []
            timer = threading.Thread(
                target=lambda: during.append(
                    _time_calls(client.increment, emitting.is_set, emitter_cpu)
                )
            )
            timer.start()
            with _collections_watched() as collections:
                began = time.perf_counter_ns()
                delivered = client.flush(timeout=120)
                ended = time.perf_counter_ns()
            emitting.clear()
            timer.join()

            # As long as the emission took: the longer the window, the likelier the
            # operating system lets another process run in it, whoever is emitting.
            deadline = time.perf_counter() + max(baseline_s, (ended - began) / 1e9)
            uncontended = _time_calls(
                client.increment, lambda: time.perf_counter() < deadline, emitter_cpu
            )
        finally:
            client.stop_emitting(timeout=5)
    sends = [send for send in sink.sends[sends_before:] if send[0] < ended]  # not stop's
    if not sends:
        raise RuntimeError("the full buffer was not sent")
    send_began, send_ended = sends[0][0], sends[-1][1]
    bodies = [size for _, _, size in sends]
    return {
        "items": items,
        "fill": fill,
        "delivered": delivered,
        "request_body_bytes": bodies,
        "emission_s": round((ended - began) / 1e9, 3),
        "uncontended": _summary(uncontended),
        "during_emission": _summary(during[0]),
        "gc_during_emission": _collections_summary(collections),
        "client_work": _slow_calls_between(during[0], began, send_began),
        "sending": _slow_calls_between(during[0], send_began, send_ended),
    }
