"""Raw HTTP over loopback and free ports, for the tests that need bytes on the wire.

``requests`` normalises URLs, headers and bodies; these send exactly what a
test wrote. ``free_port`` is the benchmarks' helper (``benchmarks/_shared.py``),
so that there is one of it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple, Union

from server_stub import Server

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # ``benchmarks`` is not installed: it lives next to ``tests``
    sys.path.insert(0, _ROOT)

from benchmarks._shared import free_port  # noqa: E402

__all__ = ["RawAnswer", "dead_endpoint", "free_port", "raw_exchange", "raw_http"]

Address = Union[Server, Tuple[str, int]]


class RawAnswer(NamedTuple):
    """One HTTP answer, split: status code, headers (names lower-cased), body bytes."""

    status: int
    headers: Dict[str, str]
    body: bytes


def raw_exchange(to: Address, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``request`` as it is on a new connection; everything received until it closes."""
    address = (to.host, to.port) if isinstance(to, Server) else to
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        chunks: List[bytes] = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_http(to: Address, request: bytes, *, timeout: float = 10.0) -> RawAnswer:
    """``raw_exchange`` for a request that gets one answer (send ``Connection: close``)."""
    head, _, body = raw_exchange(to, request, timeout=timeout).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body)


def dead_endpoint() -> str:
    """An endpoint on a loopback port nobody listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"
