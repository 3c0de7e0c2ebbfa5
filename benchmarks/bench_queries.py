"""Window queries at scale, and what the rollups cost at ingest.

Run: ``python benchmarks/bench_queries.py [--payloads 1000000] [--instances 10000]
[--days 90] [--repeat 15] [--ingest 3000] [--no-postgres]``. Needs the ``test``
extra (psycopg) and PostgreSQL's binaries for the PostgreSQL half.

1. Builds a SQLite database of ``--payloads`` 10-key payloads from
   ``--instances`` instances spread over ``--days`` days. The payloads are
   inserted in bulk (``executemany``, 5,000 per transaction), and each
   batch is folded into the rollups by the same ``fold_pending`` that
   ingest and queries run.
2. Copies that database, payloads and rollup tables row for row, into a
   throwaway PostgreSQL (``COPY``): the rollups PostgreSQL's own fold would
   compute from the same payloads, in minutes rather than an hour.
3. Times the queries over HTTP (the real app under the stdlib server on
   loopback, one kept-alive connection): ``/v1/stats`` over 30 days,
   ``/v1/series`` with day buckets over 90 days, ``/v1/breakdown`` of a set
   key and of a counting set, ``/v1/active`` over 90 days. Median, p90, max.
4. Ingest throughput over HTTP with rollups against the same server with
   them switched off (nothing folded; same run,
   alternated, ``bench_server.ingest``), and in-process ``SQLiteStore.add``
   the same way.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_server import ingest
from server_stub import PayloadRecord, PostgresStore, SQLiteStore, create_app
from server_stub._http import make_server
from server_stub._pgtemp import TEST_SETTINGS, TemporaryPostgres
from server_stub._rollups import ROLLUP_TABLES, fold_pending
from server_stub._sqlite import _SELECT_PENDING, _mark_folded

__all__ = ["main"]

UTC = timezone.utc
_BULK = 5000
_VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "2.0.0"]
_AGENTS = ["curl", "firefox", "chrome", "go-http", "python-requests", "wget"]
# The server without rollups: nothing folded (on SQLite, storing a payload
# records nothing for the rollups: pending is every payload after the last folded).
_NO_ROLLUPS_SERVER = (
    "import sys, server_stub._sqlite as store; store.fold_pending = lambda *args, **kwargs: 0;"
    " from server_stub.__main__ import main; sys.exit(main(sys.argv[1:]))"
)
# The SQLite store's name for what rollups cost at ingest, switched off to compare.
_FOLD = "fold_pending"
_PAYLOAD_COLUMNS = "payload_id, instance_id, sent_at, received_at, data, client, dropped"


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def payload_rows(
    count: int, instances: int, days: int, end: datetime, seed: int = 7
) -> Iterator[Tuple[Any, ...]]:
    """``count`` payload rows (the payloads table's columns), 10 keys each, oldest first."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(instances)]
    span = days * 86_400
    offsets = sorted(rng.random() * span for _ in range(count))
    start = end - timedelta(days=days)
    for n, offset in enumerate(offsets):
        instance = rng.randrange(instances)
        sent = start + timedelta(seconds=offset)
        late = rng.random() < 0.05  # spooled: arrives up to two days later
        arrival = sent + timedelta(seconds=rng.uniform(0, 172_800 if late else 5))
        # Newer versions spread over the period: adoption curves.
        version = _VERSIONS[min(len(_VERSIONS) - 1, int(offset / span * 4 + rng.random() * 1.5))]
        data = {
            "requests": rng.randrange(1000),
            "errors": rng.randrange(7),
            "bytes_out": rng.randrange(1 << 20),
            "version": version,
            "os": ("linux", "darwin", "windows")[instance % 3],
            "tls": instance % 2 == 0,
            "latency_ms": round(rng.uniform(1, 50), 2),
            "memory": {"heap": rng.randrange(1 << 24), "sys": 12958736},
            "modules": ["http", "tls", "cache"][: 1 + instance % 3],
            "user_agents": [
                {"value": agent, "count": rng.randrange(1, 9)}
                for agent in rng.sample(_AGENTS, rng.randint(1, 3))
            ],
        }
        yield (
            uuid.UUID(int=rng.getrandbits(128)).hex,
            ids[instance],
            _rfc3339(sent),
            _rfc3339(min(arrival, end)),
            json.dumps(data, separators=(",", ":")),
            '{"name":"telemetry-python","version":"0.1.0","dropped":0}',
            (n % 50 == 0) * rng.randrange(5),
        )


def build_sqlite(path: str, rows: Iterator[Tuple[Any, ...]]) -> Dict[str, Any]:
    """Bulk-insert ``rows`` into a new SQLite store, folding each batch into the rollups."""
    store = SQLiteStore(path)
    began = time.perf_counter()
    fold_seconds = 0.0
    count = 0
    while True:
        batch = [row for _, row in zip(range(_BULK), rows)]
        if not batch:
            break
        with store.writing() as run:
            connection = run.connection
            first = connection.execute("SELECT COALESCE(max(seq), 0) + 1 FROM payloads").fetchone()[
                0
            ]
            connection.executemany(
                f"INSERT INTO payloads (seq, {_PAYLOAD_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(first + i, *row) for i, row in enumerate(batch)],
            )
            folding = time.perf_counter()
            fold_pending(run, _SELECT_PENDING, mark_folded=_mark_folded)
            fold_seconds += time.perf_counter() - folding
        count += len(batch)
        if count % 100_000 == 0:
            print(f"  ... {count} payloads", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - began
    store.close()
    return {
        "payloads": count,
        "seconds": round(elapsed, 1),
        "fold_seconds": round(fold_seconds, 1),
        "payloads_per_s": round(count / elapsed),
        "file_mb": round(os.path.getsize(path) / 1e6),
    }


def copy_to_postgres(sqlite_path: str, url: str) -> Dict[str, Any]:
    """Copy the payloads and every rollup table from SQLite into ``url``'s (migrated) schema."""
    import psycopg  # noqa: PLC0415 - the PostgreSQL half only

    PostgresStore(url).close()  # creates the schema
    source = sqlite3.connect(sqlite_path)
    began = time.perf_counter()
    rows_copied: Dict[str, int] = {}
    with psycopg.connect(url) as target:
        for table in ("payloads", *ROLLUP_TABLES):
            columns = [
                row[1]
                for row in source.execute(f"PRAGMA table_info({table})")
                if not (table == "payloads" and row[1] == "seq")
            ]
            names = ", ".join(columns)
            copied = 0
            with (
                target.cursor() as cursor,
                cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy,
            ):
                order = " ORDER BY seq" if table == "payloads" else ""
                for row in source.execute(f"SELECT {names} FROM {table}{order}"):
                    copy.write_row(row)
                    copied += 1
            rows_copied[table] = copied
        target.commit()
        # What autovacuum does to a database in service: statistics, and the
        # visibility map that lets counts use index-only scans.
        target.autocommit = True
        target.execute("VACUUM ANALYZE")
    source.close()
    return {"seconds": round(time.perf_counter() - began, 1), "rows": rows_copied}


def time_queries(app: Any, queries: Dict[str, str], repeat: int) -> Dict[str, Any]:
    """Median/p90/max milliseconds of each query over HTTP on loopback."""
    httpd = make_server("127.0.0.1", 0, app)
    httpd.access_log_level = 5  # below DEBUG: not logged
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    results: Dict[str, Any] = {}
    try:
        host, port = httpd.server_address[:2]
        connection = http.client.HTTPConnection(str(host), int(port), timeout=120)
        for name, path in queries.items():
            timings = []
            for attempt in range(repeat + 2):
                began = time.perf_counter()
                connection.request("GET", path)
                answer = connection.getresponse()
                body = answer.read()
                elapsed = (time.perf_counter() - began) * 1000
                if answer.status != 200:
                    raise RuntimeError(f"{path}: {answer.status} {body[:200]!r}")
                if attempt >= 2:  # the first two warm caches
                    timings.append(elapsed)
            timings.sort()
            results[name] = {
                "median_ms": round(statistics.median(timings), 1),
                "p90_ms": round(timings[int(0.9 * (len(timings) - 1))], 1),
                "max_ms": round(timings[-1], 1),
                "bytes": len(body),
            }
        connection.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
    return results


def query_set(end: datetime) -> Dict[str, str]:
    def day(moment: datetime) -> str:
        return moment.strftime("%Y-%m-%d")

    last30 = f"since={day(end - timedelta(days=30))}&until={day(end)}"
    last90 = f"since={day(end - timedelta(days=90))}&until={day(end)}"
    before = f"since={day(end - timedelta(days=60))}&until={day(end - timedelta(days=30))}"
    return {
        "stats 30 days": f"/v1/stats?{last30}",
        "series requests, day buckets, 90 days": f"/v1/series?key=requests&bucket=day&{last90}",
        "series version, week buckets, 90 days": f"/v1/series?key=version&bucket=week&{last90}",
        "breakdown version (set), 30 days": f"/v1/breakdown?key=version&{last30}",
        "breakdown user_agents (counting set), 30 days": f"/v1/breakdown?key=user_agents&{last30}",
        "breakdown version, 30 days ending 30 days ago": f"/v1/breakdown?key=version&{before}",
        "active, day buckets, 90 days": f"/v1/active?bucket=day&{last90}",
    }


def ingest_ratio(payloads: int, rounds: int = 2) -> Dict[str, Any]:
    """HTTP ingest with the fold on and off, alternated; the same for ``SQLiteStore.add``."""
    runs: Dict[str, List[float]] = {"with": [], "without": []}
    cpu: Dict[str, List[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        off = ingest(payloads, 4, command=[sys.executable, "-c", _NO_ROLLUPS_SERVER])
        on = ingest(payloads, 4)
        for name, result in (("without", off), ("with", on)):
            runs[name].append(result["payloads_per_s"])
            cpu[name].append(result["server_cpu_ms_per_payload"])
    store_runs = {"with": [], "without": []}  # type: Dict[str, List[float]]
    for _ in range(rounds):
        for name in ("without", "with"):
            store_runs[name].append(_store_add_rate(payloads, fold=name == "with"))
    return {
        "http_payloads_per_s": runs,
        "http_server_cpu_ms_per_payload": cpu,
        "http_ratio": round(
            statistics.median(runs["with"]) / statistics.median(runs["without"]), 2
        ),
        "store_add_payloads_per_s": store_runs,
        "store_add_ratio": round(
            statistics.median(store_runs["with"]) / statistics.median(store_runs["without"]), 2
        ),
    }


def _store_add_rate(payloads: int, *, fold: bool) -> float:
    """``SQLiteStore.add`` one payload per transaction, as the server does; payloads/s."""
    import server_stub._sqlite as store_module  # noqa: PLC0415

    real = getattr(store_module, _FOLD)
    if not fold:
        setattr(store_module, _FOLD, lambda *args, **kwargs: 0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteStore(str(Path(tmp) / "add.db"))
            now = _rfc3339(datetime.now(UTC))
            records = [
                PayloadRecord(row[0], row[1], row[2], now, json.loads(row[4]), None)
                for row in payload_rows(payloads, 200, 2, datetime.now(UTC), seed=11)
            ]
            began = time.perf_counter()
            for record in records:
                store.add(record)
            rate = payloads / (time.perf_counter() - began)
            store.close()
    finally:
        setattr(store_module, _FOLD, real)
    return round(rate)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payloads", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--ingest", type=int, default=3000, help="payloads per ingest run")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--ingest-only", action="store_true", help="only the ingest comparison")
    parser.add_argument("--output", help="write the results as JSON here too")
    parser.add_argument(
        "--db", help="SQLite file to build and keep (an existing one is reused, not rebuilt)"
    )
    args = parser.parse_args(argv)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if args.ingest_only:
        args.no_postgres = True
        args.payloads = 0
    results: Dict[str, Any] = {
        "payloads": args.payloads,
        "instances": args.instances,
        "days": args.days,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or str(Path(tmp) / "bench.db")
        queries = query_set(end)
        if args.payloads and not Path(path).exists():
            print(f"building {args.payloads} payloads in SQLite ...", file=sys.stderr)
            rows = payload_rows(args.payloads, args.instances, args.days, end)
            results["sqlite_build"] = build_sqlite(path, rows)
            print(json.dumps(results["sqlite_build"]), file=sys.stderr)
        if args.payloads:
            app = create_app(db=path)
            results["sqlite_queries"] = time_queries(app, queries, args.repeat)
            app.store.close()
            print(json.dumps(results["sqlite_queries"], indent=1), file=sys.stderr)
        if not args.no_postgres:
            with TemporaryPostgres(settings=TEST_SETTINGS) as cluster:
                url = cluster.url()
                results["postgres_copy"] = copy_to_postgres(path, url)
                print(json.dumps(results["postgres_copy"]), file=sys.stderr)
                app = create_app(db=url)
                results["postgres_queries"] = time_queries(app, queries, args.repeat)
                app.store.close()
                print(json.dumps(results["postgres_queries"], indent=1), file=sys.stderr)
    if args.ingest:
        results["ingest"] = ingest_ratio(args.ingest)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
