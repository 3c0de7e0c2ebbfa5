"""``python -m server_stub``: serve the collection server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import List, Optional

from ._app import App
from ._backends import open_store
from ._http import make_server
from ._policy import Policy
from ._storage import redact_url

logger = logging.getLogger("server_stub")


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server_stub", description="Reference telemetry collection server."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    parser.add_argument(
        "--db",
        default=":memory:",
        help="SQLite database file, or a postgresql:// URL (needs the 'postgres' extra)",
    )
    parser.add_argument("--policy", metavar="FILE", help="policy JSON file (re-read on change)")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        policy = Policy(args.policy)
    except (OSError, ValueError) as exc:
        print(f"server_stub: bad policy file {args.policy}: {exc}", file=sys.stderr)
        return 2
    try:
        store = open_store(args.db)
    except Exception as exc:  # sqlite3, psycopg or a missing driver: all mean "cannot start"
        print(f"server_stub: cannot open database {redact_url(args.db)}: {exc}", file=sys.stderr)
        return 2
    try:
        httpd = make_server(args.host, args.port, App(store, policy))
    except OSError as exc:
        store.close()
        print(f"server_stub: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    if args.db in ("", ":memory:"):
        logger.warning("storing payloads in memory only; pass --db FILE to keep them")
    signal.signal(signal.SIGTERM, _terminate)
    print(f"server_stub listening on {httpd.url}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        httpd.close_connections()
        httpd.server_close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
