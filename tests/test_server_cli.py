"""``python -m server_stub``: serving in a process of its own, and refusing to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import requests
from _server_api import NS, REPO, make_payload


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    command = [sys.executable, "-m", "server_stub", "--port", "0", "--db", str(tmp_path / "t.db")]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("server_stub listening on http://127.0.0.1:"), line
            yield line.split()[-1], process
        finally:
            if process.poll() is None:
                process.kill()


def test_command_line_server(cli_server: tuple[str, subprocess.Popen[str]]) -> None:
    url, process = cli_server
    payload = make_payload(data={"n": 1})

    response = requests.post(f"{url}/v1/update/{payload['instance_id']}", json=payload, timeout=10)
    health = requests.get(f"{url}/healthz", timeout=10)

    assert response.status_code == 200
    assert response.json() == {"next_update": 3600 * NS}
    assert health.json() == {"status": "ok"}
    process.terminate()
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert f"POST /v1/update/{payload['instance_id']}" in stderr
    assert "GET /healthz" in stderr


def test_command_line_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text('{"stop": "yes"}')

    result = subprocess.run(
        [sys.executable, "-m", "server_stub", "--port", "0", "--policy", str(policy_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert "bad policy file" in result.stderr
    assert result.stdout == ""
