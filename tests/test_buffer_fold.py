"""``Buffer``'s lock-free queue: calls queue an entry, ``fold`` applies a batch of them.

The rule every test here checks: a batch folded at once has exactly the outcome
of the same calls applied one at a time, in call order (data, items, drops and
warnings), whether the fold takes a C-speed path (a batch of counter calls, or
of appends to one list, of ``set_nested`` or ``append_unique`` calls on one
key) or replays the batch entry by entry (the reference here).
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any, Callable, Dict, List, Tuple

import pytest
from conftest import Taken, taken

from telemetry._buffer import FOLD_AT, Buffer

TOP, BOTTOM = 2**63 - 1, -(2**63)

Call = Tuple[str, Tuple[Any, ...]]


class StrKey(str):
    """A ``str`` subclass key: always the slow path."""


class BadHash(str):
    """A str key whose hash raises: the batch it is in cannot be counted."""

    def __hash__(self) -> int:
        raise ValueError("no hash for you")


def _in_order_only(buffer: Buffer) -> None:
    """Make ``buffer`` fold every batch entry by entry (the reference for the fast folds)."""
    buffer._fold_counters = lambda ops: False  # type: ignore[method-assign]
    buffer._fold_appends = lambda ops: False  # type: ignore[method-assign]
    buffer._fold_one_key = lambda ops: False  # type: ignore[method-assign]


def apply(buffer: Buffer, calls: List[Call], fold_each: bool) -> None:
    if fold_each:
        _in_order_only(buffer)
    for name, args in calls:
        getattr(buffer, name)(*args)
        if fold_each:
            buffer.fold()


def outcome(
    calls: List[Call], fold_each: bool, caplog: pytest.LogCaptureFixture,
    max_items: int = 100_000, max_values_per_key: int = 10_000,
) -> Tuple[Taken, List[str]]:
    """What ``calls`` leave in a fresh buffer, and the warnings they log (sorted)."""
    caplog.clear()
    buffer = Buffer(max_items=max_items, max_values_per_key=max_values_per_key)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        apply(buffer, calls, fold_each)
        result = taken(buffer)
    return result, sorted(record.getMessage() for record in caplog.records)


def random_calls(rng: random.Random, count: int) -> List[Call]:
    keys = ["a", "b", "c", "d:x", ""]
    amounts = [1, -1, 7, TOP - 2, BOTTOM + 2, TOP, 2**63]  # the last does not fit
    values: List[Any] = ["v", 1, 2.5, None, [1, 2], {"n": 1}, float("nan")]
    calls: List[Call] = []
    for _ in range(count):
        key = rng.choice(keys)
        name = rng.choice(
            ["increment", "increment", "add", "add", "set", "set_nested", "append", "append_unique"]
        )
        if name == "increment":
            calls.append((name, (key,)))
        elif name == "add":
            calls.append((name, (key, rng.choice(amounts))))
        elif name == "set_nested":
            subkey = rng.choice(["s", "t", "u", "", "n" * 300, "a\x00b", 5])  # some invalid
            calls.append((name, (key, subkey, rng.choice(values))))
        elif name == "append_unique":
            member = rng.choice(["x", "y", 3, 3.0, True, "\x00", "\ud800", "é", 2**70, "m" * 2000])
            calls.append((name, (key, member)))
        else:
            calls.append((name, (key, rng.choice(values))))
    return calls


@pytest.mark.parametrize("seed", range(40))
def test_a_batch_has_the_outcome_of_its_calls_one_by_one(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(seed)
    calls = random_calls(rng, 80)
    max_items, per_key = rng.choice([6, 12, 1000]), rng.choice([1, 3, 50])
    batched = outcome(calls, False, caplog, max_items, per_key)
    one_by_one = outcome(calls, True, caplog, max_items, per_key)
    assert batched == one_by_one


@pytest.mark.parametrize("seed", range(40))
def test_a_counter_only_batch_counted_at_once_matches_one_by_one(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Counter calls only: the C-speed fold, its sums and its replay near the bounds."""
    rng = random.Random(seed)
    start = [("add", ("hot", rng.choice([0, TOP - 5, BOTTOM + 5])))]
    calls: List[Call] = []
    for _ in range(300):
        key = rng.choice(["hot", "hot", "cold", "new", "k" * 300])
        if rng.random() < 0.5:
            calls.append(("increment", (key,)))
        else:
            calls.append(("add", (key, rng.choice([1, -1, 3, -3, TOP, BOTTOM, 2**64]))))
    max_items = rng.choice([1, 2, 100])
    batched = outcome(start + calls, False, caplog, max_items)
    one_by_one = outcome(start + calls, True, caplog, max_items)
    assert batched == one_by_one


