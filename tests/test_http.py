"""The HTTP runtime (``server_stub._http``) with raw bytes on the wire: keep-alive,
pipelining, HTTP/1.0 and ``Expect: 100-continue``."""

from __future__ import annotations

import json
import socket

from _net import raw_exchange
from _server_api import make_payload

from server_stub import Server


def _update_request(instance_id: str, body: bytes, *, version: str = "HTTP/1.1") -> bytes:
    head = (
        f"POST /v1/update/{instance_id} {version}\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_keep_alive_serves_pipelined_requests_on_one_connection(backend_server: Server) -> None:
    first, second = make_payload(), make_payload()
    closing = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    answer = raw_exchange(
        backend_server,
        _update_request(first["instance_id"], json.dumps(first).encode())
        + _update_request(second["instance_id"], json.dumps(second).encode())
        + closing,
    )

    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert answer.endswith(b'{"status":"ok"}')
    assert b"Connection: close" in answer
    assert backend_server.stats()["payloads"] == 2


def test_http_1_0_client_gets_its_answer_and_a_closed_connection(backend_server: Server) -> None:
    payload = make_payload()

    answer = raw_exchange(
        backend_server,
        _update_request(payload["instance_id"], json.dumps(payload).encode(), version="HTTP/1.0"),
    )

    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert answer.endswith(b'{"next_update":3600000000000}')


def test_expect_100_continue_is_answered(backend_server: Server) -> None:
    payload = make_payload()
    body = json.dumps(payload).encode()
    head = _update_request(payload["instance_id"], b"").split(b"\r\n\r\n")[0]
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode())

    with socket.create_connection((backend_server.host, backend_server.port), 10) as sock:
        sock.sendall(head + b"\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        answer = sock.recv(65536)

    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
