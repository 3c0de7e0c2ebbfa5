"""Helpers for the console tests: a server with tokens, and a small fleet of real clients.

The fleet is several ``telemetry`` clients, each sending real payloads to the
server over loopback, their wall clocks set to the last few days so that the
day charts have several bars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests

import telemetry
from server_stub import Policy, create_app
from server_stub._http import make_server

READ_TOKEN = "read-token-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"
HOSTILE_KEY = "<img src=x onerror=alert(1)>"
HOSTILE_TEXT = "</script><script>alert(2)</script>"
DAY = 86_400.0


@dataclass
class RunningServer:
    url: str
    app: Any
    policy: Policy

    def api(self, path: str, token: Optional[str] = READ_TOKEN, **params: Any) -> Any:
        """``GET {path}`` on the JSON API with a bearer token, parsed."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = requests.get(f"{self.url}{path}", params=params, headers=headers, timeout=10)
        answer.raise_for_status()
        return answer.json()


@contextlib.contextmanager
def running_server(
    *, read_token: Optional[str] = READ_TOKEN, admin_token: Optional[str] = ADMIN_TOKEN
) -> Iterator[RunningServer]:
    """``create_app(read_token=, admin_token=)`` on 127.0.0.1 and a free port, on a thread."""
    policy = Policy()
    app = create_app(policy=policy, read_token=read_token, admin_token=admin_token)
    httpd = make_server("127.0.0.1", 0, app, access_log_level=logging.DEBUG)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield RunningServer(httpd.url, app, policy)
    finally:
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join(5)
        app.store.close()


@dataclass
class Fleet:
    """What the clients sent: their ids and how many payloads."""

    instance_ids: List[str] = field(default_factory=list)
    payloads: int = 0
    days: int = 0
    dropped: int = 0


def send_fleet(url: str, state_root: Path, *, instances: int = 3, days: int = 4) -> Fleet:
    """Have ``instances`` clients report once a day for the last ``days`` days (today last).

    Instance ``i`` adds ``i + 1`` to ``requests`` each day, sets ``version``,
    counts ``features`` and, for the first one, the hostile key and an event
    whose attribute holds ``</script>``.
    """
    fleet = Fleet(days=days)
    now = time.time()
    for number in range(instances):
        wall = _WallClock(now - (days - 1) * DAY)
        client = telemetry.Client()
        client.init(
            uuid.UUID(int=number + 1, version=4),
            app="consoletest",
            endpoint=url,
            consent=True,
            state_dir=state_root / f"client{number}",
            wall_clock=wall,
            min_interval=1.0,
            max_values_per_key=1 if number == 2 else 10_000,  # this one drops a value a day
        )
        client.start_emitting()
        try:
            for day in range(days - 1, -1, -1):
                wall.now = now - day * DAY
                client.add("requests", number + 1)
                client.set("version", f"1.{number % 2}")
                client.append_unique("features", "tls")
                if number % 2 == 0:
                    client.append_unique("features", "gzip")
                    fleet.dropped += number == 2
                if number == 0:
                    client.increment(HOSTILE_KEY)
                    client.record("behavioral", "click", note=HOSTILE_TEXT, day=day)
                assert client.flush(10.0), "the server did not take a payload"
                fleet.payloads += 1
        finally:
            client.stop_emitting()
        fleet.instance_ids.append(str(client.instance_id))
    return fleet


class _WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def clean_client_environment() -> Iterator[None]:
    """Telemetry's off switches (CI, DO_NOT_TRACK, *_TELEMETRY) removed, for module fixtures
    (the autouse fixture that does this per test runs after them)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in list(os.environ):
            if name in ("CI", "DO_NOT_TRACK") or name.endswith("_TELEMETRY"):
                monkeypatch.delenv(name)
        yield


def expected_bars(stats: Dict[str, Any]) -> int:
    """How many keys the overview's top-keys chart ranks (counters and counting sets)."""
    return sum(1 for value in stats["keys"].values() if isinstance(value, (int, list)))
