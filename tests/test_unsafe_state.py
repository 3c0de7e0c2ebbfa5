"""State files someone else could have planted are refused: telemetry stays off for the run.

The tests run as root, so "someone else" is simulated with ``os.chown`` to
another uid; mode bits are checked as well.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict

import pytest
from conftest import encoded, update_requests

import telemetry
from server_stub import Server
from telemetry._state import State
from telemetry._wire import Payload, encode_payload

MakeClient = Callable[..., telemetry.Client]
OTHER_UID = 12345
PLANTED_ID = uuid.UUID("0badc0de-0000-4000-8000-000000000001")

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners and modes")


def plant(root: Path, app: str = "testapp") -> Dict[str, Path]:
    """A state tree as telemetry writes it, plus an instance id and a spooled payload."""
    state = State(app, root=root)
    assert state.write_consent("on")
    state.reset_instance_id()
    state.instance_id_path.write_text(f"{PLANTED_ID}\n")
    payload = Payload(instance_id=str(PLANTED_ID), timestamp=datetime.now(timezone.utc),
                      data={"planted": 1})
    assert state.spool.save(encoded([payload])) == 0
    return {
        "config dir": state.config_dir,
        "state dir": state.state_dir,
        "consent file": state.consent_path,
        "instance id file": state.instance_id_path,
        "spool dir": state.spool.directory,
    }


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def make_symlink(path: Path) -> None:
    elsewhere = path.with_name("elsewhere")
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


def make_directory(path: Path) -> None:
    path.unlink()
    path.mkdir(mode=0o700)


FAULTS: Dict[str, Callable[[Dict[str, Path]], None]] = {
    "state dir writable by others": lambda p: p["state dir"].chmod(0o777),
    "config dir writable by group": lambda p: p["config dir"].chmod(0o770),
    "state dir owned by another user": lambda p: os.chown(p["state dir"], OTHER_UID, -1),
    "spool dir owned by another user": lambda p: os.chown(p["spool dir"], OTHER_UID, -1),
    "instance id owned by another user": lambda p: os.chown(p["instance id file"], OTHER_UID, -1),
    "consent file writable by others": lambda p: p["consent file"].chmod(0o606),
    "consent file is a symlink": lambda p: make_symlink(p["consent file"]),
    "instance id is a FIFO": lambda p: make_fifo(p["instance id file"]),
    "consent file is a directory": lambda p: make_directory(p["consent file"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_state_others_could_plant_is_refused_and_telemetry_stays_off(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, fault: str,
) -> None:
    paths = plant(tmp_path / "state")
    FAULTS[fault](paths)
    spooled_before = sorted(os.listdir(paths["spool dir"]))
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        client = make_client(instance_id=None)
        client.increment("hits")
        client.start_emitting()
        client.set_consent(True)  # the app cannot talk it round either: off for this run
        assert client.flush(timeout=1) is False
    assert client.mode == "off"
    assert "unsafe state files" in client.status().rule
    assert client.instance_id != PLANTED_ID
    refusals = [r for r in caplog.records if "refusing the state files" in r.getMessage()]
    assert len(refusals) == 1
    assert str(tmp_path) in refusals[0].getMessage()
    assert update_requests(telemetry_server) == []
    # Nothing there was touched: not deleted, not rewritten.
    assert sorted(os.listdir(paths["spool dir"])) == spooled_before


def test_state_it_wrote_itself_is_used(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plant(tmp_path / "state")
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        client = make_client(instance_id=None)
        client.start_emitting()
        assert client.flush(timeout=5)
    assert "refusing" not in caplog.text
    assert client.instance_id == PLANTED_ID
    assert [p["data"] for p in telemetry_server.payloads] == [{"planted": 1}]


def test_a_foreign_spool_file_is_not_sent(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = State("testapp", root=tmp_path / "state")
    mine = Payload(instance_id=str(PLANTED_ID), timestamp=datetime.now(timezone.utc),
                   data={"mine": 1})
    assert state.spool.save(encoded([mine])) == 0
    foreign = state.spool.directory / f"{uuid.uuid4().hex}.json"
    foreign.write_bytes(encode_payload(Payload(
        instance_id=str(uuid.uuid4()), timestamp=datetime.now(timezone.utc),
        data={"foreign": 1})))
    os.chown(foreign, OTHER_UID, -1)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        client = make_client()
        client.start_emitting()
        assert client.flush(timeout=5)
    assert [p["data"] for p in telemetry_server.payloads] == [{"mine": 1}]
    assert "refusing the spool file" in caplog.text


HANG_PROBE = textwrap.dedent(
    """
    import logging, sys, telemetry
    logging.basicConfig(level=logging.WARNING)
    telemetry.init(app="fifoapp", consent=True, state_dir=sys.argv[1])
    print(telemetry.status().mode)
    """
)


def test_a_fifo_as_the_consent_file_never_hangs_init_nor_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "fifo-state"
    paths = plant(root, app="fifoapp")
    make_fifo(paths["consent file"])  # opening it to read would block until a writer comes
    env = {**os.environ, "TELEMETRY_STATE_DIR": str(root)}
    init = subprocess.run([sys.executable, "-c", HANG_PROBE, str(root)], env=env, check=False,
                          capture_output=True, text=True, timeout=20)
    assert init.returncode == 0, init.stderr
    assert init.stdout.strip() == "off"
    assert "is not a regular file" in init.stderr
    for command in ("status", "show", "on"):
        cli = subprocess.run([sys.executable, "-m", "telemetry", "--app", "fifoapp", command],
                             check=False, env=env, capture_output=True, text=True, timeout=20)
        assert "refusing the state files" in cli.stderr, (command, cli.stderr)
        assert cli.returncode == (0 if command == "status" else 1)
    assert paths["consent file"].is_fifo()  # "on" did not replace it


def test_the_cli_still_works_on_state_it_wrote(tmp_path: Path) -> None:
    root = tmp_path / "cli-state"
    plant(root, app="cliapp")
    env = {**os.environ, "TELEMETRY_STATE_DIR": str(root)}
    shown = subprocess.run([sys.executable, "-m", "telemetry", "--app", "cliapp", "show"],
                           check=False, env=env, capture_output=True, text=True, timeout=20)
    assert shown.returncode == 0, shown.stderr
    assert [p["data"] for p in json.loads(shown.stdout)] == [{"planted": 1}]
