"""GroupCommit: concurrent submitters share one write, each gets its own result or error."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, List, Sequence

import pytest

from server_stub._group_commit import GroupCommit


class _Batches:
    """A ``write_batch`` that records each batch; the first one can be held until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: List[List[str]] = []
        self.first_entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: Sequence[str]) -> List[str]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.first_entered.set()
            assert self.release.wait(10)
        if any(item.startswith("bad") for item in items):
            raise ValueError(f"refused {sorted(i for i in items if i.startswith('bad'))}")
        return [item.upper() for item in items]


class _QueueWatch(list):  # type: ignore[type-arg]
    """Stands in for the queue: sets ``reached`` once ``target`` entries wait in it."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.reached = threading.Event()

    def append(self, entry: Any) -> None:
        super().append(entry)
        if len(self) >= self.target:
            self.reached.set()


def _submit_while_first_is_held(
    commits: GroupCommit[str, str], writes: _Batches, items: List[str]
) -> dict[str, Any]:
    """Submit ``items[0]``; once it is being written, the rest; then let everything go."""
    outcomes: dict[str, Any] = {}

    def submit(item: str) -> None:
        try:
            outcomes[item] = commits.submit(item)
        except Exception as exc:  # the test looks at what each submitter got
            outcomes[item] = exc

    first = threading.Thread(target=submit, args=(items[0],))
    first.start()
    assert writes.first_entered.wait(10)
    watch = _QueueWatch(len(items) - 1)
    commits._queue = watch  # observe the queue instead of sleeping
    others = [threading.Thread(target=submit, args=(item,)) for item in items[1:]]
    for thread in others:
        thread.start()
    assert watch.reached.wait(10)
    writes.release.set()
    for thread in [first, *others]:
        thread.join(10)
        assert not thread.is_alive()
    return outcomes


def test_a_lone_submit_is_written_at_once_as_a_batch_of_one() -> None:
    writes = _Batches()
    commits = GroupCommit(writes)
    assert commits.submit("a") == "A"
    assert commits.submit("b") == "B"
    assert writes.batches == [["a"], ["b"]]


def test_submits_arriving_during_a_write_are_written_together_next() -> None:
    writes = _Batches(hold_first=True)
    commits = GroupCommit(writes)
    items = ["first"] + [f"item{n}" for n in range(6)]
    outcomes = _submit_while_first_is_held(commits, writes, items)
    assert outcomes == {item: item.upper() for item in items}
    assert writes.batches[0] == ["first"]
    assert sorted(writes.batches[1]) == sorted(items[1:])  # one batch for all six
    assert len(writes.batches) == 2


def test_a_batch_holds_at_most_max_batch_items() -> None:
    writes = _Batches(hold_first=True)
    commits = GroupCommit(writes, max_batch=3)
    items = ["first"] + [f"item{n}" for n in range(7)]
    outcomes = _submit_while_first_is_held(commits, writes, items)
    assert outcomes == {item: item.upper() for item in items}
    assert [len(batch) for batch in writes.batches] == [1, 3, 3, 1]


def test_one_bad_item_fails_only_its_own_submitter() -> None:
    writes = _Batches(hold_first=True)
    commits = GroupCommit(writes)
    items = ["first", "good1", "bad", "good2"]
    outcomes = _submit_while_first_is_held(commits, writes, items)
    assert outcomes["first"] == "FIRST"
    assert outcomes["good1"] == "GOOD1"
    assert outcomes["good2"] == "GOOD2"
    assert isinstance(outcomes["bad"], ValueError)
    assert str(outcomes["bad"]) == "refused ['bad']"
    # The failed batch of three, then each of its items alone.
    assert sorted(writes.batches[1]) == ["bad", "good1", "good2"]
    assert sorted(map(tuple, writes.batches[2:])) == [("bad",), ("good1",), ("good2",)]


def test_a_write_that_returns_the_wrong_number_of_results_is_an_error() -> None:
    commits: GroupCommit[str, str] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        commits.submit("a")


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(list, max_batch=0)


def test_after_a_fork_the_child_starts_with_an_empty_queue_and_a_free_lock() -> None:
    writes = _Batches()
    commits = GroupCommit(writes)
    commits._lock.acquire()  # as if a thread held it when the parent forked
    commits._pid = -1  # as if this process were the fork's child
    assert commits.submit("a") == "A"
    assert writes.batches == [["a"]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_real_fork_is_noticed_and_the_child_starts_afresh() -> None:
    writes = _Batches()
    commits = GroupCommit(writes)
    assert commits.submit("a") == "A"
    commits._lock.acquire()  # held by a thread of the parent at the fork
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports by its exit status only
        ok = False
        try:
            signal.alarm(10)  # a child that missed the fork would wait on the lock forever
            ok = commits.submit("b") == "B" and writes.batches[-1] == ["b"]
        finally:
            os._exit(0 if ok else 1)
    commits._lock.release()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
