"""``Client`` wiring: consent decisions, state files and the emitter together."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, List

import pytest
from conftest import WALL_CLOCK_START, dead_endpoint, update_requests, wait_for_spool_deletion

import telemetry
from server_stub import Server
from telemetry._client import NULL_COLLECTOR
from telemetry._state import STOP_REMEMBERED_FOR, ServerPolicy, State

MakeClient = Callable[..., telemetry.Client]


def files_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("env", "consent", "rule"),
    [
        ({"DO_NOT_TRACK": "1"}, True, 1),
        ({"TESTAPP_TELEMETRY": "off"}, True, 2),
        ({}, False, 3),
        ({"CI": "true"}, True, 4),
        ({}, None, 7),
    ],
)
def test_off_sends_nothing_and_writes_nothing(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], consent: Any, rule: int,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = make_client(consent=consent)
    assert client.status().mode == "off"
    assert client.decision.number == rule
    client.increment("hits")
    client.set("secret", "x")
    client.start_emitting()
    assert client.flush(timeout=0.5) is False
    client.stop_emitting(timeout=0.5)
    assert len(update_requests(telemetry_server)) == 0
    assert files_under(tmp_path / "state") == []


def test_cli_off_beats_consent_true_in_a_later_run(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DO_NOT_TRACK")}
    subprocess.run(
        [sys.executable, "-m", "telemetry", "--app", "testapp", "--state-dir",
         str(tmp_path / "state"), "off"],
        check=True, env=env, capture_output=True, timeout=30,
    )
    client = make_client(consent=True)
    assert client.status().mode == "off"
    assert client.decision.number == 5
    client.increment("hits")
    client.start_emitting()
    assert client.flush(timeout=0.5) is False
    assert len(update_requests(telemetry_server)) == 0


def test_runtime_off_deletes_everything_and_on_starts_empty(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path
) -> None:
    state_root = tmp_path / "state"
    dead = make_client(instance_id=None, endpoint=dead_endpoint())
    dead.increment("spooled")
    dead.start_emitting()
    dead.stop_emitting(timeout=0.5)
    client = make_client(instance_id=None)
    client.increment("before_off")
    on_disk = files_under(state_root)
    assert "testapp/state/telemetry-instance-id" in on_disk
    assert any(name.startswith("testapp/state/telemetry-spool/") for name in on_disk)
    client.set_consent(False)
    assert client.status().mode == "off"
    wait_for_spool_deletion()  # the spool's files go on a background thread
    # Only the consent file remains: no id, no policy, no spool, no marker.
    assert files_under(state_root) == ["testapp/config/telemetry-consent.json"]
    client.increment("while_off")
    client.set_consent(True)
    client.increment("after_on")
    client.start_emitting()
    assert client.flush(timeout=5)
    stats = telemetry_server.stats()
    assert stats["keys"] == {"after_on": 1}  # nothing from before or while off
    assert stats["dropped"] == 0


def test_runtime_off_stops_the_emitter_and_on_resumes_it(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    client = make_client()
    client.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    client.set_consent(False)
    assert not client.status().emitting
    sent = len(update_requests(telemetry_server))
    client.increment("while_off")
    assert client.flush(timeout=0.5) is False
    assert len(update_requests(telemetry_server)) == sent
    client.set_consent(True)  # the app had asked to emit: it resumes
    client.increment("after_on")
    assert client.flush(timeout=5)
    assert telemetry_server.stats()["keys"] == {"after_on": 1}


def test_set_consent_local_logs_instead_of_sending(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(consent=None)
    assert client.mode == "off"
    client.set_consent("local")
    assert client.mode == "local"
    client.increment("hits")
    with caplog.at_level(logging.INFO, logger="telemetry"):
        client.start_emitting()
        assert client.flush(timeout=5)
    assert "[telemetry]" in caplog.text and "hits=1" in caplog.text
    assert len(update_requests(telemetry_server)) == 0


def test_set_consent_rejects_nonsense(make_client: MakeClient) -> None:
    client = make_client()
    with pytest.raises(ValueError, match="consent"):
        client.set_consent("maybe")
    assert client.mode == "on"


def test_init_rejects_an_app_name_unfit_for_a_directory() -> None:
    with pytest.raises(ValueError, match="app"):
        telemetry.Client().init(uuid.uuid4(), app="../etc", consent=True)


def test_status_reports_mode_rule_identity_and_paths(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path
) -> None:
    client = make_client()
    status = client.status()
    assert status.mode == "on"
    assert "consent=" in status.rule
    assert status.instance_id == str(client.instance_id)
    assert status.endpoint == telemetry_server.url
    assert status.state_dir == str(tmp_path / "state" / "testapp" / "state")
    assert not status.emitting
    client.start_emitting()
    assert client.status().emitting


def test_instance_id_is_created_once_and_reused(make_client: MakeClient) -> None:
    first = make_client(instance_id=None)
    second = make_client(instance_id=None)
    assert first.instance_id is not None
    assert first.instance_id == second.instance_id


def test_first_run_notice_is_logged_once(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="telemetry"):
        make_client().start_emitting()
        make_client().start_emitting()
    notices = [r for r in caplog.records if "turn it off" in r.getMessage()]
    assert len(notices) == 1
    assert "python -m telemetry --app testapp off" in notices[0].getMessage()


def test_server_stop_expires_after_thirty_days_with_one_probe(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    telemetry_server.policy.update(stop=True)
    stopped = make_client()
    stopped.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    assert stopped.flush(timeout=1) is False
    quiet = make_client(wall_clock=lambda: WALL_CLOCK_START + STOP_REMEMBERED_FOR - 60)
    quiet.start_emitting()
    assert quiet.flush(timeout=0.5) is False
    assert len(update_requests(telemetry_server)) == 1
    telemetry_server.policy.update(stop=False)
    later = make_client(wall_clock=lambda: WALL_CLOCK_START + STOP_REMEMBERED_FOR + 60)
    later.increment("back")
    later.start_emitting()
    assert later.flush(timeout=5)
    assert telemetry_server.stats()["keys"] == {"back": 1}


def test_server_disabled_keys_survive_a_restart(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    telemetry_server.policy.update(disabled_keys=["tls"])
    first = make_client()
    first.start_emitting()
    assert telemetry_server.wait_for_requests(1)
    first.stop_emitting(timeout=1)  # joins the thread: the response has been applied
    telemetry_server.policy.update(disabled_keys=[])
    second = make_client()
    second.increment("tls:handshakes")
    second.increment("ok")
    payload = second.take_payload()
    assert payload is not None
    assert payload.data == {"ok": 1}
    assert second.status().server_disabled_keys == frozenset({"tls"})


SPOOL_APP = textwrap.dedent(
    """
    import sys, telemetry
    telemetry.init("{instance}", app="spoolapp", endpoint=sys.argv[1], consent=True,
                   state_dir=sys.argv[2])
    telemetry.increment("{key}")
    telemetry.start_emitting()
    print("flushed", telemetry.flush(float(sys.argv[3])), flush=True)
    telemetry.stop_emitting(1.0)
    """
)


def test_spool_hands_over_between_processes_exactly_once(
    telemetry_server: Server, tmp_path: Path
) -> None:
    instance = uuid.uuid4()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DO_NOT_TRACK")}
    state_root = str(tmp_path / "state")

    def run(endpoint: str, key: str, flush_timeout: float) -> str:
        done = subprocess.run(
            [sys.executable, "-c", SPOOL_APP.format(instance=instance, key=key), endpoint,
             state_root, str(flush_timeout)],
            check=True, env=env, capture_output=True, text=True, timeout=60,
        )
        return done.stdout

    # Nothing can be delivered to a dead endpoint: the flush is False at any timeout, and
    # 1 s (not 5) is the real time it costs.
    assert "flushed False" in run(dead_endpoint(), "first", 1.0)
    (spooled,) = State("spoolapp", root=state_root).spool.payloads()
    assert spooled.data == {"first": 1}
    assert "flushed True" in run(telemetry_server.url, "second", 5.0)
    stored = telemetry_server.stored_payloads()
    ids = [p["payload_id"] for p in stored]
    assert ids.count(spooled.payload_id) == 1
    assert telemetry_server.stats()["keys"] == {"first": 1, "second": 1}
    assert State("spoolapp", root=state_root).spool.payloads() == []


def test_a_consent_change_racing_a_server_stop_cannot_undo_it(
    make_client: MakeClient, telemetry_server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threads flip consent while the emitter applies the server's ``stop``.

    The stop's policy write is held open until the flippers had their chance, so
    a consent change that does not wait for the stop interleaves with it every
    time; afterwards the client must still be stopped and collect nothing.
    """
    telemetry_server.script(status=200, body={"stop": True})
    writing_stop = threading.Event()
    release_stop = threading.Event()
    write_policy = State.write_policy

    def held_write_policy(self: State, endpoint: str, policy: ServerPolicy) -> bool:
        if policy.stop_until is not None:
            writing_stop.set()
            release_stop.wait(10)
        return write_policy(self, endpoint, policy)

    monkeypatch.setattr(State, "write_policy", held_write_policy)
    client = make_client()
    client.increment("hits")
    client.start_emitting()
    assert writing_stop.wait(10)  # the emitter thread is applying the stop

    def flip(rounds: int) -> None:
        for index in range(rounds):
            client.set_consent("local" if index % 2 else "on")

    flippers = [threading.Thread(target=flip, args=(6,)) for _ in range(8)]
    for thread in flippers:
        thread.start()
    deadline = time.monotonic() + 1.0  # a chance to finish, for flips that do not wait
    for thread in flippers:
        thread.join(max(0.0, deadline - time.monotonic()))
    release_stop.set()
    for thread in flippers:
        thread.join(10)
    assert not any(thread.is_alive() for thread in flippers)
    assert client.collector is NULL_COLLECTOR
    assert client.status().server_stopped
    policy = State("testapp", root=tmp_path / "state").read_policy(telemetry_server.url)
    assert policy.stopped(WALL_CLOCK_START)
    client.increment("after")
    assert client.take_payload() is None
