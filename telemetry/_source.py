"""``BufferSource``: the buffer and the events as the emitter sees them, a source of payloads.

It owns what turns a buffer snapshot and the buffered events into a
``Payload``: the instance id, the wall clock for the payload's timestamp, and
the conversion to the wire's shapes (which runs in the emitter's thread, off
every lock).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable, Optional

from telemetry._buffer import Buffer, member_value
from telemetry._events import EventBuffer
from telemetry._wire import Payload, wire_data


class BufferSource:
    """Takes payloads out of ``buffer`` and ``events``; none while ``instance_id`` is None
    (off, stopped)."""

    def __init__(
        self, buffer: Buffer, wall_clock: Callable[[], float], events: Optional[EventBuffer] = None
    ) -> None:
        self.buffer = buffer
        self.events = events if events is not None else EventBuffer(wall_clock=wall_clock)
        self.wall_clock = wall_clock
        self.instance_id: Optional[str] = None
        """Set by the client while it collects; None makes ``take`` return None."""

    def take(self, now: Optional[datetime] = None) -> Optional[Payload]:
        """Take the whole buffer out (O(1) under its lock) as a new ``Payload``."""
        instance_id = self.instance_id
        if instance_id is None:
            return None
        snapshot = self.buffer.take()
        events = self.events.take()
        return Payload(
            instance_id=instance_id,
            timestamp=now or datetime.fromtimestamp(self.wall_clock(), timezone.utc),
            data=wire_data(snapshot.plain_tables, snapshot.counting_sets, member_value),
            dropped=snapshot.dropped + events.rejected,
            items=snapshot.items + len(events.events),
            events=events.events,
            dropped_events=events.dropped_events,
        )

    def has_data(self) -> bool:
        return self.buffer.has_data() or self.events.has_events()

    def count_dropped(self, items: int) -> None:
        self.buffer.count_dropped(items)
