"""Logging for the library: the ``telemetry`` logger, the error boundary, quiet repeats.

Nothing here raises. ``capture_internal_errors`` is the single place where an
unexpected exception inside telemetry is swallowed, logged and counted; tests
install ``internal_error_hook`` to turn such swallowed errors into failures.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Callable, Dict, List, Optional

logger = logging.getLogger("telemetry")

internal_error_hook: Optional[Callable[[BaseException], None]] = None
"""Called with every swallowed internal error (tests set it; None in production)."""

REPEAT_INTERVAL = 3600.0
"""Identical repeated messages are logged at most once per this many seconds."""


@contextlib.contextmanager
def capture_internal_errors(what: str) -> Iterator[None]:
    """Swallow and log any exception: telemetry never raises into its host."""
    try:
        yield
    except Exception as exc:
        report_internal_error(what, exc)


def report_internal_error(what: str, exc: BaseException) -> None:
    """Log a swallowed internal error and hand it to the test hook."""
    try:
        logger.error("telemetry: internal error in %s (ignored)", what, exc_info=exc)
        hook = internal_error_hook
        if hook is not None:
            hook(exc)
    except Exception:  # noqa: S110 - a failing log handler must not reach the host either
        pass


SERVER_TEXT_LIMIT = 200
"""At most this many characters of text from the server reach the host's log."""


def printable(text: str, limit: int = SERVER_TEXT_LIMIT) -> str:
    """``text`` safe for a log line: control and format characters escaped, capped.

    A server's text must not forge log lines (newlines), drive a terminal (ANSI
    escapes) or reorder what is shown (bidirectional overrides).
    """
    shown: List[str] = []
    length = 0
    for char in text:
        piece = char
        if not char.isprintable():
            code = ord(char)
            piece = (f"\\x{code:02x}" if code < 0x100
                     else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        if length + len(piece) > limit:
            return "".join(shown)[: max(limit - 3, 0)] + "..."
        shown.append(piece)
        length += len(piece)
    return "".join(shown)


class QuietLog:
    """Logs each distinct message once, then at most once per ``interval`` seconds.

    Bounded: it remembers at most ``capacity`` distinct messages, so a stream of
    ever-different messages cannot grow memory; past that they are logged
    under the same rate as one shared message.
    """

    def __init__(
        self,
        interval: float = REPEAT_INTERVAL,
        capacity: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._capacity = capacity
        self._clock = clock
        self._last_logged: Dict[str, float] = {}
        self._lock = threading.Lock()

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log ``message % args`` unless the same message was logged recently."""
        now = self._clock()
        with self._lock:
            key = message
            if key not in self._last_logged and len(self._last_logged) >= self._capacity:
                key = "<overflow>"
            last = self._last_logged.get(key)
            if last is not None and now - last < self._interval:
                return False
            self._last_logged[key] = now
        logger.log(level, message, *args)
        return True

    def forget(self, message: str) -> None:
        """Let ``message`` be logged again at once (e.g. after the failure cleared)."""
        with self._lock:
            self._last_logged.pop(message, None)
