"""Ingest throughput of ``server_stub``: 10-key payloads from client threads into a SQLite file.

The server runs as ``python -m server_stub`` in a process of its own, so the
load generator's CPU does not share the server's GIL.

Run: ``python benchmarks/bench_server.py [N_PAYLOADS] [THREADS]``.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import requests

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._shared import percentile

__all__ = ["ingest", "ten_key_payload"]


def ten_key_payload(instance_id: str, n: int) -> Dict[str, Any]:
    """The benchmarks' payload: 10 keys of every kind, a fresh ``payload_id``."""
    return {
        "instance_id": instance_id,
        "timestamp": "2026-11-23T10:00:00.123456Z",
        "payload_id": uuid.uuid4().hex,
        "data": {
            "requests": n,
            "errors": n % 7,
            "bytes_out": n * 1024,
            "version": "1.4.2",
            "os": "linux",
            "tls": True,
            "latency_ms": 12.5,
            "memory": {"heap": 160112, "sys": 12958736},
            "modules": ["http", "tls", "cache"],
            "user_agents": [{"value": "curl", "count": 3}, {"value": "firefox", "count": 1}],
        },
        "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": 0},
    }


@contextlib.contextmanager
def _server_process(db: str, command: Optional[List[str]] = None) -> Iterator[str]:
    """``python -m server_stub`` (or ``command``, given the same arguments) on a free port,
    as in production: its own process."""
    with subprocess.Popen(
        # One client address posting as fast as it can: no per-address or total limit.
        [*(command or [sys.executable, "-m", "server_stub"]), "--port", "0", "--db", db,
         "--per-address", "0", "--total", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"server_stub did not start: {line!r}")
            yield line.strip().rsplit(" ", 1)[-1]
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def ingest(
    n_payloads: int = 5000,
    threads: int = 4,
    db_path: Optional[str] = None,
    command: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Post ``n_payloads`` payloads from ``threads`` threads to ``python -m server_stub``.

    The server runs in its own process on a SQLite file, as it would in
    production; the client threads share this one. Returns payloads/s, request
    latency percentiles (ms), and the CPU time per payload spent by the server
    process and by the clients. Each thread uses its own ``requests.Session``
    (kept-alive connections). ``command`` replaces ``python -m server_stub``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        db = db_path or str(Path(tmp) / "bench.db")
        server_cpu_before = _children_cpu()
        with _server_process(db, command) as url:
            per_thread = [
                n_payloads // threads + (i < n_payloads % threads) for i in range(threads)
            ]
            instances = [str(uuid.uuid4()) for _ in range(threads)]
            bodies = [
                [ten_key_payload(instance_id, n) for n in range(count)]
                for instance_id, count in zip(instances, per_thread)
            ]
            latencies: List[List[float]] = [[] for _ in range(threads)]
            client_cpu: List[float] = [0.0] * threads
            failures: List[int] = [0] * threads
            start = threading.Barrier(threads + 1)

            def client(worker: int) -> None:
                with requests.Session() as session:
                    # Loopback: no proxy to look up in the environment on every request.
                    session.trust_env = False
                    endpoint = f"{url}/v1/update/{instances[worker]}"
                    start.wait()
                    cpu_began = time.thread_time()
                    for body in bodies[worker]:
                        sent = time.perf_counter()
                        response = session.post(endpoint, json=body, timeout=30)
                        latencies[worker].append(time.perf_counter() - sent)
                        failures[worker] += response.status_code != 200
                    client_cpu[worker] = time.thread_time() - cpu_began

            workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            start.wait()
            began = time.perf_counter()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - began
            stats_url = f"{url}/v1/stats?since=2000-01-01"
            stored = requests.get(stats_url, timeout=30).json()["payloads"]
        # The server process has been waited for: its CPU time is now counted.
        server_cpu = _children_cpu() - server_cpu_before
    all_latencies = sorted(latency for per_worker in latencies for latency in per_worker)
    return {
        "payloads": n_payloads,
        "threads": threads,
        "stored": stored,
        "failures": sum(failures),
        "seconds": round(elapsed, 3),
        "payloads_per_s": round(n_payloads / elapsed, 1),
        "p50_ms": round(percentile(all_latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(all_latencies, 0.99) * 1000, 2),
        "server_cpu_ms_per_payload": round(server_cpu / n_payloads * 1000, 3),
        "client_cpu_ms_per_payload": round(sum(client_cpu) / n_payloads * 1000, 3),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    n_payloads = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(ingest(n_payloads, threads))