def test_the_queue_is_folded_at_the_bound() -> None:
    buffer = Buffer()
    for _ in range(FOLD_AT - 1):
        buffer.increment("hits")
    assert len(buffer._queue) == FOLD_AT - 1  # memory stays bounded by the fold
    buffer.set("version", "1.0")  # the call that reaches the bound folds the batch
    assert len(buffer._queue) == 0
    assert buffer._store.counters == {"hits": FOLD_AT - 1}
    assert buffer._store.values == {"version": "1.0"}


@pytest.mark.parametrize("call", [
    lambda buffer, value: buffer.set("config", value),
    lambda buffer, value: buffer.set_nested("configs", "main", value),
    lambda buffer, value: buffer.append("configs", value),
])
def test_a_copied_container_is_applied_at_once_not_queued(
    call: Callable[[Buffer, object], None],
) -> None:
    # Up to 16 KiB each: FOLD_AT of them queued would hold tens of megabytes.
    buffer = Buffer()
    buffer.increment("hits")
    value = {"servers": ["a" * 1000] * 15}
    call(buffer, value)
    assert buffer._queue == []  # nothing waits, the earlier increment included
    assert buffer._store.counters == {"hits": 1}
    value["servers"].append("changed later")  # the stored value is a copy
    data = taken(buffer).data
    stored = data.get("config") or data.get("configs")
    assert "changed later" not in str(stored) and "a" * 1000 in str(stored)


def test_a_queued_counter_decides_the_kind_before_a_later_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = Buffer()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        buffer.increment("k")  # queued, not folded
        buffer.set("k", "v")  # came second: refused
        buffer.append("j", 1)
        buffer.add("j", 1)  # refused: "j" is a list by then
        buffer.set("k", [1])  # a value that goes the slow path at once: refused too
    assert taken(buffer) == Taken(data={"k": 1, "j": [1]}, items=3, dropped=3)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("holds a counter, not a value" in message for message in messages) == 1
    assert sum("holds a list, not a counter" in message for message in messages) == 1


def test_saturation_across_a_fold_drops_exactly_the_calls_past_the_bound() -> None:
    buffer = Buffer()
    buffer.add("up", TOP - 1)
    buffer.add("down", BOTTOM + 1)
    buffer.fold()
    # "up": +5 would pass the bound: the counter stays at it and the call is dropped;
    # so are both +1; -5 counts. The batch's sum (+2) would fit: only replaying
    # call by call gets the value and the drops right.
    for amount in (5, 1, 1, -5):
        buffer.add("up", amount)
    # "down": a net-zero batch that still crosses the bound on its first call.
    buffer.add("down", -2)
    buffer.add("down", 2)
    buffer.increment("elsewhere")
    assert taken(buffer) == Taken(
        data={"up": TOP - 5, "down": BOTTOM + 2, "elsewhere": 1}, items=3, dropped=4
    )


def test_a_queued_counter_takes_the_last_item_before_a_later_append() -> None:
    buffer = Buffer(max_items=3)
    buffer.append("l", 1)  # 2 items
    buffer.fold()
    buffer.increment("new")  # queued first: the third item is its
    buffer.append("l", 2)  # then the list is full
    buffer.append_unique("l2", "x")
    assert taken(buffer) == Taken(data={"l": [1], "new": 1}, items=3, dropped=2)


def test_keys_that_cannot_be_counted_replay_the_batch_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = Buffer()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        buffer.increment("a")
        buffer.add(["unhashable"], 1)
        buffer.add(BadHash("b"), 2)
        buffer.add("a", 2)
        buffer.add("a", 2**63)  # does not fit: refused
    snapshot = taken(buffer)
    assert snapshot.data == {"a": 3, "b": 2}  # a str subclass key is its plain str
    assert snapshot.dropped == 2
    assert any("does not fit" in record.getMessage() for record in caplog.records)


