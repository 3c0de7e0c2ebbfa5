"""Files kept on disk for one app: consent, instance id, server policy; and its spool.

Where: ``root/<app>/config`` and ``root/<app>/state`` when a root is given
(argument, then ``TELEMETRY_STATE_DIR``), else platformdirs'
``user_config_dir(app)`` (consent) and ``user_state_dir(app)`` (the rest).
Those may be the application's own directories (on macOS and Windows they
are even the same one), so every name here starts with ``telemetry-`` and
nothing else in them is ever touched.

How: directories are created only when something is written, 0700; files
0600; every write is atomic (``_files``), so a crash leaves the old file or
the new one, never a mix. A missing file is the default; an empty,
truncated or garbage one is the default plus a warning, and the next save
rewrites it. Disk problems (read-only, full, permissions) are logged on the
``telemetry`` logger and never raised: only misuse raises ``ValueError``.

Consent: nothing but the consent file may be written while telemetry is
off. Reading never writes; the methods that do write (``instance_id``,
``write_policy``, ``first_run_notice_due``, the spool's ``save`` and
``claim``) are for a client whose mode is on or local.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import FrozenSet, Optional, Tuple, Union

import attrs

from telemetry._consent import MODES, parse_mode
from telemetry._files import (
    TEMPORARY,
    atomic_write,
    check_paths,
    list_dir,
    read,
    remove,
    remove_dead_temporaries,
    warn,
    warn_corrupt,
)
from telemetry._spool import DEFAULT_MAX_SPOOL_BYTES, DEFAULT_MAX_SPOOL_FILES, Spool

logger = logging.getLogger("telemetry")

STATE_DIR_ENV = "TELEMETRY_STATE_DIR"
"""Environment variable that overrides the root of all state (tests, containers)."""

STOP_REMEMBERED_FOR = 30 * 86400
"""Seconds a server's ``stop`` is remembered across restarts (``docs/protocol.md``)."""

_CONSENT_FILE = "telemetry-consent.json"
_INSTANCE_ID_FILE = "telemetry-instance-id"
_FIRST_RUN_FILE = "telemetry-first-run-notice"
_POLICY_PREFIX = "telemetry-policy-"
_SPOOL_DIR = "telemetry-spool"

PathArgument = Union[str, "os.PathLike[str]"]


# -- value types ----------------------------------------------------------------


def _optional_finite(
    instance: object, attribute: attrs.Attribute[Optional[float]], value: Optional[float]
) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and math.isfinite(value)):
        raise ValueError(
            f"{attribute.name} must be a finite number of epoch seconds, not {value!r}"
        )


def _frozen_keys(keys: Iterable[str]) -> FrozenSet[str]:
    return frozenset(keys)


@attrs.frozen
class ServerPolicy:
    """What the server told this client to remember, for one endpoint."""

    disabled_keys: FrozenSet[str] = attrs.field(default=frozenset(), converter=_frozen_keys)
    stop_until: Optional[float] = attrs.field(default=None, validator=_optional_finite)
    """Epoch seconds until which the server's ``stop`` holds; None: no stop."""
    not_before: Optional[float] = attrs.field(default=None, validator=_optional_finite)
    """Epoch seconds before which the server asked not to send again (a 429); None: none."""

    def stopped(self, now: float) -> bool:
        """Whether a remembered ``stop`` still holds at ``now`` (epoch seconds)."""
        return self.stop_until is not None and now < self.stop_until

    def remember_stop(self, now: float) -> ServerPolicy:
        """This policy with a ``stop`` received at ``now``, held for ``STOP_REMEMBERED_FOR``."""
        return attrs.evolve(self, stop_until=now + STOP_REMEMBERED_FOR)


# -- the state of one app ------------------------------------------------------------


def _check_app(app: str) -> str:
    if not isinstance(app, str) or not app.strip():
        raise ValueError(f"app must be a non-empty name, not {app!r}")
    if app in (".", "..") or any(char in app for char in "/\\\0"):
        raise ValueError(f"app must be usable as a directory name, not {app!r}")
    return app


