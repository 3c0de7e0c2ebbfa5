"""``Steering``: what the server's answers do to the client, and what is remembered.

The server can disable and re-enable keys and tell the client to stop
(``docs/protocol.md``, "The response"). A stop silences collection at once and is
remembered for 30 days, so restarts stay quiet; disabled keys are remembered
too, per endpoint. Steering runs on the emitter's thread, under the client's
lifecycle lock, so it never interleaves with a consent change.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional

import attrs

from telemetry._buffer import Buffer
from telemetry._events import EventBuffer
from telemetry._log import logger, printable
from telemetry._state import ServerPolicy, State
from telemetry._wire import Response


class ClientSteering:
    """Applies server responses to ``buffer`` and the client; persists them in ``state``.

    ``lock`` is the client's lifecycle lock (a callable returning it, because a
    forked child replaces it); ``silence`` makes the client's collection calls
    no-ops, called under that lock when the server says stop. ``events`` follow
    the disabled keys ``events``, ``events:<type>`` and ``events:<type>:<name>``.
    """

    def __init__(
        self,
        *,
        buffer: Buffer,
        state: Optional[State],
        endpoint: Optional[str],
        wall_clock: Callable[[], float],
        lock: Callable[[], ContextManager[object]],
        silence: Callable[[], None],
        events: Optional[EventBuffer] = None,
    ) -> None:
        self.buffer = buffer
        self.events = events
        self.state = state
        self.endpoint = endpoint
        self.wall_clock = wall_clock
        self._lock = lock
        self._silence = silence
        self.stopped = False
        """The server said stop (now, or within the last 30 days)."""
        self._policy = ServerPolicy()  # what is remembered for the endpoint

    def restore(self) -> None:
        """Take up what the server asked to remember (caller holds the lifecycle lock)."""
        if self.state is None or not self.endpoint:
            return
        policy = self.state.read_policy(self.endpoint)
        self._policy = policy
        self.stopped = policy.stopped(self.wall_clock())
        self.buffer.disable_keys(policy.disabled_keys)
        self._sync_events()

    def rate_limited(self, seconds: float) -> None:
        """A 429 asked not to send for ``seconds``: remembered, so a restart waits too."""
        with self._lock():
            self._remember(attrs.evolve(self._policy, not_before=self.wall_clock() + seconds))

    def resume_after(self) -> float:
        """Seconds that a remembered 429 still asks to wait; 0 when none does."""
        not_before = self._policy.not_before
        return 0.0 if not_before is None else max(0.0, not_before - self.wall_clock())

    def apply(self, response: Response) -> None:
        """Apply one response: log its error, stop, or disable and enable keys."""
        if response.error:
            logger.warning("telemetry server says: %s", printable(response.error))
        with self._lock():
            if response.stop:
                self._stop()
                return
            before = self.buffer.server_disabled_keys
            disable = frozenset(response.disable_keys)
            enable = frozenset(response.enable_keys) - disable
            if enable:
                self.buffer.enable_keys(enable)
            if disable:
                self.buffer.disable_keys(disable)
            after = self.buffer.server_disabled_keys
            if after != before:
                self._sync_events()
                self._remember(attrs.evolve(self._policy, disabled_keys=after))

    def _sync_events(self) -> None:
        """Give the events the disabled keys now in force (the application's and ours)."""
        if self.events is not None:
            self.events.set_disabled_keys(
                self.buffer.app_disabled_keys | self.buffer.server_disabled_keys
            )

    def _stop(self) -> None:
        logger.info("telemetry: the server asked this client to stop sending; stopped")
        self.stopped = True
        self._silence()
        self.buffer.reset()
        if self.events is not None:
            self.events.reset()
        policy = attrs.evolve(self._policy, disabled_keys=self.buffer.server_disabled_keys)
        self._remember(policy.remember_stop(self.wall_clock()))

    def _remember(self, policy: ServerPolicy) -> None:
        self._policy = policy
        if self.state is not None and self.endpoint:
            self.state.write_policy(self.endpoint, policy)