def test_exact_totals_with_8_threads_of_100_000_calls_and_concurrent_takes() -> None:
    buffer = Buffer(max_items=1_000_000, max_values_per_key=1_000_000)
    threads, calls = 8, 100_000
    start = threading.Barrier(threads + 1)
    done = threading.Event()
    snapshots: List[Taken] = []
    failures: List[BaseException] = []

    def work(number: int) -> None:
        try:
            start.wait()
            for index in range(calls):
                if index % 4 == 3:
                    buffer.add("bytes", index)
                elif index % 4 == 2:
                    buffer.append_unique("agents", index % 3)
                else:
                    buffer.increment("hits" if index % 2 else f"thread{number}")
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def take_repeatedly() -> None:
        start.wait()
        while not done.is_set():
            snapshots.append(taken(buffer))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    taker = threading.Thread(target=take_repeatedly)
    for thread in [*workers, taker]:
        thread.start()
    for worker in workers:
        worker.join()
    done.set()
    taker.join()
    snapshots.append(taken(buffer))
    assert failures == []

    totals: dict[str, int] = {}
    agents = 0
    for snapshot in snapshots:
        assert snapshot.dropped == 0
        for key, value in snapshot.data.items():
            if key == "agents":
                assert isinstance(value, list)
                for entry in value:
                    assert isinstance(entry, dict)
                    count = entry["count"]
                    assert isinstance(count, int)
                    agents += count
            else:
                assert isinstance(value, int)
                totals[key] = totals.get(key, 0) + value
    per_thread_hits = len([i for i in range(calls) if i % 4 in (1,)])
    assert totals.pop("hits") == threads * per_thread_hits
    assert totals.pop("bytes") == threads * sum(i for i in range(calls) if i % 4 == 3)
    assert totals == {f"thread{n}": calls // 4 for n in range(threads)}
    assert agents == threads * calls // 4
    assert len(snapshots) > 1


def test_after_fork_in_child_drops_the_parents_queue_and_fold_lock() -> None:
    buffer = Buffer()
    buffer.increment("parent")  # queued, not folded: the parent's
    old_fold_lock = buffer._fold_lock
    old_fold_lock.acquire()  # as if a parent thread was folding at fork time
    try:
        buffer.after_fork_in_child()
        assert buffer._fold_lock is not old_fold_lock
        for _ in range(FOLD_AT):  # reaches the bound: would deadlock on the old lock
            buffer.increment("child")
        snapshot = taken(buffer)
    finally:
        old_fold_lock.release()
    assert snapshot == Taken(data={"child": FOLD_AT}, items=1, dropped=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.increment("k"),
        lambda b: b.increment(5),
        lambda b: b.add("k", 1),
        lambda b: b.add("k", "x"),
        lambda b: b.set("k", "v"),
        lambda b: b.set(None, float("nan")),
        lambda b: b.set_nested("k", "s", 1),
        lambda b: b.append("k", [1]),
        lambda b: b.append_unique("k", "x"),
    ],
)
def test_calls_while_not_collecting_store_and_count_nothing(call: Callable[[Buffer], None]) -> None:
    buffer = Buffer()
    buffer.set_collecting(False)
    call(buffer)
    assert not buffer.has_data()
    assert taken(buffer) == Taken(data={}, items=0, dropped=0)
    buffer.set_collecting(True)
    call(buffer)
    assert buffer.has_data()


class _SignallingLock:
    """A lock that sets ``asked`` whenever a thread asks for it."""

    def __init__(self, asked: threading.Event) -> None:
        self._lock = threading.Lock()
        self._asked = asked

    def __enter__(self) -> bool:
        self._asked.set()
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


def test_a_fold_under_way_still_has_data_and_is_waited_for() -> None:
    buffer = Buffer()
    assert not buffer.has_data()
    with buffer._fold_lock:  # as if another thread's fold had taken the queue, not yet stored it
        assert buffer.has_data()  # so flush() does not answer "nothing to send"

    progress = threading.Event()  # the slow path asked for the fold lock, or finished
    lock = _SignallingLock(progress)
    buffer._fold_lock = lock  # type: ignore[assignment]
    buffer.increment("k")
    lock.acquire()  # a fold under way in "another thread": it took the queued increment
    ops = buffer._queue[:]
    del buffer._queue[:]

    def slow_path() -> None:
        buffer.set(StrKey("k"), "v")  # a str subclass key: decided at once, after the increment
        progress.set()

    caller = threading.Thread(target=slow_path)
    caller.start()
    progress.wait()
    buffer._fold_in_order(ops)  # the fold under way ends
    lock.release()
    caller.join()
    assert taken(buffer) == Taken(data={"k": 1}, items=1, dropped=1)



ONE_KIND: Dict[str, Callable[[random.Random, str], Call]] = {
    "set": lambda rng, key: ("set", (key, rng.choice(["v", 1, [1], None]))),
    "set_nested": lambda rng, key: (
        "set_nested", (key, rng.choice(["s", "t", "u", "w", "", "n" * 300]), rng.choice([1, "x"]))
    ),
    "append": lambda rng, key: ("append", (key, rng.choice(["e", 2, {"k": 1}]))),
    "append_unique": lambda rng, key: (
        "append_unique", (key, rng.choice(["x", "y", "z", 3, 3.0, True, "\x00", 2**70]))
    ),
}


