"""Healthy clients beside an attack, against ``python -m server_stub`` as run in production.

Run: ``python benchmarks/attack.py [--baseline 5] [--duration 30] [--slow 2000] [--json]``.
Everything is on loopback and bounded in time. The server runs in its own
process with its default limits (the README's production command, on a SQLite
file); the attackers run in another process, so their Python threads do not
slow the healthy clients' measurements.

- Healthy clients: ``--healthy`` threads, each from its own loopback address
  (127.0.0.10, 127.0.0.11, …), each posting a 10-key payload on a new connection
  every ``--interval`` seconds, as a fleet of instances behind different addresses.
- Phase 1, ``--baseline`` seconds: healthy clients alone (the same-run baseline).
- Phase 2, ``--duration`` seconds: healthy clients beside
  - slowloris: ``--slow`` connections that send half a request line and then
    one header byte a second, re-opened whenever the server closes them;
  - gzip bombs: ~10 KB bodies that inflate to 10 MiB of ``[{},{},…]``;
  - heavy payloads: the largest legal payload (1,000,000 JSON values);
  - a fresh-id flood: new instance ids as fast as the flood threads can post.
  Attackers use addresses 127.0.1.x to 127.0.3.x (several per kind).

Reported: healthy p50/p99 latency and error count (any answer but 200, or no
answer) in each phase, what the attack got as answers, the server's peak
resident memory (``VmHWM``), that of its child processes (the largest
payloads) and their total, the CPU the server, its children and the attacker
used during the attack (percent of one core), and the load average. Goals:
healthy p99 ≤ 100 ms and 0 errors during the attack, total peak RSS ≤ 300 MB.
On a machine where the attacker shares the server's cores (and others load
them), compare the attack phase with the baseline phase of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import json
import multiprocessing
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["attack"]

_HOST = "127.0.0.1"


def _payload(instance_id: str, data: Any) -> bytes:
    return json.dumps(
        {
            "instance_id": instance_id,
            "timestamp": "2026-11-23T10:00:00.123456Z",
            "payload_id": uuid.uuid4().hex,
            "data": data,
            "client": {"name": "telemetry-python", "version": "0.1.0", "dropped": 0},
        },
        separators=(",", ":"),
    ).encode()


_HEALTHY_DATA = {f"key_{n}": n for n in range(8)} | {"version": "1.4.2", "os": "linux"}


def _post(
    port: int,
    instance_id: str,
    body: bytes,
    source: str,
    *,
    gzipped: bool = False,
    timeout: float = 10.0,
) -> int:
    """POST on a new connection from ``source``; the status, or 0 for no answer."""
    connection = http.client.HTTPConnection(
        _HOST, port, timeout=timeout, source_address=(source, 0)
    )
    headers = {"Content-Type": "application/json"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    try:
        connection.request("POST", f"/v1/update/{instance_id}", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def _percentile_ms(samples: List[float], fraction: float) -> Optional[float]:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 2)


class _Healthy:
    """Healthy clients on threads; ``phase`` names where their figures go."""

    def __init__(self, port: int, clients: int, interval: float) -> None:
        self.port = port
        self.interval = interval
        self.phase = "baseline"
        self.latencies: Dict[str, List[float]] = {"baseline": [], "attack": []}
        self.statuses: Dict[str, Counter[int]] = {"baseline": Counter(), "attack": Counter()}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(f"127.0.0.{10 + n}",), daemon=True)
            for n in range(clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, source: str) -> None:
        instance_id = str(uuid.uuid4())
        next_at = time.monotonic()
        while not self._stop.is_set():
            phase = self.phase
            started = time.perf_counter()
            status = _post(self.port, instance_id, _payload(instance_id, _HEALTHY_DATA), source)
            elapsed = time.perf_counter() - started
            with self._lock:
                self.latencies[phase].append(elapsed)
                self.statuses[phase][status] += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


# -- the attack, in a process of its own -----------------------------------------------------


def _slowloris(port: int, connections: int, stop: threading.Event, counts: Counter[str]) -> None:
    """Keep ``connections`` half-sent requests open, one header byte a second each."""
    selector = selectors.DefaultSelector()
    open_sockets: Dict[socket.socket, str] = {}

    def open_one(index: int) -> None:
        source = f"127.0.1.{1 + index % 200}"
        try:
            sock = socket.create_connection((_HOST, port), timeout=2, source_address=(source, 0))
            sock.setblocking(False)
            sock.send(b"POST /v1/update/" + str(uuid.uuid4()).encode() + b" HTTP/1.1\r\nX-A: ")
        except OSError:
            counts["slow_connect_failed"] += 1
            return
        open_sockets[sock] = source
        selector.register(sock, selectors.EVENT_READ)
        counts["slow_opened"] += 1

    index = 0
    while len(open_sockets) < connections and not stop.is_set():
        open_one(index)
        index += 1
    next_drip = time.monotonic() + 1.0
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                open_sockets.pop(sock, None)
                sock.close()
                counts["slow_closed_by_server"] += 1
                open_one(index)
                index += 1
        if time.monotonic() >= next_drip:
            next_drip += 1.0
            for sock in list(open_sockets):
                with contextlib.suppress(OSError):
                    sock.send(b"a")
    for sock in open_sockets:
        sock.close()


def _bombs(port: int, stop: threading.Event, counts: Counter[str]) -> None:
    instance_id = str(uuid.uuid4())
    head, tail = _payload(instance_id, {"x": []}).split(b"[]")
    # Just under the 10 MiB a body may inflate to, so that the value count refuses it.
    objects = ((10 << 20) - len(head) - len(tail) - 1) // 3
    document = head + b"[" + b",".join([b"{}"] * objects) + b"]" + tail
    bomb = gzip.compress(document, 9)
    index = 0
    while not stop.is_set():
        status = _post(port, instance_id, bomb, f"127.0.2.{1 + index % 50}", gzipped=True)
        counts[f"bomb_{status}"] += 1
        index += 1


def _heavy(port: int, stop: threading.Event, counts: Counter[str]) -> None:
    """The largest legal payload: 1,000,000 JSON values (500,000 one-member objects)."""
    index = 0
    while not stop.is_set():
        instance_id = str(uuid.uuid4())
        head, tail = _payload(instance_id, {"x": []}).split(b"[]")
        values = 1_000_000 - 20
        document = head + b"[" + b",".join([b'{"a":0}'] * (values // 2)) + b"]" + tail
        status = _post(port, instance_id, gzip.compress(document, 1), f"127.0.2.{100 + index % 50}",
                       gzipped=True, timeout=30)
        counts[f"heavy_{status}"] += 1
        index += 1


def _flood(port: int, stop: threading.Event, counts: Counter[str], thread: int) -> None:
    index = 0
    while not stop.is_set():
        instance_id = str(uuid.uuid4())
        status = _post(port, instance_id, _payload(instance_id, {"n": 1}), f"127.0.3.{1 + thread}")
        counts[f"flood_{status}"] += 1
        index += 1


ATTACKS = ("slow", "bombs", "heavy", "flood")


def _attack_process(
    port: int, seconds: float, slow: int, mix: List[str], results: Any, *, nice: int = 0
) -> None:
    if nice:
        os.nice(nice)  # the attacker's own CPU stands for machines elsewhere
    stop = threading.Event()
    counts: Counter[str] = Counter()
    threads = []
    if "slow" in mix:
        threads += [threading.Thread(target=_slowloris, args=(port, slow, stop, counts))]
    if "bombs" in mix:
        threads += [threading.Thread(target=_bombs, args=(port, stop, counts))]
    if "heavy" in mix:
        threads += [threading.Thread(target=_heavy, args=(port, stop, counts))]
    if "flood" in mix:
        threads += [
            threading.Thread(target=_flood, args=(port, stop, counts, n)) for n in range(2)
        ]
    for thread in threads:
        thread.daemon = True
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(35)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put((dict(counts), usage.ru_utime + usage.ru_stime))


# -- the run ---------------------------------------------------------------------------------


def _start_server(db: str, extra: List[str]) -> Tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "server_stub", "--host", _HOST, "--port", "0", "--db", db, *extra],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"server_stub did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def _children(pid: int) -> List[int]:
    found: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _cpu_seconds(pid: int) -> float:
    """CPU time (user and system) used so far by process ``pid``; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def attack(
    *,
    baseline: float = 5.0,
    duration: float = 30.0,
    slow: int = 2000,
    healthy: int = 8,
    interval: float = 0.2,
    mix: Tuple[str, ...] = ATTACKS,
    server_args: Optional[List[str]] = None,
    attacker_nice: int = 0,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> Dict[str, Any]:
    """Run both phases; the figures as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        process, port = _start_server(os.path.join(tmp, "attack.db"), server_args or [])
        try:
            clients = _Healthy(port, healthy, interval)
            clients.start()
            log(f"attack: baseline, {baseline:.0f} s")
            time.sleep(baseline)  # the phase's length: what the clients do meanwhile is measured
            baseline_rss = _peak_rss_mb(process.pid)
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            attacker = context.Process(
                target=_attack_process,
                args=(port, duration, slow, list(mix), results),
                kwargs={"nice": attacker_nice},
            )
            clients.phase = "attack"
            log(f"attack: attack, {duration:.0f} s")
            load_before = os.getloadavg()[0]
            server_cpu = _cpu_seconds(process.pid)
            children_cpu = sum(_cpu_seconds(child) for child in _children(process.pid))
            started = time.monotonic()
            attacker.start()
            attack_counts, attacker_cpu = results.get(timeout=duration + 120)
            attacker.join(30)
            clients.stop()
            seconds = time.monotonic() - started
            server_cpu = _cpu_seconds(process.pid) - server_cpu
            children = _children(process.pid)
            children_cpu = sum(_cpu_seconds(child) for child in children) - children_cpu
            load_after = os.getloadavg()[0]
            alive = process.poll() is None
            peak_rss = _peak_rss_mb(process.pid)
            children_rss = [_peak_rss_mb(child) or 0.0 for child in children]
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    figures: Dict[str, Any] = {}
    for phase in ("baseline", "attack"):
        statuses = clients.statuses[phase]
        figures[phase] = {
            "requests": sum(statuses.values()),
            "errors": sum(count for status, count in statuses.items() if status != 200),
            "statuses": {str(status): count for status, count in sorted(statuses.items())},
            "p50_ms": _percentile_ms(clients.latencies[phase], 0.50),
            "p99_ms": _percentile_ms(clients.latencies[phase], 0.99),
            "max_ms": _percentile_ms(clients.latencies[phase], 1.0),
            "over_100ms": sum(1 for seconds in clients.latencies[phase] if seconds > 0.1),
        }
    figures["attack_mix"] = list(mix)
    figures["attacker_nice"] = attacker_nice
    figures["attack_answers"] = dict(sorted(attack_counts.items()))
    figures["server_alive"] = alive
    figures["server_peak_rss_mb_before_attack"] = baseline_rss
    figures["server_peak_rss_mb"] = peak_rss
    figures["child_processes_peak_rss_mb"] = children_rss
    figures["total_peak_rss_mb"] = round((peak_rss or 0.0) + sum(children_rss), 1)
    # Share of one core used during the attack phase (the box's other load is not counted).
    figures["cpu_percent_of_a_core"] = {
        "server": round(100 * server_cpu / seconds),
        "server_children": round(100 * children_cpu / seconds),
        "attacker": round(100 * attacker_cpu / seconds),
    }
    figures["load_average_1min"] = {"attack_start": load_before, "attack_end": load_after}
    figures["seconds"] = {"baseline": baseline, "attack": duration}
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", type=float, default=5.0,
                        help="seconds of healthy traffic alone")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of attack")
    parser.add_argument("--slow", type=int, default=2000, help="slowloris connections")
    parser.add_argument("--healthy", type=int, default=8, help="healthy client threads")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between a client's posts")
    parser.add_argument("--mix", default=",".join(ATTACKS),
                        help=f"attacks to run, comma-separated (default: all of {ATTACKS})")
    parser.add_argument("--attacker-nice", type=int, default=0, choices=range(20),
                        metavar="0-19",
                        help="niceness of the attacking process: on one machine, a real "
                             "attacker's CPU is not the server's (default 0: shared equally)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not (0 < args.baseline <= 600 and 0 < args.duration <= 600 and 0 <= args.slow <= 10_000):
        parser.error("need 0 < --baseline, --duration <= 600 and 0 <= --slow <= 10000")
    mix = tuple(name for name in args.mix.split(",") if name)
    if not set(mix) <= set(ATTACKS):
        parser.error(f"--mix takes some of {ATTACKS}")
    result = attack(
        baseline=args.baseline, duration=args.duration, slow=args.slow,
        healthy=args.healthy, interval=args.interval, mix=mix, attacker_nice=args.attacker_nice,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:34} {value}")
    attack_phase = result["attack"]
    ok = (attack_phase["errors"] == 0 and (attack_phase["p99_ms"] or 0) <= 100
          and result["total_peak_rss_mb"] <= 300)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
