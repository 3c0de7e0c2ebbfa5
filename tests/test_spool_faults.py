"""Process and disk faults: a process killed mid-send, a full or read-only state disk.

Each test drives the real client against the real ``server_stub`` over loopback.
Time is virtual (``make_client`` + ``VirtualTime``) wherever the client waits;
only the server's scripted delays and the client's short ``send_timeout`` are real.
Randomness is seeded.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, List, NoReturn

import pytest
from conftest import dead_endpoint

import telemetry
from server_stub import Server
from telemetry._state import State

MakeClient = Callable[..., telemetry.Client]


# -- process faults: SIGKILL mid-send ----------------------------------------------------------


CHILD_APP = textwrap.dedent(
    """
    import sys, threading, telemetry
    role, instance, endpoint, state_dir = sys.argv[1:5]
    telemetry.init(instance, app="killapp", endpoint=endpoint, consent=True,
                   state_dir=state_dir, send_timeout=30)
    if role == "spool":  # the server is unreachable: everything goes to the spool
        for _ in range(7):
            telemetry.increment("spooled")
        telemetry.append_unique("from", "first")
        telemetry.start_emitting()
        telemetry.stop_emitting(timeout=1.0)
    elif role == "killed":  # claims the spool and sends it; killed while the server holds it
        telemetry.start_emitting()
        threading.Event().wait()
    else:  # "deliver"
        telemetry.start_emitting()
        delivered = telemetry.flush(10)
        telemetry.stop_emitting(timeout=2.0)
        sys.exit(0 if delivered else 3)
    """
)


def run_child(
    role: str, instance: uuid.UUID, endpoint: str, state_dir: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DO_NOT_TRACK")}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_APP, role, str(instance), endpoint, str(state_dir)],
        env=env,
    )


def spool_files(state_dir: Path) -> List[str]:
    spool = state_dir / "killapp" / "state" / "telemetry-spool"
    return sorted(os.listdir(spool)) if spool.exists() else []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize(
    "held", ["stored-before-the-takeover", "stored-after-the-takeover", "dropped"]
)
def test_killed_mid_send_the_spooled_data_is_delivered_exactly_once(
    telemetry_server: Server, tmp_path: Path, held: str
) -> None:
    instance, state_dir = uuid.uuid4(), tmp_path / "state"
    # 1. An app that cannot reach the server stops: its data is handed to the spool.
    first = run_child("spool", instance, dead_endpoint(), state_dir)
    assert first.wait(30) == 0
    (spooled,) = spool_files(state_dir)
    # 2. The next start claims the spool file and sends it; the server holds the
    #    request (and stores it, or drops it, when released); the app is SIGKILLed
    #    meanwhile.
    release = threading.Event()
    telemetry_server.script(hold=release, drop=held == "dropped")
    killed = run_child("killed", instance, telemetry_server.url, state_dir)
    try:
        assert telemetry_server.wait_for(lambda: telemetry_server.scripts_pending == 0, 30)
        assert spool_files(state_dir) == [f"{spooled}.claimed-{killed.pid}"]
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)  # reaped: its pid is dead, not a zombie that still "exists"
    if held != "stored-after-the-takeover":
        release.set()
        assert telemetry_server.wait_for_requests(1, timeout=10)  # answered (or dropped)
    # 3. The next start takes over the dead process's claim and delivers it.
    third = run_child("deliver", instance, telemetry_server.url, state_dir)
    assert third.wait(30) == 0
    release.set()
    # Both sends of the payload have been answered (the held one first, or last).
    assert telemetry_server.wait_for_requests(2, timeout=10)
    held_status = None if held == "dropped" else 200  # None: dropped, unanswered
    assert sorted(r.status or 0 for r in telemetry_server.requests) == sorted(
        [held_status or 0, 200])
    stats = telemetry_server.stats()
    assert stats["keys"] == {"from": [{"value": "first", "count": 1}], "spooled": 7}
    assert stats["payloads"] == 1
    assert spool_files(state_dir) == []
    ids = {r.json["payload_id"] for r in telemetry_server.requests if r.json}
    assert ids == {spooled.removesuffix(".json")}  # one payload_id, sent twice


# -- process faults: a full disk, a read-only state directory -----------------------------------


def break_disk(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Make writes under ``root`` fail as a full disk (ENOSPC: writing data fails) or a
    read-only file system (EROFS: every change fails) would. Tests run as root, which
    chmod cannot stop, so the failure is injected into the ``os`` calls themselves."""
    real_open, real_write, real_close = os.open, os.write, os.close
    full_fds: set[int] = set()
    prefix = str(root)

    def under(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix)

    def refuse(path: Any = "") -> NoReturn:
        raise OSError(code, os.strerror(code), os.fspath(path) if path else None)

    def open_(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and under(path) and code == errno.EROFS:
            refuse(path)
        fd = real_open(path, flags, mode, **kwargs)
        if writing and under(path):
            full_fds.add(fd)
        return fd

    def write(fd: int, data: Any) -> int:
        if fd in full_fds:
            refuse()
        return real_write(fd, data)

    def close(fd: int) -> None:
        full_fds.discard(fd)
        real_close(fd)

    def changing(real: Callable[..., Any]) -> Callable[..., Any]:
        def change(path: Any, *args: Any, **kwargs: Any) -> Any:
            if under(path) and code == errno.EROFS:
                refuse(path)
            return real(path, *args, **kwargs)
        return change

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "close", close)
    for name in ("mkdir", "rename", "replace", "link", "unlink", "chmod", "utime", "rmdir"):
        monkeypatch.setattr(os, name, changing(getattr(os, name)))


