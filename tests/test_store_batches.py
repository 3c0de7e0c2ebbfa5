"""Group commit in both stores: many payloads per transaction, each stored once, each
request told whether its payload was new only once it is committed."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import pytest

from server_stub import PayloadRecord, PostgresStore, SQLiteStore, UnstorablePayload, open_store
from server_stub._rollups import ROLLUP_TABLES, fold_pending
from server_stub._sqlite import _SELECT_PENDING, _mark_folded
from server_stub._storage import EventQuery, EventRecord

AnyStore = Union[SQLiteStore, PostgresStore]


def _record(
    data: Optional[Dict[str, Any]] = None,
    *,
    payload_id: Optional[str] = None,
    instance_id: str = "4f2b1c3d-0000-4000-8000-000000000001",
) -> PayloadRecord:
    return PayloadRecord(
        payload_id=payload_id or uuid.uuid4().hex,
        instance_id=instance_id,
        timestamp="2026-11-23T10:00:00.123456Z",
        received_at="2026-11-23T10:00:01.000000Z",
        data=data if data is not None else {"n": 1},
        client={"name": "telemetry-python", "version": "0.1.0", "dropped": 2},
    )


@pytest.fixture
def store(backend_db: str, tmp_path: Path) -> Iterator[AnyStore]:
    """Each backend, on a file for SQLite (several connections, as in production)."""
    store = open_store(str(tmp_path / "t.db") if backend_db == ":memory:" else backend_db)
    try:
        yield store
    finally:
        store.close()


def test_a_batch_stores_each_payload_id_once_and_says_which_were_new(store: AnyStore) -> None:
    earlier = _record({"n": 1})
    assert store.add(earlier) is True
    fresh = [_record({"n": n}) for n in range(2, 6)]
    again = PayloadRecord(**{**earlier.__dict__, "received_at": "2026-11-23T11:00:00.000000Z"})
    twin = PayloadRecord(**{**fresh[1].__dict__, "data": {"n": 99}})
    batch = [fresh[0], again, fresh[1], twin, fresh[2], fresh[3]]
    assert store._add_batch(batch) == [True, False, True, False, True, True]
    assert store.fold_rollups() == 5  # each new payload joined the rollups' queue, once
    stored = {row["payload_id"]: row for row in store.all_payloads()}
    assert sorted(stored) == sorted(record.payload_id for record in [earlier, *fresh])
    assert stored[fresh[1].payload_id]["data"] == {"n": 3}  # the first of the twins
    assert stored[earlier.payload_id]["received_at"] == earlier.received_at
    stats = store.stats()
    assert (stats["payloads"], stats["dropped"], stats["keys"]) == (5, 10, {"n": 15})


def test_concurrent_adds_each_learn_once_their_payload_is_stored(store: AnyStore) -> None:
    """Many threads at once (so batches form), some posting the same payload twice."""
    threads, per_thread = 12, 15
    shared = [_record({"shared": 1}) for _ in range(per_thread)]
    start = threading.Barrier(threads)

    def worker(index: int) -> List[bool]:
        instance_id = str(uuid.UUID(int=index + 1))
        start.wait(10)
        results = []
        for n in range(per_thread):
            mine = _record({"hits": 1}, instance_id=instance_id)
            results.append(store.add(mine))
            # Answered only once committed: every connection sees it now.
            assert any(row["payload_id"] == mine.payload_id
                       for row in store.instance_payloads(instance_id, 1, 0))
            results.append(store.add(shared[n]))
        return results

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(worker, range(threads)))
    own = [result for results in outcomes for result in results[0::2]]
    shared_outcomes = [result for results in outcomes for result in results[1::2]]
    assert own == [True] * threads * per_thread
    assert shared_outcomes.count(True) == per_thread  # each shared payload_id new once
    stats = store.stats()
    assert stats["payloads"] == threads * per_thread + per_thread
    assert stats["keys"] == {"hits": threads * per_thread, "shared": per_thread}


def test_a_payload_postgresql_cannot_hold_fails_alone(store: AnyStore) -> None:
    if isinstance(store, SQLiteStore):
        pytest.skip("SQLite stores any string")
    good, bad = _record({"n": 1}), _record({"text": "nul \u0000"})
    with pytest.raises(UnstorablePayload):
        store._add_batch([good, bad])  # one transaction: nothing of it is kept
    assert store.all_payloads() == []
    assert store.add(good) is True
    with pytest.raises(UnstorablePayload):
        store.add(bad)
    assert [row["payload_id"] for row in store.all_payloads()] == [good.payload_id]


def _event(payload: PayloadRecord, event_id: str) -> EventRecord:
    return EventRecord(
        instance_id=payload.instance_id, event_id=event_id,
        event_time="2026-11-23T09:59:00.000000Z", counted_at="2026-11-23T09:59:00.000000Z",
        event_type="behavioral", event_name="click", attrs={"page": "/"},
        payload_id=payload.payload_id, received_at=payload.received_at,
    )


def test_a_batch_stores_the_events_of_its_new_payloads_once(store: AnyStore) -> None:
    first, second = _record({"n": 1}), _record({"n": 2})
    first = PayloadRecord(**{**first.__dict__, "events": (_event(first, "a" * 32),)})
    # The second payload carries a new event and, proxied twice, the first one's.
    second = PayloadRecord(**{
        **second.__dict__, "events": (_event(second, "b" * 32), _event(second, "a" * 32)),
    })
    resent = PayloadRecord(**{**first.__dict__, "received_at": "2026-11-23T11:00:00.000000Z"})
    assert store._add_batch([first, second, resent]) == [True, True, False]
    window = EventQuery(since="2026-11-01T00:00:00.000000Z", until="2026-12-01T00:00:00.000000Z")
    stored = store.events(window)
    assert sorted(event["event_id"] for event in stored) == ["a" * 32, "b" * 32]
    assert store.stats()["events"] == {"behavioral": {"click": 2}}


def _rollup_rows(store: SQLiteStore) -> Dict[str, List[Any]]:
    with store.reading() as run:
        return {
            table: sorted(run.fetchall(f"SELECT * FROM {table}"))
            for table in ROLLUP_TABLES
        }


def test_a_large_payload_folded_as_it_is_stored_gives_the_same_rollups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over FOLD_AT_ONCE_BYTES (lowered to 10 kB) of data: a long value, a counter, a counting set.
    monkeypatch.setattr("server_stub._sqlite.FOLD_AT_ONCE_BYTES", 10_000)
    large = {
        "x": [{"a": n % 7} for n in range(2_000)],
        "n": 5,
        "seen": [{"value": {"v": n}, "count": 2} for n in range(3)],
    }
    other = "4f2b1c3d-0000-4000-8000-000000000002"
    first = _record(large, instance_id=other)
    records = [
        _record({"n": 1, "x": "short"}, instance_id=other),
        first,
        _record({"n": 2, "x": [1], "seen": [{"value": {"v": 1}, "count": 1}]}),
        PayloadRecord(**{**first.__dict__, "received_at": "2026-11-23T12:00:00.000000Z"}),
        _record(large, instance_id=other),
    ]
    at_once = SQLiteStore(str(tmp_path / "at_once.db"))
    with monkeypatch.context() as patched:
        patched.setattr("server_stub._sqlite.FOLD_AT_ONCE_BYTES", 1 << 40)  # every one pending
        pending = SQLiteStore(str(tmp_path / "pending.db"))
        try:
            assert [pending.add(record) for record in records] == [True, True, True, False, True]
            assert pending.fold_rollups() == 4
        except BaseException:
            pending.close()
            raise
    try:
        assert [at_once.add(record) for record in records] == [True, True, True, False, True]
        assert at_once.fold_rollups() == 2  # the two large ones were folded as they were stored
        expected = _rollup_rows(pending)
        assert expected["rollup_hours"] and expected["rollup_cset_members"]
        assert _rollup_rows(at_once) == expected
    finally:
        at_once.close()
        pending.close()


def test_a_fold_of_payloads_still_held_gives_the_rollups_of_a_fold_after_a_restart(
    tmp_path: Path,
) -> None:
    records = [
        _record({"n": 1, "x": "short", "seen": [{"value": "a", "count": 2}]}),
        _record({"n": 2, "x": [1, {"b": None}], "f": 1.5, "seen": [{"value": {}, "count": 1}]}),
        _record({"n": -3, "x": "\u00e9\ud800"}, instance_id="4f2b1c3d-0000-4000-8000-000000000002"),
    ]
    held = SQLiteStore(str(tmp_path / "held.db"))
    before_restart = SQLiteStore(str(tmp_path / "restarted.db"))
    try:
        assert [held.add(record) for record in records] == [True, True, True]
        assert held.fold_rollups() == 3  # in the process that stored them
        assert [before_restart.add(record) for record in records] == [True, True, True]
    finally:
        before_restart.close()
    restarted = SQLiteStore(str(tmp_path / "restarted.db"))
    try:
        assert restarted.fold_rollups() == 3  # decoded from the database
        expected = _rollup_rows(restarted)
        assert expected["rollup_cset_members"] and expected["rollup_latest"]
        assert _rollup_rows(held) == expected
    finally:
        held.close()
        restarted.close()


def test_a_fold_decodes_a_payload_whose_held_text_is_not_the_stored_one(tmp_path: Path) -> None:
    # E.g. a seq whose transaction rolled back, reused by another payload.
    stale = {"n": 1000, "x": "stale"}
    folds = []
    for name, parsed in (("plain", None), ("stale", {1: ('{"n":1000,"x":"stale"}', stale)})):
        store = SQLiteStore(str(tmp_path / f"{name}.db"))
        try:
            assert store.add(_record({"n": 1, "x": "stored"}))
            with store.writing() as run:
                assert fold_pending(run, _SELECT_PENDING, parsed, mark_folded=_mark_folded) == 1
            folds.append(_rollup_rows(store))
        finally:
            store.close()
    assert folds[0]["rollup_key_hours"] and folds[1] == folds[0]


def test_a_fold_that_fails_after_its_payloads_committed_loses_none_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Payloads without events are committed by their INSERT alone; the fold that
    # every FOLD_EVERY-th one triggers runs after, in a transaction of its own.
    monkeypatch.setattr("server_stub._sqlite.FOLD_EVERY", 2)
    store = SQLiteStore(str(tmp_path / "t.db"))
    try:
        assert store.add(_record({"n": 1}))
        with monkeypatch.context() as patched:
            patched.setattr(
                "server_stub._sqlite.fold_pending",
                lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk gone")),
            )
            assert store.add(_record({"n": 2})) is True
        assert "folding stored payloads into the rollups failed" in caplog.text
        with store.reading() as run:
            assert run.fetchall("SELECT count(*) FROM rollup_pending") == [(2,)]
        assert store.fold_rollups() == 2
        assert store.stats()["keys"] == {"n": 3}
        with store.reading() as run:
            assert run.fetchall("SELECT sum(total) FROM rollup_key_hours") == [(3,)]
    finally:
        store.close()


def test_sqlite_insert_gives_each_new_row_its_stored_seq(tmp_path: Path) -> None:
    from server_stub._sqlite import _IDS_PER_SELECT, _insert

    store = SQLiteStore(str(tmp_path / "s.db"))
    try:
        with store._connection() as connection:

            def row(payload_id: str) -> tuple[Any, ...]:
                return (payload_id, "i", "t", "r", "{}", None, 0)

            def stored() -> Dict[str, int]:
                return dict(connection.execute("SELECT payload_id, seq FROM payloads").fetchall())

            first = [f"a{n}" for n in range(5)]
            assert _insert(connection, [row(i) for i in first]) == [stored()[i] for i in first]
            # Repeats of stored ids and within the batch, over more ids than one SELECT asks
            ids = [f"b{n}" for n in range(_IDS_PER_SELECT + 10)]
            batch = ["a1", *ids[:3], "b0", "a4", *ids[3:]]
            seqs = _insert(connection, [row(i) for i in batch])
            now = stored()
            assert seqs == [None, *(now[i] for i in ids[:3]), None, None,
                            *(now[i] for i in ids[3:])]
            assert _insert(connection, [row("a0"), row("b1")]) == [None, None]
    finally:
        store.close()


def test_a_store_fold_reads_back_a_payload_held_under_another_payload_id(tmp_path: Path) -> None:
    # E.g. a seq whose transaction rolled back, reused by another process's payload.
    folds = []
    for name in ("plain", "stale"):
        store = SQLiteStore(str(tmp_path / f"{name}.db"))
        try:
            record = _record({"n": 1, "x": "stored"})
            assert store.add(record)
            if name == "stale":
                assert store._parsed[1][0] == record.payload_id
                store._parsed[1] = (uuid.uuid4().hex, {"n": 1000, "x": "stale"})
            else:
                store._parsed.clear()  # read back and decoded
            assert store.fold_rollups() == 1
            folds.append(_rollup_rows(store))
        finally:
            store.close()
    assert folds[0]["rollup_key_hours"] and folds[1] == folds[0]
