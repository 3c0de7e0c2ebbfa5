"""Demo: a small app emitting real payloads to a real ``server_stub`` on SQLite.

Starts ``python -m server_stub`` on a free loopback port with a policy that
asks for an update every 0.5 s, runs an app that collects with every call
kind from four threads for a few cycles, stops it, and prints what the server
stored (``GET /v1/stats``). Takes a few seconds.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

import telemetry


def start_server(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    policy = workdir / "policy.json"
    policy.write_text(json.dumps({"next_update": 0.5}))
    server = subprocess.Popen(
        [sys.executable, "-m", "server_stub", "--port", "0",
         "--db", str(workdir / "telemetry.db"), "--policy", str(policy)],
        stdout=subprocess.PIPE, text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    url = line.strip().rsplit(" ", 1)[-1]
    if not url.startswith("http://"):
        server.kill()
        raise SystemExit(f"server_stub did not start: {line!r}")
    return server, url


def run_app(url: str, state_dir: Path) -> int:
    telemetry.init(uuid.uuid4(), app="demo", endpoint=url, consent=True,
                   min_interval=0.1, state_dir=state_dir)
    telemetry.set("version", "1.4.2")
    telemetry.set_nested("platform", "python", sys.version.split()[0])
    telemetry.start_emitting()
    calls = 0
    lock = threading.Lock()

    def worker(number: int) -> None:
        nonlocal calls
        deadline = time.monotonic() + 2.0
        done = 0
        while time.monotonic() < deadline:
            telemetry.increment("http_requests")
            telemetry.add("bytes_sent", 512)
            telemetry.append_unique("http_user_agent", telemetry.fast_hash(f"agent-{done % 3}"))
            if done % 5000 == 0:
                telemetry.append("worker_started", number)
            done += 1
        with lock:
            calls += done

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    telemetry.stop_emitting(timeout=5.0)
    return calls


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server, url = start_server(workdir)
        try:
            print(f"server_stub listening on {url} (SQLite at {workdir / 'telemetry.db'})")
            calls = run_app(url, workdir / "state")
            stats = requests.get(f"{url}/v1/stats", timeout=5).json()
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"the app made {calls} increment calls from 4 threads; the server stored:")
    print(json.dumps(stats, indent=2))
    if stats["keys"].get("http_requests") != calls:
        raise SystemExit("MISMATCH: the server's total differs from what was collected")
    print("server totals match what the app collected: OK")


if __name__ == "__main__":
    main()
