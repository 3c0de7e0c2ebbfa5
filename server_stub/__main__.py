"""``python -m server_stub``: serve the collection server until Ctrl-C or SIGTERM.

``python -m server_stub policy show|set FILE|history``: a running server's policy.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType
from typing import List, Optional

from ._access import Access
from ._app import App
from ._backends import open_store
from ._heavy import HeavyLane
from ._http import FrontLimits, FrontServer
from ._limits import Limits
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
    parser.add_argument(
        "--read-token",
        default=os.environ.get("TELEMETRY_READ_TOKEN") or None,
        help="bearer token for reading (default: $TELEMETRY_READ_TOKEN)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("TELEMETRY_ADMIN_TOKEN") or None,
        help="bearer token for reading and changing the policy (default: $TELEMETRY_ADMIN_TOKEN)",
    )
    limits = parser.add_argument_group("limits (see README: Running it in production)")
    limits.add_argument(
        "--max-connections", type=int, default=0, metavar="N",
        help="open connections at once (default: 4096, fewer under a low file limit)",
    )
    limits.add_argument(
        "--max-connections-per-address", type=int, default=64, metavar="N",
        help="open connections from one client address (default: 64)",
    )
    limits.add_argument(
        "--request-timeout", type=float, default=10.0, metavar="SECONDS",
        help="time a client has to send a whole request, or take an answer (default: 10)",
    )
    limits.add_argument(
        "--per-address", type=int, default=Limits.per_address, metavar="N",
        help=f"payloads per client address per minute, 0: no limit (default: {Limits.per_address})",
    )
    limits.add_argument(
        "--total", type=int, default=Limits.total, metavar="N",
        help=f"payloads per minute over all addresses, 0: no limit (default: {Limits.total})",
    )
    limits.add_argument(
        "--max-storage-mb", type=float, default=1024.0, metavar="MB",
        help="database size at which payloads are refused with 507, 0: no limit (default: 1024)",
    )
    limits.add_argument(
        "--workers", type=int, default=FrontLimits.workers, metavar="N",
        help=f"threads running the app (default: {FrontLimits.workers})",
    )
    limits.add_argument(
        "--reuse-port", action="store_true",
        help="let several server processes listen on the same port (Linux: SO_REUSEPORT)",
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["policy"]:
        from ._policy_cli import main as policy_main  # noqa: PLC0415 - only this command needs it

        return policy_main(arguments[1:])
    args = _parse_args(arguments)
    try:
        access = Access(args.read_token, args.admin_token)
    except ValueError as exc:
        print(f"server_stub: {exc}", file=sys.stderr)
        return 2
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
        limits = Limits(
            per_address=args.per_address,
            total=args.total,
            max_storage_bytes=round(args.max_storage_mb * 2**20) or None,
        )
        front_limits = FrontLimits(
            max_connections=args.max_connections,
            max_per_address=args.max_connections_per_address,
            request_timeout=args.request_timeout,
            max_body_bytes=limits.max_body_bytes,
            workers=args.workers,
        )
    except ValueError as exc:
        store.close()
        print(f"server_stub: {exc}", file=sys.stderr)
        return 2
    # The biggest payloads are parsed in a child process (not possible for a private
    # in-memory database, which the child could not see).
    memory = args.db in ("", ":memory:")
    heavy = None if memory else HeavyLane(args.db, args.policy, limits)
    try:
        httpd = FrontServer(
            App(
                store,
                policy,
                limits=limits,
                heavy_lane=heavy.handle if heavy else None,
                heavy_busy=heavy.busy if heavy else None,
                access=access,
            ),
            args.host,
            args.port,
            limits=front_limits,
            reuse_port=args.reuse_port,
        )
    except OSError as exc:
        store.close()
        if heavy is not None:
            heavy.close()
        print(f"server_stub: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    if memory:
        logger.warning("storing payloads in memory only; pass --db FILE to keep them")
    signal.signal(signal.SIGTERM, _terminate)
    print(f"server_stub listening on {httpd.url}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        httpd.close()
        if heavy is not None:
            heavy.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
