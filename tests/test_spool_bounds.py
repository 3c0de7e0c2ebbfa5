"""However much the spool holds, the application's thread does not pay for it.

A spool can hold far more than its bounds (20 files / 16 MiB) when other
processes filled it, or files were copied in. ``start_emitting()`` must not
list, read or trim it on the caller's thread, and the spool is brought back
within its bounds, the dropped payloads counted.
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, List

import pytest
from conftest import state_of, wait_for_spool_deletion

import telemetry
from server_stub import Server
from telemetry import _spool
from telemetry._files import list_dir, remove
from telemetry._wire import Payload, encode_payload

MakeClient = Callable[..., telemetry.Client]
SPOOLED = 500  # the benchmark uses 20,000; the test checks where the work happens


def fill_spool(directory: Path, instance_id: str, count: int) -> None:
    """``count`` one-item payloads, oldest first, written as the spool writes them."""
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    for index in range(count):
        when = start + timedelta(seconds=index)
        payload = Payload(instance_id=instance_id, timestamp=when, data={f"k{index}": 1})
        path = directory / f"{payload.payload_id}.json"
        path.write_bytes(encode_payload(payload))
        os.chmod(path, 0o600)
        age = int(when.timestamp()) * 1_000_000_000
        os.utime(path, ns=(age, age))


def test_a_huge_spool_costs_the_caller_nothing_and_is_trimmed_to_its_bounds(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance = uuid.uuid4()
    spool = state_of(tmp_path).spool
    fill_spool(spool.directory, str(instance), SPOOLED)
    listed_on: List[str] = []
    real_list_dir = list_dir

    def recording_list_dir(directory: Path) -> List[str]:
        listed_on.append(threading.current_thread().name)
        return real_list_dir(directory)

    monkeypatch.setattr(_spool, "list_dir", recording_list_dir)
    client = make_client(instance_id=instance)
    client.start_emitting()
    caller = threading.current_thread().name
    on_caller = [name for name in listed_on if name == caller]
    assert on_caller == [], "start_emitting() listed the spool on the caller's thread"
    assert client.flush(timeout=30)
    # The oldest went first: 20 files kept, the 7 oldest of them sent (max_pending
    # is 8, and the first cycle's own payload carries the drop count).
    sent = sorted(key for p in telemetry_server.payloads for key in p["data"])
    assert sent == sorted(f"k{index}" for index in range(SPOOLED - 20, SPOOLED - 13))
    assert telemetry_server.stats()["dropped"] == SPOOLED - 20  # counted, one item each
    assert spool.size().files == 13  # the rest wait for the next start
    assert on_caller == [] and listed_on  # the emitter's thread did it


# -- consent withdrawn: the spool is set aside at once, deleted elsewhere ---------------


@pytest.fixture
def spool_work_on(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The thread of every listing of a spool (or one set aside) and of every file
    deletion in one, from now on."""
    threads: List[str] = []

    def recording_list_dir(directory: Path) -> List[str]:
        if directory.name.startswith("telemetry-spool"):
            threads.append(threading.current_thread().name)
        return list_dir(directory)

    def recording_remove(path: Path, what: str) -> bool:
        if path.parent.name.startswith("telemetry-spool"):
            threads.append(threading.current_thread().name)
        return remove(path, what)

    monkeypatch.setattr(_spool, "list_dir", recording_list_dir)
    monkeypatch.setattr(_spool, "remove", recording_remove)
    return threads


def test_withdrawing_consent_sets_a_huge_spool_aside_and_deletes_it_off_the_callers_thread(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    spool_work_on: List[str],
) -> None:
    instance = uuid.uuid4()
    spool = state_of(tmp_path).spool
    fill_spool(spool.directory, str(instance), SPOOLED)
    client = make_client(instance_id=instance)
    spool_work_on.clear()
    client.set_consent(False)
    caller = threading.current_thread().name
    assert caller not in spool_work_on, "set_consent(False) walked the spool on its thread"
    # Set aside at once, before any file is deleted: no sender can find it any more.
    assert not spool.directory.exists()
    wait_for_spool_deletion()
    assert caller not in spool_work_on
    assert spool_work_on.count("telemetry-spool-delete") > SPOOLED  # every file, elsewhere
    assert os.listdir(spool.directory.parent) == []  # instance id, marker, spool: all gone
    assert telemetry_server.requests == []


def test_do_not_track_still_wins_and_deletes_a_huge_spool_off_the_callers_thread(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, spool_work_on: List[str],
) -> None:
    instance = uuid.uuid4()
    spool = state_of(tmp_path).spool
    fill_spool(spool.directory, str(instance), SPOOLED)
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    client = make_client(instance_id=instance)  # consent=True, outranked
    client.set_consent(True)
    assert client.mode == "off"
    assert threading.current_thread().name not in spool_work_on
    assert not spool.directory.exists()
    client.start_emitting()
    wait_for_spool_deletion()
    assert os.listdir(spool.directory.parent) == []
    assert telemetry_server.requests == []


def test_a_spool_set_aside_by_a_process_that_died_is_never_sent_and_is_deleted(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path
) -> None:
    instance = uuid.uuid4()
    spool = state_of(tmp_path).spool
    # Consent was withdrawn, then the process died before the files were deleted.
    withdrawn = spool.directory.with_name(spool.directory.name + ".withdrawn-99999-0badf00d")
    fill_spool(withdrawn, str(instance), 30)
    client = make_client(instance_id=instance)  # consent given again later
    client.increment("new")
    client.start_emitting()
    assert client.flush(timeout=10)
    assert [p["data"] for p in telemetry_server.payloads] == [{"new": 1}]
    assert not withdrawn.exists()  # the emitter finished deleting it
