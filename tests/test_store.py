"""Storage through the app and directly, on both backends: totals, dedup across
restarts, concurrency, rate-limit windows, the whole ``Store`` protocol."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import pytest
import requests
from _server_api import get, make_payload, post

from server_stub import PayloadRecord, Server, Store, open_store, serve


def test_stats_totals_match_independently_computed_totals(backend_server: Server) -> None:
    rng = random.Random(4)
    instances = [str(uuid.uuid4()) for _ in range(6)]
    counters: Counter[str] = Counter()
    agents: Counter[str] = Counter()
    ports: Counter[int] = Counter()
    latest: Dict[str, Any] = {}
    dropped = 0
    with requests.Session() as session:
        for index in range(300):
            data: Dict[str, Any] = {"requests": rng.randint(0, 1000)}
            counters["requests"] += data["requests"]
            if rng.random() < 0.5:
                data["errors"] = rng.randint(-5, 5)
                counters["errors"] += data["errors"]
            picked = rng.sample(["curl", "firefox", "go-http", "python"], rng.randint(1, 3))
            data["user_agents"] = [{"value": agent, "count": rng.randint(1, 9)} for agent in picked]
            agents.update({item["value"]: item["count"] for item in data["user_agents"]})
            if rng.random() < 0.3:
                data["ports"] = [{"value": 443, "count": 1}, {"value": 8080, "count": 2}]
                ports.update({443: 1, 8080: 2})
            for key, value in {
                "version": f"1.{rng.randint(0, 9)}",
                "tls": rng.random() < 0.5,
                "ratio": rng.random(),
                "memory": {"heap": rng.randint(0, 99), "index": index},
                "modules": ["a", "b"][: rng.randint(0, 2)],
            }.items():
                if rng.random() < 0.7:
                    data[key] = value
                    latest[key] = value
            payload_dropped = rng.randint(0, 3)
            dropped += payload_dropped
            response = post(
                backend_server,
                make_payload(rng.choice(instances), data, dropped=payload_dropped),
                session,
            )
            assert response.status_code == 200

    stats = get(backend_server, "/v1/stats?since=2000-01-01").json()

    expected_keys = {
        **latest,
        **counters,
        "user_agents": [{"value": agent, "count": agents[agent]} for agent in sorted(agents)],
        "ports": [{"value": port, "count": ports[port]} for port in (443, 8080)],
    }
    assert stats == {
        "instances": 6,
        "payloads": 300,
        "dropped": dropped,
        "keys": expected_keys,
        "events": {},
    }


def test_stats_key_that_changes_kind_restarts_from_the_latest_value(
    backend_server: Server,
) -> None:
    instance_id = str(uuid.uuid4())
    datas: List[Dict[str, Any]] = [
        {"k": 5, "flag": True, "set": [{"value": "a", "count": 1}], "empty": 3},
        {"k": "text", "flag": True, "set": 7, "empty": []},
        {"k": 2, "set": [{"value": {"z": 1, "a": 2}, "count": 2}, {"value": "a", "count": 1}]},
        {"k": 3, "set": [{"value": {"a": 2, "z": 1}, "count": 3}]},
    ]
    for data in datas:
        assert post(backend_server, make_payload(instance_id, data)).status_code == 200

    keys = backend_server.stats()["keys"]

    assert keys == {
        "k": 5,  # 2 + 3: the string reset the total
        "flag": True,  # bools are values, not counters
        "set": [{"value": "a", "count": 1}, {"value": {"a": 2, "z": 1}, "count": 5}],
        "empty": [],  # an empty array is a plain value
    }


def test_concurrent_clients_give_exact_totals(backend_server: Server) -> None:
    threads, per_thread = 8, 40

    def client(worker: int) -> None:
        instance_id = str(uuid.uuid4())
        with requests.Session() as session:
            for n in range(per_thread):
                data = {
                    "hits": n,
                    "workers": [{"value": worker, "count": 1}],
                    "shared": [{"value": "all", "count": 2}],
                }
                response = post(backend_server, make_payload(instance_id, data, dropped=1), session)
                assert response.status_code == 200

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(client, worker) for worker in range(threads)]:
            future.result()

    stats = get(backend_server, "/v1/stats?since=2000-01-01").json()
    assert stats == {
        "instances": threads,
        "payloads": threads * per_thread,
        "dropped": threads * per_thread,
        "keys": {
            "hits": threads * sum(range(per_thread)),
            "shared": [{"value": "all", "count": 2 * threads * per_thread}],
            "workers": [{"value": worker, "count": per_thread} for worker in range(threads)],
        },
        "events": {},
    }


def test_file_database_survives_a_restart(tmp_path: Path, backend_db: str) -> None:
    db = str(tmp_path / "telemetry.db") if backend_db == ":memory:" else backend_db
    payload = make_payload(data={"n": 7})
    with serve(db=db) as server:
        assert post(server, payload).status_code == 200
    with serve(db=db) as server:
        assert post(server, payload).status_code == 200  # still a duplicate
        assert server.stats() == {
            "instances": 1, "payloads": 1, "dropped": 0, "keys": {"n": 7}, "events": {},
        }
    assert (tmp_path / "telemetry.db").exists() == (db != backend_db)


def test_rate_limit_window_restarts(backend_db: str) -> None:
    clock = [1000.0]
    store = open_store(backend_db)
    try:
        assert store.check_rate("a", 2, 10.0, clock[0]) is None
        assert store.check_rate("a", 2, 10.0, clock[0] + 1) is None
        assert store.check_rate("a", 2, 10.0, clock[0] + 4) == pytest.approx(6.0)
        assert store.check_rate("b", 2, 10.0, clock[0] + 4) is None
        assert store.check_rate("a", 2, 10.0, clock[0] + 10) is None
    finally:
        store.close()


def test_each_backend_is_a_whole_store(backend_db: str) -> None:
    """Through the ``Store`` protocol only (mypy checks that each backend satisfies it)."""
    store: Store = open_store(backend_db)
    try:
        first = make_payload(data={"n": 1})
        record = PayloadRecord(
            payload_id=first["payload_id"],
            instance_id=first["instance_id"],
            timestamp=first["timestamp"],
            received_at="2026-11-23T10:00:01.000000Z",
            data=first["data"],
            client=first["client"],
        )
        assert store.add(record) is True
        assert store.add(record) is False
        assert store.check_rate(record.instance_id, 1, 60.0, 1000.0) is None
        assert store.check_rate(record.instance_id, 1, 60.0, 1001.0) == pytest.approx(59.0)
        listed = store.instance_payloads(record.instance_id, 10, 0)
        assert store.all_payloads() == [{**listed[0], "instance_id": record.instance_id}]
        assert listed == [
            {
                "payload_id": record.payload_id,
                "timestamp": record.timestamp,
                "received_at": record.received_at,
                "data": {"n": 1},
                "client": first["client"],
            }
        ]
        assert store.stats() == {
            "instances": 1, "payloads": 1, "dropped": 0, "keys": {"n": 1}, "events": {},
        }
    finally:
        store.close()
