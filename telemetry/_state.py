"""Files kept on disk for one app: consent, instance id, server policy, spool.

Where: ``root/<app>/config`` and ``root/<app>/state`` when a root is given
(argument, then ``TELEMETRY_STATE_DIR``), else platformdirs'
``user_config_dir(app)`` (consent) and ``user_state_dir(app)`` (the rest).
Those may be the application's own directories (on macOS and Windows they
are even the same one), so every name here starts with ``telemetry-`` and
nothing else in them is ever touched.

How: directories are created only when something is written, 0700; files
0600; every write goes to a temporary file in the same directory, is
fsynced, then renamed over the old file, so a crash leaves the old file or
the new one, never a mix. A missing file is the default; an empty,
truncated or garbage one is the default plus a warning, and the next save
rewrites it. Disk problems (read-only, full, permissions) are logged on the
``telemetry`` logger and never raised: only misuse raises ``ValueError``.

Consent: nothing but the consent file may be written while telemetry is
off. Reading never writes; the methods that do write (``instance_id``,
``claim``, ``spool``, ``write_policy``, ``first_run_notice_due``) are for a
client whose mode is on or local.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union

import attrs

from telemetry._consent import MODES, parse_mode
from telemetry._wire import Payload, decode_payload, encode_payload

logger = logging.getLogger("telemetry")

STATE_DIR_ENV = "TELEMETRY_STATE_DIR"
"""Environment variable that overrides the root of all state (tests, containers)."""

STOP_REMEMBERED_FOR = 30 * 86400
"""Seconds a server's ``stop`` is remembered across restarts (SPEC §5)."""

DEFAULT_MAX_SPOOL_FILES = 20
DEFAULT_MAX_SPOOL_BYTES = 16 * 1024 * 1024

_SMALL_FILE_LIMIT = 64 * 1024  # consent, id, policy: anything bigger is garbage
_CONSENT_FILE = "telemetry-consent.json"
_INSTANCE_ID_FILE = "telemetry-instance-id"
_FIRST_RUN_FILE = "telemetry-first-run-notice"
_POLICY_PREFIX = "telemetry-policy-"
_SPOOL_DIR = "telemetry-spool"

_SPOOLED = re.compile(r"^([0-9a-f]{32})\.json$")
_CLAIMED = re.compile(r"^([0-9a-f]{32})\.json\.claimed-([0-9]+)$")
# Temporary files are ".<final name>.<pid>.<random>.tmp": a dead writer's leftovers are known.
_TEMPORARY = re.compile(r"^\.(.+)\.([0-9]+)\.[0-9a-f]+\.tmp$")

PathArgument = Union[str, "os.PathLike[str]"]


# -- value types ----------------------------------------------------------------


def _optional_finite(
    instance: object, attribute: attrs.Attribute[Optional[float]], value: Optional[float]
) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and math.isfinite(value)):
        raise ValueError(f"stop_until must be a finite number of epoch seconds, not {value!r}")


def _frozen_keys(keys: Iterable[str]) -> FrozenSet[str]:
    return frozenset(keys)


@attrs.frozen
class ServerPolicy:
    """What the server told this client to remember, for one endpoint."""

    disabled_keys: FrozenSet[str] = attrs.field(default=frozenset(), converter=_frozen_keys)
    stop_until: Optional[float] = attrs.field(default=None, validator=_optional_finite)
    """Epoch seconds until which the server's ``stop`` holds; None: no stop."""

    def stopped(self, now: float) -> bool:
        """Whether a remembered ``stop`` still holds at ``now`` (epoch seconds)."""
        return self.stop_until is not None and now < self.stop_until

    def remember_stop(self, now: float) -> ServerPolicy:
        """This policy with a ``stop`` received at ``now``, held for ``STOP_REMEMBERED_FOR``."""
        return attrs.evolve(self, stop_until=now + STOP_REMEMBERED_FOR)


class SpoolSize(NamedTuple):
    """How much the spool holds: payload files (claimed or not) and their bytes."""

    files: int
    size: int


@attrs.frozen
class Status:
    """A client's mode, why, identity and where its files are (``telemetry.status()``)."""

    mode: str
    rule: str
    instance_id: Optional[str]
    endpoint: Optional[str]
    emitting: bool
    server_stopped: bool
    server_disabled_keys: FrozenSet[str]
    config_dir: Optional[str]
    state_dir: Optional[str]
    spool_files: int
    spool_bytes: int


# -- low-level file handling ------------------------------------------------------


