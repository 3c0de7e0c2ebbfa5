"""Group commit: the writes of many concurrent requests, committed in one transaction.

A durable commit waits for the disk (an fsync), whatever it holds. When many
requests arrive at once, each committing alone queues them behind one fsync
each; committing them together costs one. ``GroupCommit.submit`` queues one
item and returns only once the transaction holding it has committed, so a
request is answered after its data is on disk, exactly as before.

There is no writer thread: a request that finds no batch being written
becomes the writer, takes everything queued (up to ``max_batch``), writes it
with ``write_batch`` and wakes each submitter of the batch; then it hands the
writing to the first request still queued, if any. Requests that arrive while
a batch is being written queue up and form the next batch, so a lone request
is written at once and a busy server writes large batches.
This module imports nothing else from the package: the stores use it.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Generic, List, Optional, Sequence, TypeVar

__all__ = ["GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")

_process = [os.getpid()]
"""This process's id, kept current across forks: ``os.getpid()`` is a system call."""


def _forked() -> None:
    _process[0] = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _Entry(Generic[Item, Result]):
    __slots__ = ("done", "error", "item", "result", "wake", "woken")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.done = False
        self.result: Optional[Result] = None
        self.error: Optional[BaseException] = None
        # Held until its submitter may go on: its batch is written, or it is to write.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.woken = False

    def wake_up(self) -> None:
        if not self.woken:
            self.woken = True
            self.wake.release()


class GroupCommit(Generic[Item, Result]):
    """Calls ``write_batch(items)`` for many submitters' items at once.

    ``write_batch`` must write all of its items in one transaction and return
    one result per item, in order; when it raises, nothing of the batch was
    written. A failed batch of several items is then written again one item per
    call, so that one bad item (e.g. one the database refuses) fails only its
    own submitter, with the exception ``write_batch`` raised for it.
    """

    def __init__(
        self, write_batch: Callable[[Sequence[Item]], Sequence[Result]], *, max_batch: int = 256
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._write_batch = write_batch
        self.max_batch = max_batch
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._queue: List[_Entry[Item, Result]] = []
        self._writing = False

    def submit(self, item: Item) -> Result:
        """Write ``item`` with whatever else is queued; return its result once committed.

        Raises what ``write_batch`` raised for this item. A waiting submitter is
        woken once, by its own lock: when its batch is written, or when the
        writer before it hands it the writing.
        """
        if self._pid != _process[0]:
            # A fork copied the parent's state, perhaps mid-batch: this process
            # starts with an empty queue and a lock nobody holds.
            self._reset()
        entry: _Entry[Item, Result] = _Entry(item)
        with self._lock:
            self._queue.append(entry)
            leads = not self._writing
            self._writing = True
        if not leads:
            entry.wake.acquire()
        if not entry.done:  # this thread writes, until its own item is written
            try:
                while not entry.done:
                    with self._lock:
                        batch = self._queue[: self.max_batch]
                        del self._queue[: self.max_batch]
                    self._write(batch)
            finally:
                with self._lock:
                    if self._queue:
                        self._queue[0].wake_up()  # the next writer (not done: it will write)
                    else:
                        self._writing = False
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _write(self, batch: List[_Entry[Item, Result]]) -> None:
        """Write ``batch``, marking every entry done with its result or its error."""
        try:
            results = self._write_batch([entry.item for entry in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"write_batch returned {len(results)} results for {len(batch)} items"
                )
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].done = True
                batch[0].wake_up()
                return
            for entry in batch:  # find out which item it was: each alone
                self._write([entry])
            return
        except BaseException:
            for entry in batch:  # e.g. KeyboardInterrupt: the leader re-raises it
                entry.error = RuntimeError("the batch was interrupted before it committed")
                entry.done = True
                entry.wake_up()
            raise
        for entry, result in zip(batch, results):
            entry.result = result
            entry.done = True
            entry.wake_up()
