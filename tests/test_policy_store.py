"""The policy kept in the store: GET/PUT /v1/policy, every worker, the file, history, the CLI."""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import requests

from server_stub import Policy, Server, create_app, serve
from server_stub.__main__ import main
from server_stub._http import make_server

NS = 1_000_000_000
DEFAULTS = {
    "next_update": 3600,
    "disabled_keys": [],
    "enabled_keys": [],
    "stop": False,
    "rate_limit": None,
}


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def shared_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database two servers can share: a SQLite file, or a PostgreSQL schema."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return str(tmp_path / "telemetry.db")


def update(server: Server, instance_id: str = "") -> Dict[str, Any]:
    instance_id = instance_id or str(uuid.uuid4())
    body = {"instance_id": instance_id, "timestamp": "2026-11-23T10:00:00Z", "data": {"n": 1}}
    answer = requests.post(f"{server.url}/v1/update/{instance_id}", json=body, timeout=10)
    assert answer.status_code == 200
    result: Dict[str, Any] = answer.json()
    return result


def put(server: Server, policy: Any, **kwargs: Any) -> requests.Response:
    return requests.put(f"{server.url}/v1/policy", json=policy, timeout=10, **kwargs)


def history(server: Server) -> List[Dict[str, Any]]:
    answer = requests.get(f"{server.url}/v1/policy/history", timeout=10)
    assert answer.status_code == 200
    changes: List[Dict[str, Any]] = answer.json()["changes"]
    return changes


def test_put_replaces_the_whole_policy_and_the_next_update_answer_follows(shared_db: str) -> None:
    with serve(port=0, db=shared_db) as server:
        assert requests.get(f"{server.url}/v1/policy", timeout=10).json() == DEFAULTS
        answer = put(server, {"next_update": 60, "disabled_keys": ["tls", "ip"]})
        assert answer.status_code == 200
        expected = {**DEFAULTS, "next_update": 60, "disabled_keys": ["ip", "tls"]}
        assert answer.json() == expected
        assert requests.get(f"{server.url}/v1/policy", timeout=10).json() == expected
        assert update(server) == {"next_update": 60 * NS, "disable_keys": ["ip", "tls"]}

        # A PUT is the whole policy: what it omits goes back to its default.
        assert put(server, {"stop": True}).status_code == 200
        assert update(server) == {"next_update": 3600 * NS, "stop": True}
        stopped = str(uuid.uuid4())
        policy = {"stop": [stopped], "rate_limit": {"payloads": 5, "window": 60}}
        assert put(server, policy).json() == {**DEFAULTS, **policy}
        assert update(server, stopped) == {"next_update": 3600 * NS, "stop": True}
        assert update(server) == {"next_update": 3600 * NS}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"disable_keys": ["tls"]}, "unknown policy field(s): disable_keys"),
        ({"next_update": "soon"}, "next_update must be a number"),
        ({"next_update": -1}, "next_update must be between"),
        ({"stop": "yes"}, "stop must be true, false or a list"),
        ({"rate_limit": {"payloads": 0, "window": 1}}, "rate_limit.payloads must be"),
        ([1, 2], "a policy is a JSON object"),
    ],
)
def test_an_invalid_policy_is_400_saying_what_is_wrong_and_changes_nothing(
    body: Any, message: str
) -> None:
    with serve(port=0) as server:
        assert put(server, {"next_update": 7}).status_code == 200
        answer = put(server, body)
        assert answer.status_code == 400
        assert message in answer.json()["error"]
        assert requests.get(f"{server.url}/v1/policy", timeout=10).json()["next_update"] == 7
        assert len(history(server)) == 1