def _warn(action: str, path: Path, exc: BaseException) -> None:
    logger.warning("telemetry: could not %s %s: %s", action, path, exc)


def _warn_corrupt(what: str, path: Path, reason: str) -> None:
    logger.warning(
        "telemetry: ignoring the corrupt %s in %s (%s); it is replaced when next saved",
        what, path, reason,
    )


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each 0700 (only those created here)."""
    missing: List[Path] = []
    current = directory
    while not current.is_dir() and current.parent != current:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another process
        os.chmod(path, 0o700)  # the umask may have taken bits off, never added them


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); best effort."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_write(
    path: Path, data: bytes, *, exclusive: bool = False, mtime_ns: Optional[int] = None
) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename.

    With ``exclusive``, raise ``FileExistsError`` rather than replace an
    existing file (two processes creating the same file: the first one wins).
    Raises ``OSError`` for disk problems; the temporary file never outlives
    the call unless the process dies during it.
    """
    _make_private_dirs(path.parent)
    temporary = _temporary_name(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o600)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mtime_ns is not None:
            os.utime(temporary, ns=(mtime_ns, mtime_ns))
        if not (exclusive and _link_without_replacing(temporary, path)):
            os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        with contextlib.suppress(OSError):  # renamed away already: the usual case
            os.unlink(temporary)


def _link_without_replacing(source: Path, target: Path) -> bool:
    """Hard-link ``source`` as ``target`` unless it exists; False where links are unsupported."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            if target.exists():
                raise FileExistsError(errno.EEXIST, "file exists", str(target)) from None
            return False
        raise
    return True


class UnsafeStateError(Exception):
    """A state directory or file that others could have planted or can change."""


def unsafe_reason(path: Path, info: os.stat_result, *, directory: bool) -> Optional[str]:
    """Why ``path`` (as ``info`` describes it) must not be trusted, or None.

    Refused: anything but a regular file (or a directory, when ``directory``),
    and, where there are POSIX owners, anything not owned by this user or
    writable by group or others.
    """
    mode = info.st_mode
    if directory and not stat.S_ISDIR(mode):
        return f"{path} is not a directory"
    if not directory and not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    if not hasattr(os, "geteuid"):
        return None  # Windows: ACLs, not owners and mode bits
    uid = os.geteuid()
    if info.st_uid != uid:
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(mode):04o})"
    return None


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _read(path: Path, what: str, limit: int = _SMALL_FILE_LIMIT) -> Optional[bytes]:
    """The file's bytes; None (with a warning unless it is simply missing) when unreadable.

    Never follows a symbolic link, never blocks on opening (a FIFO) and never
    reads anything but a regular file of this user that nobody else may
    change: raises ``UnsafeStateError`` for anything else.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None  # missing; a write there will say why it fails
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UnsafeStateError(f"{path} is a symbolic link") from None
        _warn(f"read the {what}", path, exc)
        return None
    try:
        reason = unsafe_reason(path, os.fstat(fd), directory=False)
        if reason is not None:
            raise UnsafeStateError(reason)
        pieces: List[bytes] = []
        size = 0
        while size <= limit:
            piece = os.read(fd, limit + 1 - size)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
    except OSError as exc:
        _warn(f"read the {what}", path, exc)
        return None
    finally:
        os.close(fd)
    if size > limit:
        _warn_corrupt(what, path, f"larger than {limit} bytes")
        return None
    return b"".join(pieces)


def _remove(path: Path, what: str) -> bool:
    """Delete a file; True when it is gone (or was never there)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError as exc:
        _warn(f"delete the {what}", path, exc)
        return False
    return True


def _list(directory: Path) -> List[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        _warn("list", directory, exc)
        return []


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists; unknown counts as alive (never steal a live claim)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. PermissionError: it exists, as another user
    return True


def _remove_dead_temporaries(directory: Path, prefix: str = "") -> None:
    """Delete our temporary files (final name starting ``prefix``) whose writer died."""
    for name in _list(directory):
        match = _TEMPORARY.match(name)
        if match and match.group(1).startswith(prefix) and not _pid_alive(int(match.group(2))):
            _remove(directory / name, "stale temporary file")


class _ClaimRegistry:
    """Spool files this process holds claimed (by path), across all ``State`` objects.

    A claim file names its owner by pid, and pids are reused: a container's
    app is often pid 1 at every start. A file claimed under our own pid that
    is not registered here was left by a dead earlier process and can be
    reclaimed. Registering before the rename also keeps two threads of one
    process from claiming the same file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: Set[str] = set()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held mid-claim

    def reserve(self, path: Path) -> bool:
        with self._lock:
            if str(path) in self._paths:
                return False
            self._paths.add(str(path))
            return True

    def forget(self, path: Path) -> None:
        with self._lock:
            self._paths.discard(str(path))