class State:
    """The files of one app. Cheap to construct: nothing is read or created until used.

    Safe to use from several threads and processes at once: every change is
    one atomic rename. ``spool`` holds the undelivered payloads.
    """

    def __init__(
        self,
        app: str,
        root: Optional[PathArgument] = None,
        *,
        max_spool_files: int = DEFAULT_MAX_SPOOL_FILES,
        max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
    ) -> None:
        """Raises ``ValueError`` for an app name unfit for a directory or a bound below 1."""
        self.app = _check_app(app)
        if root is None:
            root = os.environ.get(STATE_DIR_ENV) or None
        if root is not None:
            base = Path(root).expanduser() / app
            self._config_dir, self._state_dir = base / "config", base / "state"
        else:
            import platformdirs  # noqa: PLC0415 - `import telemetry` stays light

            self._config_dir = Path(platformdirs.user_config_dir(app))
            self._state_dir = Path(platformdirs.user_state_dir(app))
        self.spool = Spool(
            self._state_dir / _SPOOL_DIR, max_files=max_spool_files, max_bytes=max_spool_bytes
        )
        """The undelivered payloads, in ``<state dir>/telemetry-spool``."""
        # An id that could not be saved, kept so this process at least stays consistent.
        self._unsaved_instance_id: Optional[uuid.UUID] = None

    def __repr__(self) -> str:
        return f"State(app={self.app!r}, state_dir={str(self._state_dir)!r})"

    # -- paths ---------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        """Directory of the consent file."""
        return self._config_dir

    @property
    def state_dir(self) -> Path:
        """Directory of the instance id, server policies and the spool."""
        return self._state_dir

    @property
    def consent_path(self) -> Path:
        return self._config_dir / _CONSENT_FILE

    @property
    def instance_id_path(self) -> Path:
        return self._state_dir / _INSTANCE_ID_FILE

    @property
    def first_run_marker_path(self) -> Path:
        return self._state_dir / _FIRST_RUN_FILE

    def policy_path(self, endpoint: str) -> Path:
        """The policy file of ``endpoint`` (named by a hash of its URL)."""
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError(f"endpoint must be a non-empty URL, not {endpoint!r}")
        digest = hashlib.sha256(endpoint.rstrip("/").encode("utf-8")).hexdigest()[:16]
        return self._state_dir / f"{_POLICY_PREFIX}{digest}.json"

    # -- consent -------------------------------------------------------------------

    def check(self) -> Optional[str]:
        """Why these state files must not be used, or None when they may.

        Looks (never opens) at the directories and at every file the client
        reads outside the spool: each must be this user's and writable by
        nobody else, the files regular files. Spool files are checked as they
        are read, off the application's thread.
        """
        files = [self.consent_path, self.instance_id_path, self.first_run_marker_path]
        files += [self._state_dir / name for name in list_dir(self._state_dir)
                  if name.startswith(_POLICY_PREFIX) and name.endswith(".json")]
        return check_paths([self._config_dir, self._state_dir, self.spool.directory], files)

    def read_consent(self) -> Optional[str]:
        """The saved choice (``on``/``off``/``local``), or None when there is none.

        Raises ``UnsafeStateError`` when the file must not be trusted.
        """
        path = self.consent_path
        data = read(path, "consent file")
        if data is None:
            return None
        try:
            mode = parse_mode(json.loads(data)["mode"])
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            mode = None
        if mode is None:
            warn_corrupt("consent file", path, 'expected {"mode": "on" | "off" | "local"}')
        return mode

    def write_consent(self, mode: str) -> bool:
        """Save the user's choice; False (with a warning) when it could not be saved."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        return self._save("consent file", self.consent_path, json.dumps({"mode": mode}) + "\n")

    # -- instance id -----------------------------------------------------------------

    def read_instance_id(self) -> Optional[uuid.UUID]:
        """The saved instance id, or None; never creates one (for ``status``)."""
        if self._unsaved_instance_id is not None:
            return self._unsaved_instance_id
        return self._load_instance_id()[0]

    def instance_id(self) -> uuid.UUID:
        """The saved instance id, created (uuid4) and saved on first use.

        Call it only when the mode is on or local: it writes. Processes
        starting together agree on one id (the first to save it wins). When
        the id cannot be saved, a fresh one is returned (with a warning) and
        kept for the life of this ``State``.
        """
        if self._unsaved_instance_id is not None:
            return self._unsaved_instance_id
        saved, _ = self._load_instance_id()
        if saved is not None:
            return saved
        created = uuid.uuid4()
        try:
            # Always exclusive: another process may have saved its id since we looked
            # (a corrupt file is replaced below, once we have seen it again).
            atomic_write(self.instance_id_path, f"{created}\n".encode(), exclusive=True)
        except FileExistsError:
            winner, _ = self._load_instance_id()
            if winner is not None:
                return winner
            return self._save_new_instance_id(created)
        except OSError as exc:
            warn("save the instance id in", self.instance_id_path, exc)
            self._unsaved_instance_id = created
        return created

    def reset_instance_id(self) -> uuid.UUID:
        """Replace the instance id with a new uuid4 and return it."""
        return self._save_new_instance_id(uuid.uuid4())

    def _save_new_instance_id(self, new: uuid.UUID) -> uuid.UUID:
        saved = self._save("instance id", self.instance_id_path, f"{new}\n")
        self._unsaved_instance_id = None if saved else new
        return new

    def _load_instance_id(self) -> Tuple[Optional[uuid.UUID], bool]:
        """(the saved id or None, whether a file is there at all)."""
        path = self.instance_id_path
        data = read(path, "instance id file")
        if data is None:
            return None, os.path.lexists(path)
        try:
            parsed = uuid.UUID(data.decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if parsed is None or parsed.int == 0:
            warn_corrupt("instance id file", path, "expected a UUID")
            return None, True
        return parsed, True

    # -- server policy -----------------------------------------------------------------

    def read_policy(self, endpoint: str) -> ServerPolicy:
        """What ``endpoint``'s server asked to remember; the default when nothing was."""
        path = self.policy_path(endpoint)
        data = read(path, "server policy file")
        if data is None:
            return ServerPolicy()
        try:
            obj = json.loads(data)
            keys, stop_until = obj["disabled_keys"], obj["stop_until"]
            not_before = obj.get("not_before")  # absent in files written before it existed
            if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
                raise ValueError("disabled_keys is not a list of strings")
            if isinstance(stop_until, bool) or isinstance(not_before, bool):
                raise ValueError("stop_until or not_before is not a number")
            return ServerPolicy(disabled_keys=keys, stop_until=stop_until, not_before=not_before)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            warn_corrupt("server policy file", path, str(exc) or type(exc).__name__)
            return ServerPolicy()

    def write_policy(self, endpoint: str, policy: ServerPolicy) -> bool:
        """Remember ``policy`` for ``endpoint``; False (with a warning) when it could not."""
        text = json.dumps({
            "endpoint": endpoint,
            "disabled_keys": sorted(policy.disabled_keys),
            "stop_until": policy.stop_until,
            "not_before": policy.not_before,
        })
        return self._save("server policy", self.policy_path(endpoint), text + "\n")

    # -- first-run notice ----------------------------------------------------------------

    def first_run_notice_due(self) -> bool:
        """True the first time it is asked for this app, then never again.

        Call it only when the mode is on: it writes a marker file. When the
        marker cannot be written the answer stays True (the notice is better
        repeated than never shown).
        """
        path = self.first_run_marker_path
        if os.path.lexists(path):
            return False
        try:
            atomic_write(path, b"the first-run notice was shown\n", exclusive=True)
        except FileExistsError:
            return False
        except OSError as exc:
            warn("save the first-run marker", path, exc)
        return True

    # -- deletion ---------------------------------------------------------------------------

    def delete_all(self, *, in_background: bool = False) -> bool:
        """Consent turned off: delete the spool, policies, instance id and first-run marker.

        The consent file stays. Returns False (after warnings) when something
        could not be deleted. ``in_background``: the spool's files are deleted on
        a background thread, once it is set aside where nothing sends it
        (``Spool.delete_all``); the few other files at once.
        """
        self._unsaved_instance_id = None
        deleted = self.spool.delete_all(in_background=in_background)
        for name in self._own_state_files():
            deleted = remove(self._state_dir / name, "state file") and deleted
        return deleted

    def _own_state_files(self) -> Iterator[str]:
        fixed = (_INSTANCE_ID_FILE, _FIRST_RUN_FILE)
        for name in list_dir(self._state_dir):
            temporary = TEMPORARY.match(name)
            if temporary:
                final = temporary.group(1)  # never the consent file's, even when both dirs are one
                if final in fixed or final.startswith(_POLICY_PREFIX):
                    yield name
            elif name in fixed or (name.startswith(_POLICY_PREFIX) and name.endswith(".json")):
                yield name

    # -- helpers --------------------------------------------------------------------------

    def _save(self, what: str, path: Path, text: str) -> bool:
        remove_dead_temporaries(path.parent, prefix="telemetry-")
        try:
            atomic_write(path, text.encode("utf-8"))
        except OSError as exc:
            warn(f"save the {what} in", path, exc)
            return False
        return True
