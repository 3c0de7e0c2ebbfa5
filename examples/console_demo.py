"""Demo: the operator console over a month of a small fleet's real payloads.

Runs ``server_stub`` on 127.0.0.1 (``--port``, default 8080) with an in-memory
database, then has a fleet of ``telemetry`` clients report to it over loopback,
one payload a day for the last 30 days, their wall clocks set back so that
the console's day charts fill in: more instances join over the month, a new
version rolls out, features are counted, events are recorded, one client drops items. Then it
prints the console's address and serves until Ctrl-C. Open it in a browser
on the same machine (no token is configured: loopback clients only).

    python examples/console_demo.py [--port 8080] [--instances 12]

Takes about half a minute to fill.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

import telemetry
from server_stub import create_app
from server_stub._http import make_server

DAY = 86_400.0
DAYS = 30
VERSIONS = ("1.3.2", "1.4.0", "1.4.1")
FEATURES = ("tls", "gzip", "http3", "metrics", "admin-api")


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fill(url: str, instances: int, state_root: Path) -> None:
    rng = random.Random(16)
    now = time.time()
    for number in range(instances):
        joined = rng.randrange(DAYS - 2) if number >= instances // 3 else DAYS - 1
        wall = WallClock(now - joined * DAY)
        client = telemetry.Client()
        client.init(
            uuid.UUID(int=number + 1, version=4),
            app="demoapp",
            endpoint=url,
            consent=True,
            state_dir=state_root / f"client{number}",
            wall_clock=wall,
            max_values_per_key=2 if number == 0 else 10_000,
        )
        client.start_emitting()
        try:
            for day in range(joined, -1, -1):
                if day and rng.random() < 0.15:
                    continue  # not every install runs every day
                wall.now = now - day * DAY
                version = VERSIONS[0] if day > 20 else VERSIONS[1] if day > 8 else VERSIONS[2]
                if rng.random() < 0.2:
                    version = VERSIONS[max(0, VERSIONS.index(version) - 1)]  # slow to update
                client.set("version", version)
                client.set_nested(
                    "platform", "os", rng.choice(("linux", "linux", "macos", "windows"))
                )
                client.add("requests", rng.randrange(50, 500))
                client.add("errors", rng.randrange(0, 5))
                for feature in rng.sample(FEATURES, rng.randrange(1, len(FEATURES))):
                    client.append_unique("features", feature)
                client.record("behavioral", "config_reload", source=rng.choice(("api", "file")))
                if rng.random() < 0.3:
                    client.log("error", "upstream timed out", upstream="10.0.0.7:443")
                client.flush(10.0)
        finally:
            client.stop_emitting()
        print(f"instance {number + 1}/{instances} reported", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--instances", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = create_app()
    httpd = make_server("127.0.0.1", args.port, app, access_log_level=logging.DEBUG)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as state_root:
        fill(httpd.url, args.instances, Path(state_root))
    print(f"console: {httpd.url}/  (Ctrl-C to stop)", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.store.close()


if __name__ == "__main__":
    main()
