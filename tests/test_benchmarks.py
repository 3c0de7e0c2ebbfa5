"""Smoke test of ``benchmarks/``: every benchmark runs once, tiny, so none can rot.

The figures themselves come from ``python benchmarks/run.py``, never from CI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

import pytest

import telemetry

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not installed: it lives next to ``tests``
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_client, bench_events, run  # noqa: E402

TINY = run.TINY


@pytest.fixture
def results(default_client: telemetry.Client) -> Dict[str, Any]:
    """Every benchmark once at tiny sizes, on a default client of this test's own."""
    return run.run_all(TINY, log=lambda message: None)


def _assert_beside_floor(calls: Dict[str, Dict[str, float]]) -> None:
    assert set(calls) == set(bench_client.CALLS)
    for name, figures in calls.items():
        assert figures["ns"] > 0
        assert figures["floor_ns"] > 0
        assert figures["ratio"] == pytest.approx(figures["ns"] / figures["floor_ns"], abs=0.01)
        if name in bench_client.NEW_VALUE_FLOORS:  # also beside a floor that stores new keys
            assert figures["new_value_ns"] > 0 and figures["new_value_floor_ns"] > 0
            assert figures["new_value_ratio"] == pytest.approx(
                figures["new_value_ns"] / figures["new_value_floor_ns"], abs=0.01)


def test_every_benchmark_runs_and_reports_its_figures(results: Dict[str, Any]) -> None:
    assert set(results) == {
        "calls_on", "calls_off", "contended", "import", "memory", "snapshot_encode", "stall",
        "server", "server_app_cpu", "spool_start", "withdraw_spool", "events_on", "events_off",
    }
    spool = results["spool_start"]
    assert spool["files"] == TINY.spool_files
    assert spool["start_ms"] > 0 and spool["baseline_ms"] > 0
    withdrawn = results["withdraw_spool"]
    assert withdrawn["files"] == TINY.spool_files
    assert withdrawn["off_ms"] > 0 and withdrawn["baseline_ms"] > 0
    assert withdrawn["deleted_in_s"] > 0
    _assert_beside_floor(results["calls_on"])
    _assert_beside_floor(results["calls_off"])
    for calls in (results["events_on"], results["events_off"]):
        assert set(calls) == set(bench_events.EVENT_CALLS)
        for figures in calls.values():
            assert figures["ns"] > 0 and figures["floor_ns"] > 0
            assert figures["ratio"] == pytest.approx(figures["ns"] / figures["floor_ns"], abs=0.01)
    contended = results["contended"]
    assert contended["threads"] == 4
    assert contended["calls_per_s"] > 0
    assert contended["floor_calls_per_s"] > 0
    assert contended["ratio"] == pytest.approx(
        contended["floor_calls_per_s"] / contended["calls_per_s"], abs=0.01
    )

    imported = results["import"]
    assert imported["runs"] == TINY.import_runs
    assert imported["import_ms"] > 0
    assert imported["baseline_ms"] > 0
    assert imported["added_ms"] == pytest.approx(
        imported["import_ms"] - imported["baseline_ms"], abs=0.11
    )

    # The fills hold exactly the items asked for, of every kind.
    assert set(results["memory"]) == set(bench_client.FILLS)
    for memory in results["memory"].values():
        assert memory["items"] == TINY.buffer_items
        assert memory["bytes"] > 0
        assert memory["mb"] == pytest.approx(memory["bytes"] / 1e6, abs=0.01)
        assert memory["bytes_per_item"] == pytest.approx(memory["bytes"] / memory["items"], 0.01)
    for encoded in results["snapshot_encode"].values():
        assert encoded["items"] == TINY.buffer_items
        assert encoded["ms"] > 0
        assert 0 < encoded["body_bytes"] < encoded["raw_bytes"]  # gzipped

    assert set(results["stall"]) == set(bench_client.STALL_FILLS)
    for shape, stall in results["stall"].items():
        assert stall["fill"] == shape
        assert stall["delivered"] is True
        assert stall["items"] == TINY.stall_items
        assert stall["request_body_bytes"]
        for phase in ("uncontended", "during_emission"):
            figures = stall[phase]
            assert figures["calls"] > 0
            assert 0 < figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]
            assert figures["over_5ms"] <= figures["over_1ms"] <= figures["calls"]
        collected = stall["gc_during_emission"]
        assert 0 <= collected["full"] <= collected["collections"]
        assert 0 <= collected["in_emitter"] <= collected["collections"]
        phases = stall["client_work"]["seconds"] + stall["sending"]["seconds"]
        assert 0 < phases <= stall["emission_s"] + 0.002  # each figure is rounded to 1 ms

    server = results["server"]
    assert server["payloads"] == server["stored"] == TINY.ingest_payloads
    assert server["failures"] == 0
    assert server["payloads_per_s"] > 0

    app = results["server_app_cpu"]
    assert app["payloads"] > 0 and app["threads"] == 8
    assert app["failures"] == 0
    assert app["cpu_ms_per_payload"] > 0

    rows = run.table_rows(results)
    by_figure = {row.figure: row for row in rows}
    increment = results["calls_on"]["increment"]
    row = by_figure["increment (ns/call)"]
    assert row.ratio == f"{increment['ns'] / increment['floor_ns']:.2f}x"
    assert row.met == (increment["ns"] / increment["floor_ns"] <= 0.75)
    assert all(row.met in (True, False) for row in rows if row.target)
    assert all(row.met is None for row in rows if not row.target)
    table = run.format_table(rows)
    assert table.splitlines()[0].split() == ["figure", "value", "baseline", "ratio", "target",
                                             "met?"]
    assert all(row.figure.strip() in table for row in rows)


