"""The command line: ``python -m telemetry [--app NAME] [--state-dir DIR] COMMAND``.

For the person at the machine: see what telemetry does for an app and why,
turn it on, off or to local (dry run), look at what is waiting to be sent,
and start over with a new instance id. It never sends anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Callable, Dict, Optional

from telemetry import _consent
from telemetry._files import UnsafeStateError
from telemetry._state import STATE_DIR_ENV, State
from telemetry._wire import encode_payload

ENDPOINT_ENV = "TELEMETRY_ENDPOINT"
DEFAULT_APP = "telemetry"

_COMMANDS = {
    "status": "show the mode, the rule that decided it, the instance id and where files are",
    "on": "send telemetry for this app",
    "off": "send nothing, and delete the spool, server policy and instance id",
    "local": "collect, but only write payloads to the log instead of sending them (dry run)",
    "show": "print the spooled payloads (the next to be sent) as JSON, without sending",
    "reset-id": "replace this app's instance id with a new random one",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m telemetry",
        description="See and change what telemetry does for an application on this machine.",
        epilog="DO_NOT_TRACK=1, or <APP>_TELEMETRY=off in the environment, turn it off "
        "whatever was saved here.",
    )
    # The options work before or after the command; SUPPRESS keeps the
    # command's parser from overwriting values given before it.
    options = argparse.ArgumentParser(add_help=False)
    for target in (parser, options):
        here = target is parser
        target.add_argument(
            "--app", metavar="NAME", default=DEFAULT_APP if here else argparse.SUPPRESS,
            help=f"the application's name, as it passes to init() (default: {DEFAULT_APP})",
        )
        target.add_argument(
            "--state-dir", metavar="DIR", default=None if here else argparse.SUPPRESS,
            help=f"root of the state files (default: ${STATE_DIR_ENV}, else the platform's "
            "user config and state directories)",
        )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in _COMMANDS.items():
        commands.add_parser(name, parents=[options], help=text, description=text)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (argparse exits with 2 on bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        state = State(args.app, root=args.state_dir)
    except ValueError as exc:
        parser.error(str(exc))
    refusal = state.check()
    if refusal is not None:
        return _refused(state, refusal, args.command)
    try:
        return _HANDLERS[args.command](state)
    except UnsafeStateError as exc:  # a file turned unsafe since ``check()``
        return _refused(state, str(exc), args.command)


def _refused(state: State, reason: str, command: str) -> int:
    """The state files are not this user's alone: say so, touch nothing."""
    print(f"error: refusing the state files of {state.app}: {reason}\n"
          "Someone else could have planted or could change them, so telemetry stays off "
          "for this app until they belong to you alone (directories 0700, files 0600) "
          f"or are removed (config dir {state.config_dir}, state dir {state.state_dir}).",
          file=sys.stderr)
    return 0 if command == "status" else 1


def _decide(state: State) -> _consent.Decision:
    # The application's consent= argument is unknown here: only what it says
    # matters when nothing outranks it (rules 3 and 6).
    return _consent.resolve(
        app=state.app, consent=None, env=os.environ, persisted=state.read_consent()
    )


def _status(state: State) -> int:
    decision = _decide(state)
    why = f"rule {decision.number}: {decision.rule}"
    if decision.number == 7:
        why += "; the application may still opt in with init(consent=True)"
    instance_id = state.read_instance_id()
    saved = state.read_consent()
    files, size = state.spool.size()
    rows = [
        ("app", state.app),
        ("mode", decision.mode),
        ("why", why),
        ("saved choice", saved or "(none)"),
        ("instance id", str(instance_id) if instance_id else "(none yet)"),
        ("endpoint", os.environ.get(ENDPOINT_ENV) or "(set by the application)"),
        ("config dir", str(state.config_dir)),
        ("consent file", str(state.consent_path)),
        ("state dir", str(state.state_dir)),
        ("spool", f"{files} payload{'s' if files != 1 else ''}, {size} bytes in "
                  f"{state.spool.directory}"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        print(f"{label + ':':<{width}}{value}")
    name = _consent.env_var_name(state.app)
    from_env = os.environ.get(name)
    if from_env is not None and _consent.parse_mode(from_env) is None:
        print(f"note: {name}={from_env!r} is not on, off or local, so it is ignored")
    return 0


def _persist(mode: str) -> Callable[[State], int]:
    def persist(state: State) -> int:
        if not state.write_consent(mode):
            print(f"error: could not save the choice in {state.consent_path}", file=sys.stderr)
            return 1
        print(f"telemetry for {state.app} is now {mode} (saved in {state.consent_path})")
        if mode == _consent.OFF:
            files = state.spool.size().files
            if state.delete_all():
                print(f"deleted its instance id, server policy and {files} spooled "
                      f"payload{'s' if files != 1 else ''}")
            else:
                print("error: some of its files could not be deleted (see above)",
                      file=sys.stderr)
                return 1
        decision = _decide(state)
        if decision.mode != mode:
            print(f"note: it stays {decision.mode} here, because of rule {decision.number}: "
                  f"{decision.rule}")
        return 0

    return persist


def _show(state: State) -> int:
    payloads = state.spool.payloads()
    print(json.dumps([json.loads(encode_payload(payload)) for payload in payloads],
                     indent=2, ensure_ascii=False))
    if not payloads:
        print(f"(the spool of {state.app} is empty)", file=sys.stderr)
    return 0


def _reset_id(state: State) -> int:
    if state.read_instance_id() is None:
        decision = _decide(state)
        if decision.mode == _consent.OFF:
            # Nothing but the consent file is written while off.
            print(f"{state.app} has no instance id yet (telemetry is off: {decision.rule}); "
                  "one is made when telemetry first runs")
            return 0
    new = state.reset_instance_id()
    if state.read_instance_id() != new:
        print(f"error: could not save the new instance id in {state.instance_id_path}",
              file=sys.stderr)
        return 1
    print(new)
    return 0


_HANDLERS: Dict[str, Callable[[State], int]] = {
    "status": _status,
    "on": _persist(_consent.ON),
    "off": _persist(_consent.OFF),
    "local": _persist(_consent.LOCAL),
    "show": _show,
    "reset-id": _reset_id,
}

if __name__ == "__main__":
    sys.exit(main())