DISK_FAULTS = {"disk-full": errno.ENOSPC, "read-only": errno.EROFS}


@pytest.mark.parametrize("code", list(DISK_FAULTS.values()), ids=list(DISK_FAULTS))
def test_a_broken_disk_never_stops_collection_nor_raises(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int,
) -> None:
    state_dir = tmp_path / "state"
    break_disk(monkeypatch, state_dir, code)
    # Writes an instance id, a first-run marker, the server's policy, then the spool.
    telemetry_server.policy.update(disabled_keys=["secret"])
    client = make_client(instance_id=None, state_dir=state_dir)
    assert client.instance_id is not None  # not saved, but used for this whole process
    client.increment("hits")
    client.set("version", "1.4.2")
    client.start_emitting()
    assert client.flush(timeout=5)
    client.increment("hits")
    client.increment("secret")  # disabled by the server, though that was not saved
    assert client.flush(timeout=5)
    assert telemetry_server.stats()["keys"] == {"hits": 2, "version": "1.4.2"}
    # The server goes away: the stop cannot deliver, and cannot spool either.
    telemetry_server.script(drop=True, times=4)
    client.increment("late")
    client.stop_emitting(timeout=2)
    client.increment("after-stop")  # collection still works
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(os.strerror(code) in message and "instance id" in message for message in warnings)
    assert any(os.strerror(code) in message and "spool" in message for message in warnings)
    # It was said "spool full" here, which misled: the disk was broken.
    assert "1 undelivered items could not be kept in the spool" in " ".join(warnings)
    assert "spool full" not in " ".join(warnings)
    assert state_dir.exists() is False or not any(state_dir.rglob("*.json"))
    assert telemetry_server.stats()["keys"] == {"hits": 2, "version": "1.4.2"}


@pytest.mark.parametrize("code", list(DISK_FAULTS.values()), ids=list(DISK_FAULTS))
def test_a_spool_on_a_broken_disk_is_delivered_once_when_it_heals(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, code: int,
) -> None:
    instance, state_dir = uuid.uuid4(), tmp_path / "state"
    offline = make_client(instance_id=instance, endpoint=dead_endpoint(), state_dir=state_dir)
    offline.increment("spooled")
    offline.start_emitting()
    offline.stop_emitting(timeout=0.5)
    with monkeypatch.context() as patch:
        break_disk(patch, state_dir, code)
        # Read-only: the spool file cannot be claimed (renamed), so it stays for later;
        # full: it is claimed and delivered. Either way, new data flows.
        during = make_client(instance_id=instance, state_dir=state_dir)
        during.increment("during")
        during.start_emitting()
        assert during.flush(timeout=5)
        during.stop_emitting(timeout=2)
    after = make_client(instance_id=instance, state_dir=state_dir)
    after.start_emitting()
    after.flush(timeout=5)
    after.stop_emitting(timeout=2)
    assert telemetry_server.stats()["keys"] == {"during": 1, "spooled": 1}
    assert State("testapp", root=state_dir).spool.payloads() == []
