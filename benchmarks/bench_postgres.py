"""Ingest throughput: SQLite in one process vs PostgreSQL under 1 and 4 gunicorn workers.

Run: ``python benchmarks/bench_postgres.py [--payloads N] [--clients P] [--threads T]
[--fast-commit]``. Needs the ``test`` extra (psycopg, gunicorn) and PostgreSQL's
binaries (a throwaway server is started, as in the tests).

Each configuration gets a fresh database and the same load: ``P`` client
processes of ``T`` threads each post 10-key payloads over loopback with
``http.client`` (kept-alive connections where the server keeps them; gunicorn's
sync workers close each one). The load generator runs in separate processes
because a client in the server's process is the bottleneck (see
``bench_server.ingest``). Reported per configuration: payloads/s, request
latency p50/p99, CPU time per payload of the server processes, of PostgreSQL,
and of the clients (all of them share the machine's cores), and how long one
``GET /v1/stats`` over the stored payloads took.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._shared import free_port, percentile
from benchmarks.bench_server import ten_key_payload
from server_stub._pgtemp import BENCHMARK_SETTINGS, TemporaryPostgres

__all__ = ["main", "run_load"]

REPO = Path(__file__).resolve().parents[1]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_WARM_UP = 40


def _payload(instance_id: str, n: int) -> bytes:
    return json.dumps(ten_key_payload(instance_id, n)).encode()


# -- the load generator (runs in its own processes) -------------------------------------------


def _post_all(port: int, bodies: List[Tuple[str, bytes]], latencies: List[float]) -> int:
    """Post ``bodies`` in order on one connection (reopened when the server closes it)."""
    failures = 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    for path, body in bodies:
        sent = time.perf_counter()
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - sent)
        failures += response.status != 200
    connection.close()
    return failures


def _client_process(
    port: int, count: int, threads: int, start: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    shares = [count // threads + (i < count % threads) for i in range(threads)]
    work = []
    for share in shares:
        instance_id = str(uuid.uuid4())
        work.append([(f"/v1/update/{instance_id}", _payload(instance_id, n)) for n in range(share)])
    latencies: List[List[float]] = [[] for _ in range(threads)]
    failures = [0] * threads

    def run(index: int) -> None:
        failures[index] = _post_all(port, work[index], latencies[index])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    start.wait()
    began, cpu_began = time.monotonic(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(
        {
            "began": began,
            "ended": time.monotonic(),
            "cpu": time.process_time() - cpu_began,
            "latencies": [latency for per_thread in latencies for latency in per_thread],
            "failures": sum(failures),
        }
    )


def run_load(port: int, payloads: int, clients: int, threads: int) -> Dict[str, Any]:
    """Post ``payloads`` 10-key payloads from ``clients`` processes of ``threads`` threads."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(clients + 1)
    results = context.Queue()
    shares = [payloads // clients + (i < payloads % clients) for i in range(clients)]
    processes = [
        context.Process(target=_client_process, args=(port, share, threads, start, results))
        for share in shares
    ]
    for process in processes:
        process.start()
    start.wait()
    reports = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(30)
    latencies = sorted(latency for report in reports for latency in report["latencies"])
    elapsed = max(report["ended"] for report in reports) - min(r["began"] for r in reports)
    return {
        "seconds": elapsed,
        "payloads_per_s": payloads / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "client_cpu_s": sum(report["cpu"] for report in reports),
        "failures": sum(report["failures"] for report in reports),
    }


# -- servers and their CPU time ---------------------------------------------------------------


def _process_tree(pid: int) -> List[int]:
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text()
                pending.extend(int(child) for child in children.split())
        except OSError:
            continue
    return tree


def _cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU time of ``pid`` and its descendants alive now."""
    if pid is None:
        return 0.0
    total = 0
    for member in _process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=600) as answer:
        return json.load(answer)


def _wait_until_up(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(port, "/healthz")
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.05)


def _start_server(db: str, workers: int) -> Tuple[subprocess.Popen[bytes], int]:
    """``python -m server_stub`` for ``workers == 0``, else ``gunicorn -w workers``."""
    port = free_port()
    if workers == 0:
        # One client address posting as fast as it can: no per-address or total limit.
        command = [sys.executable, "-m", "server_stub", "--port", str(port), "--db", db,
                   "--per-address", "0", "--total", "0"]
    else:
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--backlog",
            "1024",
            f"server_stub:create_app(db={db!r}, limits={{'per_address': 0, 'total': 0}})",
        ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_until_up(port, process)
    except BaseException:
        _stop(process)
        raise
    return process, port


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(15)


def _postmaster_pid(cluster: TemporaryPostgres) -> int:
    assert cluster.directory is not None
    return int((cluster.directory / "data" / "postmaster.pid").read_text().split()[0])


def _measure(
    db: str,
    workers: int,
    args: argparse.Namespace,
    postmaster: Optional[int],
) -> Dict[str, Any]:
    process, port = _start_server(db, workers)
    try:
        # Every worker opens its pool and prepares its statements before the clock starts.
        warm_up = str(uuid.uuid4())
        for n in range(_WARM_UP):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/update/{warm_up}",
                data=_payload(warm_up, n),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                answer.read()
        server_cpu, db_cpu = _cpu_seconds(process.pid), _cpu_seconds(postmaster)
        load = run_load(port, args.payloads, args.clients, args.threads)
        server_cpu = _cpu_seconds(process.pid) - server_cpu
        db_cpu = _cpu_seconds(postmaster) - db_cpu
        began = time.perf_counter()
        stored = _get(port, "/v1/stats")["payloads"] - _WARM_UP
        stats_ms = (time.perf_counter() - began) * 1000
    finally:
        _stop(process)
    per_payload = 1000 / args.payloads
    return {
        **load,
        "stored": stored,
        "server_cpu_ms": server_cpu * per_payload,
        "db_cpu_ms": db_cpu * per_payload,
        "client_cpu_ms": load["client_cpu_s"] * per_payload,
        "stats_ms": stats_ms,
    }


_CONFIGURATIONS = (
    # label, backend, gunicorn workers (0: python -m server_stub, one threaded process)
    ("SQLite, python -m server_stub", "sqlite", 0),
    ("SQLite, gunicorn", "sqlite", 4),
    ("PostgreSQL, python -m server_stub", "postgres", 0),
    ("PostgreSQL, gunicorn", "postgres", 1),
    ("PostgreSQL, gunicorn", "postgres", 4),
)


def _fresh_database(backend: str, tmp: Path, cluster: TemporaryPostgres) -> str:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        return str(tmp / f"{name}.db")
    import psycopg  # noqa: PLC0415 - the test extra's, like gunicorn

    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return cluster.url(name)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--payloads", type=int, default=4000, help="per run")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=2, help="threads per client process")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per configuration (interleaved; median shown)"
    )
    parser.add_argument(
        "--fast-commit",
        action="store_true",
        help="PostgreSQL with synchronous_commit=off (commits not flushed one by one)",
    )
    args = parser.parse_args(argv)
    settings = dict(BENCHMARK_SETTINGS)
    if args.fast_commit:
        settings["synchronous_commit"] = "off"
    print(
        f"{args.payloads} payloads per run, {args.clients} client processes x {args.threads}"
        f" threads, {os.cpu_count()} cores, median of {args.repeat} runs (payloads/s range);"
        f" PostgreSQL synchronous_commit={settings.get('synchronous_commit', 'on')}\n"
    )
    runs: List[List[Dict[str, Any]]] = [[] for _ in _CONFIGURATIONS]
    with tempfile.TemporaryDirectory() as tmp, TemporaryPostgres(settings) as cluster:
        postmaster = _postmaster_pid(cluster)
        # Interleaved, so that a burst of other load on the machine hits every configuration.
        for _ in range(args.repeat):
            for index, (_, backend, workers) in enumerate(_CONFIGURATIONS):
                db = _fresh_database(backend, Path(tmp), cluster)
                result = _measure(db, workers, args, postmaster if backend != "sqlite" else None)
                assert result["failures"] == 0, result
                assert result["stored"] == args.payloads, result
                runs[index].append(result)
    print(
        "| backend, server | processes | payloads/s | p50 ms | p99 ms |"
        " server CPU ms/payload | PostgreSQL CPU ms/payload | client CPU ms/payload |"
        " GET /v1/stats ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (label, _, workers), results in zip(_CONFIGURATIONS, runs):
        results.sort(key=lambda result: result["payloads_per_s"])
        median = results[len(results) // 2]
        low, high = results[0]["payloads_per_s"], results[-1]["payloads_per_s"]
        print(
            f"| {label} | {max(workers, 1)} |"
            f" {median['payloads_per_s']:.0f} ({low:.0f}-{high:.0f}) |"
            f" {median['p50_ms']:.1f} | {median['p99_ms']:.1f} |"
            f" {median['server_cpu_ms']:.2f} | {median['db_cpu_ms']:.2f} |"
            f" {median['client_cpu_ms']:.2f} | {median['stats_ms']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
