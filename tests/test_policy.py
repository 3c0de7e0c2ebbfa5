"""The server's policy: response fields, ``stop``, rate limits, the reloaded policy
file and refused policies."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict

import pytest
from _server_api import NS, assert_error, make_payload, post

from server_stub import Policy, Server, serve


def test_policy_fields_in_responses(backend_server: Server) -> None:
    backend_server.policy.update(
        next_update=1.5, disabled_keys=["tls", "http_user_agent"], enabled_keys=["goroutines"]
    )

    response = post(backend_server, make_payload())

    assert response.json() == {
        "next_update": 1_500_000_000,
        "disable_keys": ["http_user_agent", "tls"],
        "enable_keys": ["goroutines"],
    }


def test_policy_stop_for_all(backend_server: Server) -> None:
    backend_server.policy.update(stop=True)

    response = post(backend_server, make_payload())

    assert response.status_code == 200
    assert response.json()["stop"] is True
    assert backend_server.stats()["payloads"] == 1  # what was sent is still kept


def test_policy_stop_for_listed_instances_only(backend_server: Server) -> None:
    stopped, running = str(uuid.uuid4()), str(uuid.uuid4())
    backend_server.policy.update(stop=[stopped.upper()])

    assert post(backend_server, make_payload(stopped)).json()["stop"] is True
    assert "stop" not in post(backend_server, make_payload(running)).json()


def test_rate_limit_answers_429_with_retry_after(backend_server: Server) -> None:
    backend_server.policy.update(rate_limit={"payloads": 3, "window": 60})
    limited, other = str(uuid.uuid4()), str(uuid.uuid4())

    statuses = [post(backend_server, make_payload(limited)).status_code for _ in range(3)]
    refused = post(backend_server, make_payload(limited))

    assert statuses == [200, 200, 200]
    assert_error(refused, 429)
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert refused.json()["next_update"] == retry_after * NS
    assert post(backend_server, make_payload(other)).status_code == 200
    assert backend_server.stats()["payloads"] == 4  # the refused one was not stored
    backend_server.policy.update(rate_limit=None)
    assert post(backend_server, make_payload(limited)).status_code == 200


def _bump_mtime(path: Path) -> None:
    # Rewrites can land within the file system's timestamp granularity: move mtime on
    # explicitly instead of sleeping.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + NS))


def test_policy_file_is_reloaded_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"next_update": 10}))
    with serve(policy=Policy(policy_file)) as server:
        assert post(server, make_payload()).json() == {"next_update": 10 * NS}

        policy_file.write_text(json.dumps({"next_update": 20}))  # same size
        _bump_mtime(policy_file)
        assert post(server, make_payload()).json() == {"next_update": 20 * NS}

        policy_file.write_text("{not json")
        _bump_mtime(policy_file)
        with caplog.at_level(logging.ERROR, logger="server_stub"):
            assert post(server, make_payload()).json() == {"next_update": 20 * NS}
        assert "keeping previous policy" in caplog.text

        policy_file.write_text(json.dumps({"disabled_keys": ["tls"], "stop": True}))
        _bump_mtime(policy_file)
        assert post(server, make_payload()).json() == {
            "next_update": 3600 * NS,
            "disable_keys": ["tls"],
            "stop": True,
        }


@pytest.mark.parametrize(
    "fields",
    [
        {"next_update": -1},
        {"next_update": "60"},
        {"disabled_keys": "tls"},
        {"stop": "yes"},
        {"rate_limit": {"payloads": 0, "window": 60}},
        {"rate_limit": {"payloads": 3}},
        {"disable_keys": ["tls"]},
    ],
)
def test_invalid_policy_is_refused(fields: Dict[str, Any], tmp_path: Path) -> None:
    policy = Policy(next_update=5)
    with pytest.raises(ValueError, match=r"\S"):
        policy.update(**fields)
    assert policy.current().next_update == 5
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"\S"):
        Policy(policy_file)