@pytest.mark.parametrize("case", range(108))
@pytest.mark.parametrize("kind", sorted(ONE_KIND))
def test_a_batch_of_one_kind_matches_one_by_one(
    kind: str, case: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls of one kind on keys that exist (appends to one list take a C-speed path),
    with caps and room small enough to refuse some calls (every combination below)."""
    rng = random.Random(case)
    keys = [["a"], ["a", "b"], ["a", "b", "missing"]][case % 3]
    max_items = [5, 8, 1000][case // 3 % 3]
    per_key = [1, 3, 100, 1000][case // 9 % 4]
    count = [1, 5, 60][case // 36]
    make = ONE_KIND[kind]
    setup: List[Call] = [make(rng, key) for key in keys[:2]]
    calls = [make(rng, rng.choice(keys)) for _ in range(count)]

    def run(fold_each: bool) -> Tuple[Taken, List[str]]:
        caplog.clear()
        buffer = Buffer(max_items=max_items, max_values_per_key=per_key)
        with caplog.at_level(logging.WARNING, logger="telemetry"):
            apply(buffer, setup, fold_each=True)
            if not fold_each:  # the setup's reference folds are over: the real ones again
                del buffer._fold_counters, buffer._fold_appends, buffer._fold_one_key
            apply(buffer, calls, fold_each)
            result = taken(buffer)
        return result, sorted(record.getMessage() for record in caplog.records)

    assert run(False) == run(True)


def _member_counts(stored: object) -> Dict[object, object]:
    """A counting set in wire form (a list of {"value", "count"}) as value -> count."""
    assert isinstance(stored, list)
    counts: Dict[object, object] = {}
    for entry in stored:
        assert isinstance(entry, dict)
        counts[entry["value"]] = entry["count"]
    return counts


def _one_key_call(rng: random.Random, kind: str, pool: int) -> Call:
    """A ``set_nested`` or ``append_unique`` call on key "k": mostly repeats from a pool of
    ``pool`` subkeys or members, sometimes one that is invalid or of another type."""
    if kind == "set_nested":
        subkey = rng.choice([f"s{rng.randrange(pool)}"] * 12 + ["", "n" * 300, "a\x00b", "é"])
        return kind, ("k", subkey, rng.choice(["v", 1, 2.5, None, True]))
    member = rng.choice(
        [f"m{rng.randrange(pool)}"] * 6 + [rng.randrange(pool)] * 6
        + [1.5, True, None, "\x00", 2**70, "é"]
    )
    return kind, ("k", member)


OTHER_CALLS: List[Call] = [
    ("increment", ("k",)),
    ("set", ("k", "x")),
    ("set_nested", ("k", "s0", 1)),
    ("append_unique", ("k", "m0")),
    ("append_unique", ("other", "m0")),
    ("set_nested", ("other", "s0", 1)),
]


@pytest.mark.parametrize("seed", range(80))
def test_a_batch_on_one_key_matches_one_by_one(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    """``set_nested`` or ``append_unique`` calls on one key: folded at C speed when no cap
    can stop one of them, replayed when one might. Caps and room are sometimes reached
    inside the batch; some batches hold a call of another kind or key."""
    rng = random.Random(seed)
    kind = ["set_nested", "append_unique"][seed % 2]
    max_items = rng.choice([4, 30, 100, 10_000])
    per_key = rng.choice([2, 20, 60, 10_000])
    pool = rng.choice([3, 40, 1000])
    setup = [_one_key_call(rng, kind, pool) for _ in range(rng.choice([1, 5]))]
    calls = [_one_key_call(rng, kind, pool) for _ in range(rng.choice([10, 200]))]
    if seed % 4 >= 2:
        calls.insert(rng.randrange(len(calls)), rng.choice(OTHER_CALLS))

    def run(fold_each: bool) -> Tuple[Taken, List[str], List[object]]:
        caplog.clear()
        buffer = Buffer(max_items=max_items, max_values_per_key=per_key)
        with caplog.at_level(logging.WARNING, logger="telemetry"):
            apply(buffer, setup, fold_each=True)
            if not fold_each:
                del buffer._fold_counters, buffer._fold_appends, buffer._fold_one_key
            apply(buffer, calls, fold_each)
            buffer.fold()
            store = buffer._store
            order = [*store.nested.get("k", {}), *store.sets.get("k", {})]
            result = taken(buffer)
        return result, sorted(record.getMessage() for record in caplog.records), order

    assert run(False) == run(True)


@pytest.mark.parametrize("kind", ["set_nested", "append_unique"])
def test_a_batch_on_one_key_with_room_is_folded_at_c_speed(kind: str) -> None:
    """The shapes the C-speed fold is for (new values, repeats, a key near its cap
    with values it holds) take it, and their outcome is exact."""
    buffer = Buffer(max_items=1000, max_values_per_key=100)
    call = getattr(buffer, kind)
    extra = ("v",) if kind == "set_nested" else ()
    for index in range(95):
        call("k", f"x{index}", *extra)
    buffer.fold()  # 95 of 100 values: a batch of 200 calls could pass the cap
    calls = [f"x{index % 97}" for index in range(200)]  # 2 new values, then repeats
    for name in calls:
        call("k", name, *extra)
    ops = buffer._queue[:]
    del buffer._queue[:]
    assert buffer._fold_one_key(ops)
    snapshot = taken(buffer)
    assert snapshot.items == 1 + 97 and snapshot.dropped == 0
    if kind == "set_nested":
        assert snapshot.data == {"k": {f"x{index}": "v" for index in range(97)}}
    else:
        counts = _member_counts(snapshot.data["k"])
        expected: Dict[object, object] = {
            f"x{index}": calls.count(f"x{index}") + (index < 95) for index in range(97)
        }
        assert counts == expected


def _run_threads(work: Callable[[int], None], threads: int = 8) -> None:
    start = threading.Barrier(threads)
    failures: List[BaseException] = []

    def run(number: int) -> None:
        try:
            start.wait()
            work(number)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []


def test_exact_counts_and_mappings_with_8_threads_on_one_key() -> None:
    """New and repeated counting-set values and subkeys from 8 threads at once (the
    one-key folds), then the same against a per-key cap reached while they run."""
    buffer = Buffer(max_items=1_000_000, max_values_per_key=1_000_000)
    calls = 20_000

    def work(number: int) -> None:
        for index in range(calls):
            buffer.append_unique("agents", f"{number}:{index % 5000}" if index % 2 else index % 7)
            buffer.set_nested("last", f"t{number}:{index % 100}", index)

    _run_threads(work)
    snapshot = taken(buffer)
    counts = _member_counts(snapshot.data.pop("agents"))
    expected: Dict[object, int] = {}
    for number in range(8):
        for index in range(calls):
            member = f"{number}:{index % 5000}" if index % 2 else index % 7
            expected[member] = expected.get(member, 0) + 1
    assert counts == expected
    assert snapshot.data == {"last": {f"t{number}:{index}": calls - 100 + index
                                      for number in range(8) for index in range(100)}}
    assert snapshot.items == 2 + len(counts) + 800 and snapshot.dropped == 0

    capped = Buffer(max_items=1_000_000, max_values_per_key=1000)

    def capped_work(number: int) -> None:
        for index in range(calls):
            capped.append_unique("agents", (number * 7919 + index) % 3000)

    _run_threads(capped_work)
    snapshot = taken(capped)
    counts = _member_counts(snapshot.data["agents"])
    assert len(counts) == 1000
    admitted = sum(count for count in counts.values() if isinstance(count, int))
    assert admitted + snapshot.dropped == 8 * calls
    assert snapshot.items == 1 + 1000


def test_a_one_key_batch_that_reaches_a_cap_or_mixes_kinds_replays_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = Buffer(max_items=100, max_values_per_key=5)
    for member in ("a", "b", "c"):
        buffer.append_unique("k", member)
    buffer.set_nested("m", "s", 1)
    buffer.fold()
    for member in ("d", "a", "e", "f", "g", "a"):  # the cap is reached inside the batch
        buffer.append_unique("k", member)
    ops = buffer._queue[:]
    assert not buffer._fold_one_key(ops)  # nothing done: the batch replays
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        buffer.fold()
        buffer.set_nested("m", "t", 2)
        buffer.append_unique("m", "x")  # another kind on the mapping's key, mid-batch
        buffer.set_nested("m", "s", 3)
        assert not buffer._fold_one_key(buffer._queue[:])
        snapshot = taken(buffer)
    assert _member_counts(snapshot.data["k"]) == {"a": 3, "b": 1, "c": 1, "d": 1, "e": 1}
    assert snapshot.data["m"] == {"s": 3, "t": 2}
    assert snapshot.items == 1 + 5 + 1 + 2 and snapshot.dropped == 3
    messages = [record.getMessage() for record in caplog.records]
    assert sum("already holds 5 values" in message for message in messages) == 1
    assert sum("holds a mapping, not a counting set" in message for message in messages) == 1