def test_the_buffer_fills_hold_exactly_the_items_asked_for(tmp_path: Path) -> None:
    fills = {**bench_client.FILLS, **bench_client.STALL_FILLS}
    fills.pop("events", None)  # events are not buffer items: see the next test
    for fill in fills.values():
        for items in (0, 1, 2, 37, 1_000):
            client = bench_client.isolated_client(str(tmp_path))
            fill(client, items)
            payload = client.take_payload()
            assert payload is not None
            assert payload.items == items
            assert payload.dropped == 0


def test_the_soak_runs_tiny_and_loses_nothing() -> None:
    """``benchmarks/soak.py`` at a tiny size, so it cannot rot; the figures come from
    running it by hand (``python benchmarks/soak.py``), never from CI."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # ``benchmarks`` is not installed: it lives next to ``tests``
        sys.path.insert(0, root)
    from benchmarks import soak

    result = soak.soak(4, 3, fault_rate=0.5, seed=7, workers=4, log=lambda message: None)
    assert result["cycles"] == 3
    assert result["faults_scripted"] > 0
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["calls_total_matches"]
    assert result["left_in_spool"] == 0
    assert result["server_p99_ms"] > 0
    assert soak.main(["--instances", "2", "--cycles", "1", "--json"]) == 0


@pytest.mark.skipif("events" not in bench_client.STALL_FILLS, reason="no events here")
def test_the_events_fill_records_the_events_asked_for(tmp_path: Path) -> None:
    for items in (0, 1, 37):
        client = bench_client.isolated_client(str(tmp_path), max_events=100)
        bench_client.fill_events(client, items)
        payload = client.take_payload()
        assert payload is not None
        assert len(getattr(payload, "events", ())) == items


def test_the_query_benchmark_runs_and_its_postgres_copy_answers_alike(
    tmp_path: Path, postgres_url: str
) -> None:
    import json
    from datetime import datetime, timedelta, timezone

    from benchmarks import bench_queries
    from server_stub import PostgresStore, SQLiteStore
    from server_stub import _queries as queries

    output = tmp_path / "queries.json"
    argv = ["--payloads", "300", "--instances", "20", "--days", "3", "--repeat", "1"]
    argv += ["--ingest", "0", "--no-postgres", "--output", str(output)]
    assert bench_queries.main(argv) == 0
    figures = json.loads(output.read_text())
    assert figures["sqlite_build"]["payloads"] == 300
    assert set(figures["sqlite_queries"]) == set(bench_queries.query_set(datetime.now()))

    end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    path = str(tmp_path / "small.db")
    bench_queries.build_sqlite(path, bench_queries.payload_rows(300, 20, 3, end))
    bench_queries.copy_to_postgres(path, postgres_url)
    window = queries.Window(
        queries.parse_when("since", (end - timedelta(days=4)).strftime("%Y-%m-%d")),
        queries.parse_when("until", (end + timedelta(days=1)).strftime("%Y-%m-%d")),
    )
    answers = []
    for store in (SQLiteStore(path), PostgresStore(postgres_url)):
        with store.reading() as run:
            answers.append(
                [
                    queries.stats(run, window),
                    queries.series(run, "requests", "hour", window),
                    queries.breakdown(run, "version", 10, window),
                    queries.breakdown(run, "user_agents", 10, window),
                    queries.active(run, "day", window),
                ]
            )
        store.close()
    assert answers[0] == answers[1]
    assert answers[0][0]["payloads"] == 300
