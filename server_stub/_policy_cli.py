"""``python -m server_stub policy show|set FILE|history``: the policy over HTTP, without curl.

Talks to a running server (``--url``, default ``http://127.0.0.1:8080``) with
the token from ``--token``, else ``TELEMETRY_ADMIN_TOKEN``, else
``TELEMETRY_READ_TOKEN`` (none: the server must be local and have no token).
``set`` checks the file as the server will before sending it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, List, Optional

from ._policy import PolicyRules

__all__ = ["main"]

_TIMEOUT = 30.0


def _parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server_stub policy",
        description="Show or replace a running server's policy.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    parser.add_argument(
        "--token",
        help="bearer token (default: $TELEMETRY_ADMIN_TOKEN, else $TELEMETRY_READ_TOKEN)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="print the policy in force")
    replace = commands.add_parser("set", help="replace the whole policy with a policy file's")
    replace.add_argument("file", help="a policy JSON file (fields it omits take their defaults)")
    history = commands.add_parser("history", help="print the latest changes, newest first")
    history.add_argument("--limit", type=int, default=20)
    return parser.parse_args(argv)


def _request(args: argparse.Namespace, method: str, path: str, body: Optional[bytes] = None) -> Any:
    token = (
        args.token
        or os.environ.get("TELEMETRY_ADMIN_TOKEN")
        or os.environ.get("TELEMETRY_READ_TOKEN")
    )
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(  # noqa: S310 - the operator's own server URL
        args.url.rstrip("/") + path, data=body, headers=headers, method=method
    )
    with urllib.request.urlopen(request, timeout=_TIMEOUT) as answer:  # noqa: S310
        return json.load(answer)


def main(argv: List[str]) -> int:
    args = _parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        print("server_stub policy: --url must be an http:// or https:// URL", file=sys.stderr)
        return 2
    try:
        if args.command == "show":
            answer = _request(args, "GET", "/v1/policy")
        elif args.command == "history":
            answer = _request(args, "GET", f"/v1/policy/history?limit={max(1, args.limit)}")
        else:
            try:
                with open(args.file, "rb") as policy_file:
                    fields = json.load(policy_file)
                PolicyRules.from_fields(fields)
            except (OSError, ValueError) as exc:
                print(f"server_stub policy: bad policy file {args.file}: {exc}", file=sys.stderr)
                return 2
            answer = _request(args, "PUT", "/v1/policy", json.dumps(fields).encode())
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        print(f"server_stub policy: the server answered {exc.code}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"server_stub policy: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0
