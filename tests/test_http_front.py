"""The production HTTP runtime (``python -m server_stub``) against slow and greedy clients.

Slow clients here are real sockets on loopback that send part of a request and
stop, or drip it; every wait is on the socket (``select``) and bounded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, List

import pytest
import requests

from server_stub import App, Policy, create_app, open_store
from server_stub._app import Response
from server_stub._heavy import HeavyLane
from server_stub._http import FrontLimits, FrontServer
from server_stub._limits import Limits

REPO = Path(__file__).resolve().parents[1]


def payload_body(instance_id: str) -> bytes:
    return json.dumps(
        {
            "instance_id": instance_id,
            "timestamp": "2026-11-23T10:00:00Z",
            "payload_id": uuid.uuid4().hex,
            "data": {"n": 1},
        }
    ).encode()


def slow_connection(host: str, port: int, *, source: str = "127.0.0.1") -> socket.socket:
    """A connection that sends the start of a request and then nothing more."""
    sock = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
    sock.sendall(b"POST /v1/update/" + str(uuid.uuid4()).encode() + b" HTTP/1.1\r\nHost: x\r\n")
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent before closing ``sock`` within ``timeout``; raises if it did not."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open; it sent {received!r}")


def healthy_post(url: str, *, source: str = "127.0.0.1") -> int:
    instance_id = str(uuid.uuid4())
    session = requests.Session()
    session.mount("http://", _SourceAdapter(source))
    response = session.post(
        f"{url}/v1/update/{instance_id}",
        data=payload_body(instance_id),
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    return response.status_code


class _SourceAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._source, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture
def front() -> Iterator[FrontServer]:
    limits = FrontLimits(max_connections=8, max_per_address=6, request_timeout=0.5)
    with FrontServer(create_app(), limits=limits, access_log_level=10).start() as server:
        yield server


def test_slowloris_cannot_stop_the_command_line_server(tmp_path: Path) -> None:
    """With 64 file descriptors, 100 slow connections took the threaded server down."""

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    command = [sys.executable, "-m", "server_stub", "--port", "0", "--db", str(tmp_path / "t.db")]
    with subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=low_file_limit,  # noqa: PLW1509 - only sets a limit
    ) as process, ExitStack() as sockets:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().split()[-1]
            host, port = url.removeprefix("http://").rsplit(":", 1)
            slow: List[socket.socket] = []
            for _ in range(100):
                try:
                    slow.append(sockets.enter_context(slow_connection(host, int(port))))
                except OSError:
                    break  # the old server stopped accepting; the next step says so

            assert healthy_post(url) == 200
            assert healthy_post(url, source="127.0.0.2") == 200
            assert len(slow) == 100
        finally:
            process.kill()


def test_a_request_must_arrive_whole_within_the_deadline(front: FrontServer) -> None:
    """Dripping a byte at a time keeps a per-read timeout happy; the total deadline is not."""
    instance_id = str(uuid.uuid4())
    body = payload_body(instance_id)
    with socket.create_connection((front.host, front.port), timeout=5) as sock:
        sock.sendall(
            f"POST /v1/update/{instance_id} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        answer = b""
        for byte in body[:60]:  # at most 3 s of dripping, 6x the deadline
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                answer = closed_by_server(sock, 5.0)
                break
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert healthy_post(front.url) == 200


def test_slow_headers_are_cut_at_the_deadline(front: FrontServer) -> None:
    with slow_connection(front.host, front.port) as sock:
        assert closed_by_server(sock, 5.0) == b""


def test_connections_waiting_for_their_head_hold_no_task(front: FrontServer) -> None:
    """A slow client costs the front a buffer and a timer: no task per connection."""
    assert front._loop is not None

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    def count() -> int:
        assert front._loop is not None
        return asyncio.run_coroutine_threadsafe(tasks(), front._loop).result(5)

    idle = count()
    with ExitStack() as stack:
        for n in range(2, 8):
            sock = stack.enter_context(
                slow_connection(front.host, front.port, source=f"127.0.0.{n}")
            )
            sock.sendall(b"X-Drip: a")  # a byte more of the head: still no task
        assert healthy_post(front.url) == 200
        assert front.open_connections >= 6
        assert count() == idle


def test_at_the_connection_cap_the_longest_waiting_connection_goes(front: FrontServer) -> None:
    with ExitStack() as stack:
        slow = [
            stack.enter_context(slow_connection(front.host, front.port, source=f"127.0.0.{n}"))
            for n in range(2, 10)
        ]
        assert healthy_post(front.url) == 200
        # The oldest slow connection made room for the healthy one.
        assert closed_by_server(slow[0], 1.0) == b""
        assert front.open_connections <= 8


def test_one_address_cannot_hold_more_than_its_share(front: FrontServer) -> None:
    with ExitStack() as stack:
        slow = [stack.enter_context(slow_connection(front.host, front.port)) for _ in range(10)]
        assert healthy_post(front.url, source="127.0.0.2") == 200
        for sock in slow[:4]:
            assert closed_by_server(sock, 1.0) == b""


def test_large_bodies_share_a_buffer_budget() -> None:
    limits = FrontLimits(max_buffered_bytes=150_000, request_timeout=5.0)
    with FrontServer(create_app(), limits=limits).start() as server, ExitStack() as stack:
        answers = []
        for _ in range(2):
            sock = stack.enter_context(socket.create_connection((server.host, server.port)))
            sock.sendall(
                f"POST /v1/update/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode()
            )
            readable, _, _ = select.select([sock], [], [], 0.5)
            answers.append(closed_by_server(sock, 1.0) if readable else b"")
        assert answers[0] == b""  # still waiting for its body
        assert answers[1].startswith(b"HTTP/1.1 503 "), answers[1]
        assert healthy_post(server.url) == 200


def test_keep_alive_chunked_head_and_errors(front: FrontServer) -> None:
    session = requests.Session()
    instance_id = str(uuid.uuid4())
    for _ in range(3):
        response = session.post(
            f"{front.url}/v1/update/{instance_id}",
            data=payload_body(instance_id),
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        assert response.status_code == 200
    body = payload_body(instance_id)
    chunked = session.post(
        f"{front.url}/v1/update/{instance_id}",
        data=iter([body[:10], body[10:]]),
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    head = session.head(f"{front.url}/healthz", timeout=5)
    wrong = session.delete(f"{front.url}/healthz", timeout=5)
    stats = session.get(f"{front.url}/v1/stats", timeout=5).json()

    assert chunked.status_code == 200
    assert head.status_code == 200 and head.content == b""
    assert wrong.status_code == 405
    assert stats["payloads"] == 4


def test_oversized_headers_and_bodies_are_refused(front: FrontServer) -> None:
    with socket.create_connection((front.host, front.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n")
        assert closed_by_server(sock, 5.0).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection((front.host, front.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/update/x HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000\r\n\r\n"
        )
        assert closed_by_server(sock, 5.0).startswith(b"HTTP/1.1 413 ")


def test_several_processes_share_a_port_with_reuse_port(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "server_stub", "--reuse-port", "--db", str(tmp_path / "t.db")]
    with subprocess.Popen(
        [*command, "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    ) as first:
        try:
            assert first.stdout is not None
            url = first.stdout.readline().split()[-1]
            port = url.rsplit(":", 1)[1]
            with subprocess.Popen(
                [*command, "--port", port], cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True,
            ) as second:
                try:
                    assert second.stdout is not None
                    assert second.stdout.readline().split()[-1] == url
                    assert all(healthy_post(url) == 200 for _ in range(4))
                finally:
                    second.kill()
        finally:
            first.kill()


def test_a_big_payload_is_refused_at_once_while_the_child_process_is_busy(tmp_path: Path) -> None:
    """Found to be one for the child process, it is not decompressed further (503, retry)."""
    db = str(tmp_path / "t.db")
    busy = [True]
    handed: List[int] = []

    def lane(body: bytes, encoding: str, instance_id: str, address: str) -> Response:
        handed.append(len(body))  # what the child process would get, as sent
        return Response(200, {})

    app = App(open_store(db), Policy(), heavy_lane=lane, heavy_busy=lambda: busy[0],
              heavy_values=1000)
    instance_id = str(uuid.uuid4())
    big = json.loads(payload_body(instance_id))
    big["data"] = {"list": list(range(50_000))}
    body = gzip.compress(json.dumps(big).encode())
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    try:
        with FrontServer(app).start() as server:
            url = f"{server.url}/v1/update/{instance_id}"
            refused = requests.post(url, data=body, headers=headers, timeout=10)
            busy[0] = False
            taken = requests.post(url, data=body, headers=headers, timeout=10)
    finally:
        app.store.close()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert taken.status_code == 200
    assert handed == [len(body)]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_biggest_payloads_are_stored_by_a_child_process(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    db = str(tmp_path / "t.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    lane = HeavyLane(db, None, Limits())
    app = App(open_store(db), Policy(), heavy_lane=lane.handle, heavy_values=1000)
    try:
        with FrontServer(app).start() as server:
            instance_id = str(uuid.uuid4())
            big = json.loads(payload_body(instance_id))
            big["data"] = {"list": list(range(300_000)), "n": 7}  # 2 MB, over the 1 MiB sent
            bad = json.loads(payload_body(instance_id))
            bad["data"] = {"list": list(range(5000)), "n": 2**64}
            answers = [
                requests.post(
                    f"{server.url}/v1/update/{instance_id}",
                    data=gzip.compress(json.dumps(payload).encode()),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                    timeout=30,
                )
                for payload in (big, bad)
            ]
            stats = requests.get(f"{server.url}/v1/stats", timeout=5).json()
            child = lane._process
            assert child is not None and child.pid is not None
            # Below the serving process: where they share a CPU, small requests go first.
            niceness = os.getpriority(os.PRIO_PROCESS, child.pid)
            assert niceness > os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        lane.close()
        app.store.close()

    assert [answer.status_code for answer in answers] == [200, 400]
    assert "64 bits" in answers[1].json()["error"]
    assert stats["keys"] == {"list": list(range(300_000)), "n": 7}
    assert child is not None and child.pid != os.getpid() and not child.is_alive()
