"""Small helpers the benchmarks share with each other and with the tests (``tests/_net.py``).

Standard library only and importing nothing of the project, so that anything
may import it: the benchmarks as scripts or as a package, and the tests.
"""

from __future__ import annotations

import socket
from typing import Sequence

__all__ = ["free_port", "percentile"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listened on a moment ago (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank value at ``fraction`` (0.0 to 1.0) of ``sorted_values``; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]
