"""The command line, run as a subprocess: ``python -m telemetry``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import encoded

from telemetry import _consent
from telemetry._state import ServerPolicy, State
from telemetry._wire import JSONValue, Payload

APP = "my-app"
ENDPOINT = "https://telemetry.example"
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def run(
    root: Path, *args: str, env: Optional[Dict[str, str]] = None, app: Optional[str] = APP
) -> subprocess.CompletedProcess[str]:
    """``python -m telemetry --state-dir root [--app APP] args...``."""
    options = ["--state-dir", str(root)] + (["--app", app] if app is not None else [])
    return subprocess.run(
        [sys.executable, "-m", "telemetry", *options, *args],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, **(env or {})},
    )


def ok(root: Path, *args: str, env: Optional[Dict[str, str]] = None) -> str:
    done = run(root, *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(root: Path, env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    fields = {}
    for line in ok(root, "status", env=env).splitlines():
        label, _, value = line.partition(":")
        fields[label] = value.strip()
    return fields


def payload(seconds: int, **data: JSONValue) -> Payload:
    return Payload(instance_id=str(uuid.uuid4()), timestamp=T0 + timedelta(seconds=seconds),
                   data=data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cli-state"


@pytest.fixture
def state(root: Path) -> State:
    return State(APP, root)


def test_status_of_a_fresh_app(root: Path, state: State) -> None:
    fields = status(root)
    assert fields["app"] == APP
    assert fields["mode"] == "off"
    assert fields["why"].startswith("rule 7: no consent was given")
    assert "consent=True" in fields["why"]
    assert fields["saved choice"] == "(none)"
    assert fields["instance id"] == "(none yet)"
    assert fields["endpoint"] == "(set by the application)"
    assert fields["config dir"] == str(state.config_dir)
    assert fields["consent file"] == str(state.consent_path)
    assert fields["state dir"] == str(state.state_dir)
    assert fields["spool"] == f"0 payloads, 0 bytes in {state.spool.directory}"
    assert not root.exists()  # looking creates nothing, not even an instance id


def test_status_shows_id_endpoint_and_spool(root: Path, state: State) -> None:
    state.write_consent("on")
    instance_id = state.instance_id()
    state.spool.save(encoded([payload(1, hits=3), payload(2)]))
    size = state.spool.size().size
    fields = status(root, env={"TELEMETRY_ENDPOINT": ENDPOINT})
    assert fields["mode"] == "on"
    assert fields["why"] == "rule 5: the choice saved with set_consent() or the CLI"
    assert fields["instance id"] == str(instance_id)
    assert fields["endpoint"] == ENDPOINT
    assert fields["spool"] == f"2 payloads, {size} bytes in {state.spool.directory}"


@pytest.mark.parametrize(("env", "mode", "rule"), [
    ({"DO_NOT_TRACK": "1"}, "off", 1),
    ({"MY_APP_TELEMETRY": "local"}, "local", 2),
    ({"CI": "true"}, "off", 4),
])
def test_status_tells_which_rule_decided(
    root: Path, env: Dict[str, str], mode: str, rule: int
) -> None:
    ok(root, "on")
    fields = status(root, env=env)
    assert fields["mode"] == mode
    assert fields["why"].startswith(f"rule {rule}: ")


def test_status_points_out_an_ignored_variable(root: Path) -> None:
    out = ok(root, "status", env={"MY_APP_TELEMETRY": "yes"})
    assert "note: MY_APP_TELEMETRY='yes' is not on, off or local, so it is ignored" in out


@pytest.mark.parametrize("mode", ["on", "off", "local"])
def test_choices_persist_and_status_reflects_them(root: Path, state: State, mode: str) -> None:
    out = ok(root, mode)
    assert f"telemetry for {APP} is now {mode}" in out
    assert str(state.consent_path) in out
    assert state.read_consent() == mode
    fields = status(root)
    assert fields["mode"] == mode
    assert fields["saved choice"] == mode
    assert fields["why"].startswith("rule 5: ")


def test_choice_that_the_environment_overrides_says_so(root: Path, state: State) -> None:
    out = ok(root, "on", env={"DO_NOT_TRACK": "1"})
    assert state.read_consent() == "on"
    assert "note: it stays off here, because of rule 1: DO_NOT_TRACK is set" in out


def test_off_deletes_spool_policy_and_id(root: Path, state: State) -> None:
    ok(root, "on")
    state.instance_id()
    state.write_policy(ENDPOINT, ServerPolicy(frozenset({"tls"})))
    state.spool.save(encoded([payload(1, hits=1), payload(2, hits=2)]))
    assert state.first_run_notice_due()
    out = ok(root, "off")
    assert "deleted its instance id, server policy and 2 spooled payloads" in out
    assert list(state.state_dir.iterdir()) == []
    assert [p.name for p in root.rglob("*") if p.is_file()] == [state.consent_path.name]
    assert status(root)["instance id"] == "(none yet)"


def test_off_beats_consent_true_in_a_later_run(root: Path) -> None:
    ok(root, "off")
    persisted = State(APP, root).read_consent()
    decision = _consent.resolve(app=APP, consent="on", env={}, persisted=persisted)
    assert decision == _consent.Decision("off", "the choice saved with set_consent() or the CLI", 5)


def test_show_prints_spooled_payloads_without_sending(root: Path, state: State) -> None:
    first, second = payload(1, hits=3, agents=[{"value": "curl", "count": 2}]), payload(2)
    state.spool.save(encoded([second, first]))
    done = run(root, "show")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert [item["payload_id"] for item in shown] == [first.payload_id, second.payload_id]
    assert shown[0]["data"] == {"hits": 3, "agents": [{"value": "curl", "count": 2}]}
    assert shown[0]["timestamp"] == "2026-11-23T10:00:01.000000Z"
    assert shown[0]["instance_id"] == first.instance_id
    assert "\n  " in done.stdout  # pretty
    assert sorted(p.name for p in state.spool.directory.iterdir()) == sorted(
        f"{p.payload_id}.json" for p in (first, second))  # nothing was claimed


def test_show_with_an_empty_spool(root: Path) -> None:
    done = run(root, "show")
    assert done.returncode == 0
    assert json.loads(done.stdout) == []
    assert "empty" in done.stderr


def test_reset_id_changes_the_id(root: Path, state: State) -> None:
    ok(root, "on")
    old = state.instance_id()
    new = uuid.UUID(ok(root, "reset-id").strip())
    assert new != old
    assert state.read_instance_id() == new
    assert status(root)["instance id"] == str(new)


def test_reset_id_while_off_creates_nothing(root: Path) -> None:
    out = ok(root, "reset-id")
    assert "no instance id yet" in out
    assert not root.exists()


def test_options_also_after_the_command(root: Path, state: State) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "telemetry", "local", "--app", APP, "--state-dir", str(root)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert state.read_consent() == "local"


def test_default_app_and_state_dir_from_the_environment(tmp_path: Path) -> None:
    # conftest sets TELEMETRY_STATE_DIR; the default app is "telemetry".
    done = subprocess.run([sys.executable, "-m", "telemetry", "on"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert State("telemetry").read_consent() == "on"
    assert str(tmp_path / "state" / "telemetry" / "config") in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["status", "extra"], "unrecognized arguments: extra"),
    (["--frobnicate", "status"], "unrecognized arguments: --frobnicate"),
    (["--app", "../escape", "status"], "app must be usable as a directory name"),
    (["--app", "", "status"], "app must be a non-empty name"),
])
def test_bad_usage_exits_2_with_a_message(root: Path, args: List[str], message: str) -> None:
    done = run(root, *args, app=None)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.startswith("usage: python -m telemetry")
    assert done.stdout == ""


def test_help_lists_every_command(root: Path) -> None:
    out = ok(root, "--help")
    for command in ("status", "on", "off", "local", "show", "reset-id"):
        assert command in out


def test_unwritable_state_fails_with_a_clear_message(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run(blocker, "on")
    assert done.returncode == 1
    assert "error: could not save the choice" in done.stderr
    assert "WARNING: telemetry: could not save the consent file" in done.stderr


def test_the_cli_never_imports_the_network(root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys; from telemetry.__main__ import main; "
         f"main(['--state-dir', {str(root)!r}, 'status']); main(['--state-dir', {str(root)!r}, "
         "'show']); print('requests' in sys.modules, 'platformdirs' in sys.modules)"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"