def test_a_body_that_is_not_json_is_refused() -> None:
    with serve(port=0) as server:
        not_json = requests.put(
            f"{server.url}/v1/policy",
            data=b"{",
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert not_json.status_code == 400
        wrong_type = requests.put(f"{server.url}/v1/policy", data=b"{}", timeout=10)
        assert wrong_type.status_code == 415
        assert requests.delete(f"{server.url}/v1/policy", timeout=10).status_code == 405


def test_another_worker_applies_a_change_within_one_second(shared_db: str) -> None:
    clock = Clock()
    with (
        serve(port=0, db=shared_db) as first,
        serve(port=0, db=shared_db, policy=Policy(clock=clock)) as second,
    ):
        assert update(second) == {"next_update": 3600 * NS}
        assert put(first, {"next_update": 5, "stop": True}).status_code == 200
        clock.now += 0.5  # within the second, the other worker may still answer as before
        assert update(second) == {"next_update": 3600 * NS}
        clock.now += 0.5
        assert update(second) == {"next_update": 5 * NS, "stop": True}
        assert requests.get(f"{second.url}/v1/policy", timeout=10).json()["stop"] is True


def test_the_file_seeds_an_empty_store_and_its_changes_are_applied_once(
    shared_db: str, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"next_update": 30}))
    with serve(port=0, db=shared_db, policy=Policy(policy_file)) as first:
        assert update(first)["next_update"] == 30 * NS
        assert put(first, {"next_update": 40}).status_code == 200
        # A second worker started with the same file: the store has a policy already.
        with serve(port=0, db=shared_db, policy=Policy(policy_file)) as second:
            assert update(second)["next_update"] == 40 * NS
            # The file changes on disk: one more change, recorded once for both workers.
            policy_file.write_text(json.dumps({"next_update": 50, "disabled_keys": ["tls"]}))
            os.utime(policy_file, ns=(1, 1))
            assert update(second) == {"next_update": 50 * NS, "disable_keys": ["tls"]}
            assert update(first) == {"next_update": 50 * NS, "disable_keys": ["tls"]}
            first.policy.update(stop=True)  # in-process, as tests and embedders do
            changes = history(second)
    assert [(change["source"], change["changed"]) for change in changes] == [
        ("api", ["stop"]),
        ("file", ["next_update", "disabled_keys"]),
        ("http", ["next_update"]),
        ("file", ["next_update"]),
    ]
    assert changes[1]["policy"] == {**DEFAULTS, "next_update": 50, "disabled_keys": ["tls"]}
    assert all(change["time"].endswith("Z") for change in changes)
    assert changes[0]["time"] >= changes[-1]["time"]


def test_history_is_newest_first_and_limited() -> None:
    with serve(port=0) as server:
        for seconds in range(1, 6):
            assert put(server, {"next_update": seconds}).status_code == 200
        answer = requests.get(f"{server.url}/v1/policy/history?limit=2", timeout=10).json()
    assert [change["policy"]["next_update"] for change in answer["changes"]] == [5, 4]
    assert all(change["source"] == "http" for change in answer["changes"])


# -- python -m server_stub policy ------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    with serve(port=0) as running:
        yield running


def test_cli_shows_sets_and_lists_the_policy(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"disabled_keys": ["tls"], "next_update": 120}))
    assert main(["policy", "--url", server.url, "set", str(policy_file)]) == 0
    assert json.loads(capsys.readouterr().out)["disabled_keys"] == ["tls"]
    assert update(server) == {"next_update": 120 * NS, "disable_keys": ["tls"]}
    assert main(["policy", "--url", server.url, "show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {**DEFAULTS, "disabled_keys": ["tls"], "next_update": 120}
    assert main(["policy", "--url", server.url, "history"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"][0]["source"] == "http"


def test_cli_refuses_a_bad_file_before_sending_it(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"disable_keys": ["tls"]}))
    assert main(["policy", "--url", server.url, "set", str(policy_file)]) == 2
    assert "unknown policy field(s): disable_keys" in capsys.readouterr().err
    assert history(server) == []


def test_cli_sends_the_admin_token_and_reports_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(read_token="r", admin_token="a")
    httpd = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert main(["policy", "--url", httpd.url, "show"]) == 1
        assert "401" in capsys.readouterr().err
        monkeypatch.setenv("TELEMETRY_READ_TOKEN", "r")
        assert main(["policy", "--url", httpd.url, "show"]) == 0
        capsys.readouterr()
        policy_file = tmp_path / "policy.json"
        policy_file.write_text("{}")
        assert main(["policy", "--url", httpd.url, "set", str(policy_file)]) == 1
        assert "403" in capsys.readouterr().err
        monkeypatch.setenv("TELEMETRY_ADMIN_TOKEN", "a")
        assert main(["policy", "--url", httpd.url, "set", str(policy_file)]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
        app.store.close()


def test_cli_says_when_the_server_cannot_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert main(["policy", "--url", f"http://127.0.0.1:{port}", "show"]) == 1
    assert "cannot reach" in capsys.readouterr().err
