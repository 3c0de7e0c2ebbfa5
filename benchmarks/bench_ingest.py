"""Durable ingest beside non-durable ingest, in the same run: what do durable commits cost?

Run: ``python benchmarks/bench_ingest.py [--payloads N] [--clients P] [--threads T]
[--repeat R] [--only sqlite|postgres]``. Needs the ``test`` extra (psycopg, gunicorn)
and PostgreSQL's binaries for the PostgreSQL half.

Each pair runs the same server the same way on a fresh database, once as shipped
(durable) and once with the database told not to wait for the disk:

- SQLite under ``python -m server_stub``'s runtime (one process, a thread per
  connection): as shipped (WAL, ``synchronous=NORMAL``) vs ``synchronous=OFF``.
- PostgreSQL under ``gunicorn -w 4``: ``synchronous_commit=on`` (PostgreSQL's
  default) vs ``off`` (set on the fresh database, so one cluster serves both).

The load comes from ``P`` processes of ``T`` threads posting pre-encoded 10-key
payloads with ``http.client`` (``bench_postgres.run_load``), so the generator
costs the machine little. Runs are interleaved (durable, fast, durable, ...) so
that other load on the machine hits both; the median of ``R`` is shown, with the
server processes' CPU time per payload (and PostgreSQL's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_postgres
from benchmarks._shared import free_port
from server_stub._pgtemp import BENCHMARK_SETTINGS, TemporaryPostgres

__all__ = ["main", "measure_pair"]

# ``python -m server_stub`` itself, its SQLite connections set to the ``synchronous``
# given first. No per-address or total limit: one address posts as fast as it can.
_SQLITE_SERVER = """
import sys
import server_stub._sqlite
from server_stub.__main__ import main

synchronous = sys.argv.pop(1)
connect = server_stub._sqlite.SQLiteStore._connect

def _connect(self):
    connection = connect(self)
    connection.execute(f"PRAGMA synchronous={synchronous}")
    return connection

server_stub._sqlite.SQLiteStore._connect = _connect
sys.exit(main(sys.argv[1:]))
"""

DURABLE, FAST = "durable", "fast"


def _sqlite_server(db: str, synchronous: str) -> Tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _SQLITE_SERVER, synchronous, "--port", str(port), "--db", db,
         "--per-address", "0", "--total", "0"],
        cwd=bench_postgres.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        bench_postgres._wait_until_up(port, process)
    except BaseException:
        bench_postgres._stop(process)
        raise
    return process, port


def _postgres_database(cluster: TemporaryPostgres, durable: bool) -> str:
    import psycopg  # noqa: PLC0415 - the test extra's, like gunicorn

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        if not durable:
            admin.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
    return cluster.url(name)


def measure_pair(
    backend: str,
    args: argparse.Namespace,
    tmp: Path,
    cluster: Optional[TemporaryPostgres],
) -> Dict[str, Dict[str, Any]]:
    """One durable and one fast run of ``backend`` (``"sqlite"`` or ``"postgres"``)."""
    results: Dict[str, Dict[str, Any]] = {}
    for mode in (DURABLE, FAST):
        if backend == "sqlite":
            db = str(tmp / f"bench_{uuid.uuid4().hex[:12]}.db")
            process, port = _sqlite_server(db, "NORMAL" if mode == DURABLE else "OFF")
            postmaster = None
        else:
            assert cluster is not None
            db = _postgres_database(cluster, mode == DURABLE)
            process, port = bench_postgres._start_server(db, args.workers, args.server_threads)
            postmaster = bench_postgres._postmaster_pid(cluster)
        try:
            result = bench_postgres.measure_running(process, port, args, postmaster)
        finally:
            bench_postgres._stop(process)
        if result["failures"] or result["stored"] != args.payloads:
            raise RuntimeError(f"{backend} {mode}: lost or failed payloads: {result}")
        if backend == "postgres":
            result["payloads_per_commit"] = _payloads_per_commit(db)
        results[mode] = result
    return results


def _payloads_per_commit(db: str) -> float:
    """Stored payloads per transaction that stored any (rows of one transaction share
    its id, ``xmin``): how large the server's commit groups were."""
    import psycopg  # noqa: PLC0415 - the test extra's, like gunicorn

    with psycopg.connect(db) as connection:
        row = connection.execute(
            "SELECT count(*)::float / greatest(count(DISTINCT xmin::text), 1) FROM payloads"
        ).fetchone()
    return float(row[0]) if row is not None else 0.0


def _median(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    ordered = sorted(results, key=lambda result: result["payloads_per_s"])
    return ordered[len(ordered) // 2]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--payloads", type=int, default=4000, help="per run")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (PostgreSQL)")
    parser.add_argument(
        "--server-threads", type=int, default=8, help="threads per gunicorn worker (PostgreSQL)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="pairs per backend (median shown)")
    parser.add_argument("--only", choices=("sqlite", "postgres"), help="one backend only")
    args = parser.parse_args(argv)
    backends = [args.only] if args.only else ["sqlite", "postgres"]
    print(
        f"{args.payloads} payloads per run, {args.clients} client processes x {args.threads}"
        f" threads, {os.cpu_count()} cores; durable and fast runs interleaved,"
        f" median of {args.repeat}\n"
    )
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {
        backend: {DURABLE: [], FAST: []} for backend in backends
    }
    postgres: ContextManager[Optional[TemporaryPostgres]] = (
        TemporaryPostgres(BENCHMARK_SETTINGS) if "postgres" in backends else nullcontext()
    )
    with tempfile.TemporaryDirectory() as tmp, postgres as cluster:
        for _ in range(args.repeat):
            for backend in backends:
                pair = measure_pair(backend, args, Path(tmp), cluster)
                for mode, result in pair.items():
                    runs[backend][mode].append(result)
    print(
        "| backend, server | commits | payloads/s (range) | durable/fast | p50 ms | p99 ms |"
        " server CPU ms/payload | PostgreSQL CPU ms/payload | payloads per commit |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for backend in backends:
        label = (
            "SQLite, python -m server_stub"
            if backend == "sqlite"
            else f"PostgreSQL, gunicorn -w {args.workers} --threads {args.server_threads}"
        )
        fast_rate = _median(runs[backend][FAST])["payloads_per_s"]
        for mode in (DURABLE, FAST):
            median = _median(runs[backend][mode])
            rates = [result["payloads_per_s"] for result in runs[backend][mode]]
            commits = {
                ("sqlite", DURABLE): "synchronous=NORMAL (shipped)",
                ("sqlite", FAST): "synchronous=OFF",
                ("postgres", DURABLE): "synchronous_commit=on (shipped)",
                ("postgres", FAST): "synchronous_commit=off",
            }[backend, mode]
            print(
                f"| {label} | {commits} | {median['payloads_per_s']:.0f}"
                f" ({min(rates):.0f}-{max(rates):.0f}) |"
                f" {median['payloads_per_s'] / fast_rate:.2f} |"
                f" {median['p50_ms']:.1f} | {median['p99_ms']:.1f} |"
                f" {median['server_cpu_ms']:.3f} | {median['db_cpu_ms']:.3f} |"
                f" {median.get('payloads_per_commit', float('nan')):.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