_CLAIMS = _ClaimRegistry()


# -- the spool's claimed files -----------------------------------------------------


@attrs.define(eq=False)
class Claimed:
    """A spool file this process claimed: send ``payload``, then ``done()`` or ``release()``."""

    payload: Payload
    path: Path
    """Where the claimed file is now (``<payload_id>.json.claimed-<pid>``)."""
    _settled: bool = attrs.field(default=False, init=False)

    def done(self) -> None:
        """Delivered (or rejected for good): delete the file."""
        if self._settle():
            _remove(self.path, "delivered spool file")
            _CLAIMS.forget(self.path)

    def release(self) -> None:
        """Not delivered: put the file back unclaimed, same payload_id, for a later sender."""
        if not self._settle():
            return
        unclaimed = self.path.with_name(self.path.name.rsplit(".claimed-", 1)[0])
        try:
            os.replace(self.path, unclaimed)
        except FileNotFoundError:
            pass  # deleted meanwhile, e.g. consent turned off
        except OSError as exc:
            _warn("put back the spool file", self.path, exc)
        _CLAIMS.forget(self.path)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True


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
    one atomic rename, and the spool is drained through ``claim()``.
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
        if max_spool_files < 1 or max_spool_bytes < 1:
            raise ValueError("max_spool_files and max_spool_bytes must be at least 1")
        self.max_spool_files = max_spool_files
        self.max_spool_bytes = max_spool_bytes
        if root is None:
            root = os.environ.get(STATE_DIR_ENV) or None
        if root is not None:
            base = Path(root).expanduser() / app
            self._config_dir, self._state_dir = base / "config", base / "state"
        else:
            import platformdirs  # noqa: PLC0415 - `import telemetry` stays light

            self._config_dir = Path(platformdirs.user_config_dir(app))
            self._state_dir = Path(platformdirs.user_state_dir(app))
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

    @property
    def spool_dir(self) -> Path:
        return self._state_dir / _SPOOL_DIR

    def policy_path(self, endpoint: str) -> Path:
        """The policy file of ``endpoint`` (named by a hash of its URL)."""
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError(f"endpoint must be a non-empty URL, not {endpoint!r}")
        digest = hashlib.sha256(endpoint.rstrip("/").encode("utf-8")).hexdigest()[:16]
        return self._state_dir / f"{_POLICY_PREFIX}{digest}.json"

    # -- safety --------------------------------------------------------------------

    def check(self) -> Optional[str]:
        """Why these state files must not be used, or None when they may.

        Looks (``lstat``, never ``open``) at the directories and at every file
        the client reads outside the spool: each must be this user's and
        writable by nobody else, the files regular files. Spool files are
        checked as they are read, off the application's thread.
        """
        directories = [self._config_dir, self._state_dir, self.spool_dir]
        files = [self.consent_path, self.instance_id_path, self.first_run_marker_path]
        files += [self._state_dir / name for name in _list(self._state_dir)
                  if name.startswith(_POLICY_PREFIX) and name.endswith(".json")]
        for path, directory in [(d, True) for d in directories] + [(f, False) for f in files]:
            try:
                info = os.stat(path) if directory else os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue  # made later, by this process, 0700/0600
            except OSError as exc:
                return f"{path} cannot be examined ({exc})"
            reason = unsafe_reason(path, info, directory=directory)
            if reason is not None:
                return reason
        return None

    # -- consent -------------------------------------------------------------------

    def read_consent(self) -> Optional[str]:
        """The saved choice (``on``/``off``/``local``), or None when there is none.

        Raises ``UnsafeStateError`` when the file must not be trusted.
        """
        path = self.consent_path
        data = _read(path, "consent file")
        if data is None:
            return None
        try:
            mode = parse_mode(json.loads(data)["mode"])
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            mode = None
        if mode is None:
            _warn_corrupt("consent file", path, 'expected {"mode": "on" | "off" | "local"}')
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
            _atomic_write(self.instance_id_path, f"{created}\n".encode(), exclusive=True)
        except FileExistsError:
            winner, _ = self._load_instance_id()
            if winner is not None:
                return winner
            return self._save_new_instance_id(created)
        except OSError as exc:
            _warn("save the instance id in", self.instance_id_path, exc)
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
        data = _read(path, "instance id file")
        if data is None:
            return None, os.path.lexists(path)
        try:
            parsed = uuid.UUID(data.decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if parsed is None or parsed.int == 0:
            _warn_corrupt("instance id file", path, "expected a UUID")
            return None, True
        return parsed, True

    # -- server policy -----------------------------------------------------------------

    def read_policy(self, endpoint: str) -> ServerPolicy:
        """What ``endpoint``'s server asked to remember; the default when nothing was."""
        path = self.policy_path(endpoint)
        data = _read(path, "server policy file")
        if data is None:
            return ServerPolicy()
        try:
            obj = json.loads(data)
            keys, stop_until = obj["disabled_keys"], obj["stop_until"]
            if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
                raise ValueError("disabled_keys is not a list of strings")
            if isinstance(stop_until, bool):
                raise ValueError("stop_until is not a number")
            return ServerPolicy(disabled_keys=keys, stop_until=stop_until)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            _warn_corrupt("server policy file", path, str(exc) or type(exc).__name__)
            return ServerPolicy()

    def write_policy(self, endpoint: str, policy: ServerPolicy) -> bool:
        """Remember ``policy`` for ``endpoint``; False (with a warning) when it could not."""
        text = json.dumps({
            "endpoint": endpoint,
            "disabled_keys": sorted(policy.disabled_keys),
            "stop_until": policy.stop_until,
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
            _atomic_write(path, b"the first-run notice was shown\n", exclusive=True)
        except FileExistsError:
            return False
        except OSError as exc:
            _warn("save the first-run marker", path, exc)
        return True

    # -- spool ----------------------------------------------------------------------------

    def spool(self, payloads: Iterable[Payload]) -> int:
        """Save undelivered payloads, one file each, then keep the spool within its bounds.

        The oldest payloads (by timestamp) go first when the spool holds more
        than ``max_spool_files`` files or ``max_spool_bytes`` bytes (files that
        a running process has claimed are not counted: they are in flight). Returns
        how many items were lost (each lost payload's items plus the drop
        count it carried), including payloads that could not be written.
        """
        lost = 0
        written: Dict[str, Payload] = {}
        for payload in payloads:
            body = encode_payload(payload)
            path = self.spool_dir / f"{payload.payload_id}.json"
            if len(body) > self.max_spool_bytes:
                logger.debug("telemetry: payload %s is larger than the spool; dropped",
                             payload.payload_id)
                lost += payload.items + payload.dropped
                continue
            # The file's mtime is the payload's age: it orders the spool, oldest first.
            age = int(payload.timestamp.timestamp()) * 1_000_000_000 + (
                payload.timestamp.microsecond * 1000)
            try:
                _atomic_write(path, body, mtime_ns=age)
            except OSError as exc:
                _warn("spool the payload to", path, exc)
                lost += payload.items + payload.dropped
                continue
            written[payload.payload_id] = payload
        if written:
            lost += self._enforce_spool_bounds(written)
        return lost

    def _enforce_spool_bounds(self, just_written: Dict[str, Payload]) -> int:
        entries = []
        for name in _list(self.spool_dir):
            if _SPOOLED.match(name):
                try:
                    info = os.lstat(self.spool_dir / name)
                except OSError:
                    continue  # claimed or deleted meanwhile
                entries.append((info.st_mtime_ns, name, info.st_size))
        entries.sort()
        files, size = len(entries), sum(entry[2] for entry in entries)
        lost = 0
        for _, name, file_size in entries:
            if files <= self.max_spool_files and size <= self.max_spool_bytes:
                break
            files, size = files - 1, size - file_size
            payload_id = name[: -len(".json")]
            claimed = self._claim_file(self.spool_dir / name)
            if claimed is None:
                continue  # another process took it: it is not lost
            payload = just_written.get(payload_id)
            if payload is None:
                payload = self._decode_spool_file(claimed, warn=False)
            if payload is not None:
                lost += payload.items + payload.dropped
            _remove(claimed, "spool file")
            _CLAIMS.forget(claimed)
        if lost:  # the caller counts and reports them
            logger.debug("telemetry: spool full; the oldest payloads (%d items) were dropped", lost)
        return lost

    def claim(self) -> List[Claimed]:
        """Take every spooled payload for this process, oldest first.

        Each file is renamed to ``<payload_id>.json.claimed-<pid>``: the rename
        is the claim, so two processes draining one spool never both get a
        file. Files claimed by a process that no longer runs are taken over.
        Garbage files are deleted with a warning. Every returned ``Claimed``
        must end with ``done()`` or ``release()``.
        """
        _remove_dead_temporaries(self.spool_dir)
        claimed: List[Claimed] = []
        for name in _list(self.spool_dir):
            path = self.spool_dir / name
            if _SPOOLED.match(name) or self._is_stale_claim(name):
                target = self._claim_file(path)
                if target is None:
                    continue
                payload = self._decode_spool_file(target, warn=True)
                if payload is None:
                    _remove(target, "corrupt spool file")
                    _CLAIMS.forget(target)
                    continue
                claimed.append(Claimed(payload, target))
        claimed.sort(key=lambda item: (item.payload.timestamp, item.payload.payload_id))
        return claimed

    def spooled(self) -> List[Payload]:
        """Every payload in the spool, claimed or not, oldest first; changes nothing."""
        payloads = []
        for name in _list(self.spool_dir):
            if _SPOOLED.match(name) or _CLAIMED.match(name):
                payload = self._decode_spool_file(self.spool_dir / name, warn=True)
                if payload is not None:
                    payloads.append(payload)
        payloads.sort(key=lambda payload: (payload.timestamp, payload.payload_id))
        return payloads

    def spool_size(self) -> SpoolSize:
        """How many payload files the spool holds (claimed or not), and their bytes."""
        files = size = 0
        for name in _list(self.spool_dir):
            if _SPOOLED.match(name) or _CLAIMED.match(name):
                try:
                    size += os.lstat(self.spool_dir / name).st_size
                except OSError:
                    continue
                files += 1
        return SpoolSize(files, size)

    def _is_stale_claim(self, name: str) -> bool:
        match = _CLAIMED.match(name)
        if match is None:
            return False
        pid = int(match.group(2))
        if pid == os.getpid():
            return True  # ours only if registered; _claim_file checks that
        return not _pid_alive(pid)

    def _claim_file(self, path: Path) -> Optional[Path]:
        """Rename a spool file to this process's claim; None when someone else has it."""
        base = path.name.rsplit(".claimed-", 1)[0]
        target = path.with_name(f"{base}.claimed-{os.getpid()}")
        if not _CLAIMS.reserve(target):
            return None  # held by this process already
        if path == target:
            return target  # left by a dead process that had our pid
        try:
            os.rename(path, target)
        except OSError as exc:
            _CLAIMS.forget(target)
            if not isinstance(exc, FileNotFoundError):
                _warn("claim the spool file", path, exc)
            return None
        return target

    def _decode_spool_file(self, path: Path, *, warn: bool) -> Optional[Payload]:
        try:
            data = _read(path, "spool file", limit=max(self.max_spool_bytes, _SMALL_FILE_LIMIT))
        except UnsafeStateError as exc:
            if warn:
                logger.warning("telemetry: refusing the spool file %s (%s)", path, exc)
            return None
        if data is None:
            return None
        try:
            return decode_payload(data)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            if warn:
                logger.warning("telemetry: discarding the corrupt spool file %s (%s)", path, exc)
            return None

    # -- deletion ---------------------------------------------------------------------------

    def delete_all(self) -> bool:
        """Consent turned off: delete the spool, policies, instance id and first-run marker.

        The consent file stays. Returns False (after warnings) when something
        could not be deleted.
        """
        self._unsaved_instance_id = None
        deleted = True
        spool_dir = self.spool_dir
        for name in _list(spool_dir):
            if _SPOOLED.match(name) or _CLAIMED.match(name) or _TEMPORARY.match(name):
                deleted = _remove(spool_dir / name, "spool file") and deleted
        try:
            spool_dir.rmdir()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            _warn("delete", spool_dir, exc)
            deleted = False
        for name in self._own_state_files():
            deleted = _remove(self._state_dir / name, "state file") and deleted
        return deleted

    def _own_state_files(self) -> Iterator[str]:
        fixed = (_INSTANCE_ID_FILE, _FIRST_RUN_FILE)
        for name in _list(self._state_dir):
            temporary = _TEMPORARY.match(name)
            if temporary:
                final = temporary.group(1)  # never the consent file's, even when both dirs are one
                if final in fixed or final.startswith(_POLICY_PREFIX):
                    yield name
            elif name in fixed or (name.startswith(_POLICY_PREFIX) and name.endswith(".json")):
                yield name

    # -- helpers --------------------------------------------------------------------------

    def _save(self, what: str, path: Path, text: str) -> bool:
        _remove_dead_temporaries(path.parent, prefix="telemetry-")
        try:
            _atomic_write(path, text.encode("utf-8"))
        except OSError as exc:
            _warn(f"save the {what} in", path, exc)
            return False
        return True
