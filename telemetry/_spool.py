"""The spool: undelivered payloads kept on disk until a process sends them.

One file per payload, ``<payload_id>.json``, in ``<state dir>/telemetry-spool``
(0700; files 0600, written atomically). A sender claims a file by renaming it
to ``<payload_id>.json.claimed-<pid>``: the rename is the claim, so two
processes draining one spool never both send a payload, and the payload keeps
its ``payload_id`` (the server counts it once). Bounded by file count and
bytes, oldest dropped first and counted. Disk problems are logged, never
raised.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set

import attrs

from telemetry._files import (
    SMALL_FILE_LIMIT,
    TEMPORARY,
    UnsafeStateError,
    atomic_write,
    list_dir,
    pid_alive,
    read,
    remove,
    remove_dead_temporaries,
    warn,
)
from telemetry._log import report_internal_error
from telemetry._wire import Payload, Request, decode_payload

logger = logging.getLogger("telemetry")

DEFAULT_MAX_SPOOL_FILES = 20
DEFAULT_MAX_SPOOL_BYTES = 16 * 1024 * 1024

_SPOOLED = re.compile(r"^([0-9a-f]{32})\.json$")
_CLAIMED = re.compile(r"^([0-9a-f]{32})\.json\.claimed-([0-9]+)$")
_WITHDRAWN = ".withdrawn-"
"""``<spool dir>.withdrawn-<pid>-<token>``: a spool set aside for deletion, never read."""


class SpoolSize(NamedTuple):
    """How much the spool holds: payload files (claimed or not) and their bytes."""

    files: int
    size: int


class _ClaimRegistry:
    """Spool files this process holds claimed (by path), across all ``Spool`` objects.

    A claim file names its owner by pid, and pids are reused: a container's
    app is often pid 1 at every start. A file claimed under our own pid that
    is not registered here was left by a dead earlier process and can be
    reclaimed. Registering before the rename also keeps two threads of one
    process from claiming the same file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.deleting = threading.Lock()
        """Guards every ``Spool``'s background deleter of withdrawn spools."""
        self._paths: Set[str] = set()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held mid-claim
        self.deleting = threading.Lock()  # ... or while a deleter was being started

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
            remove(self.path, "delivered spool file")
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
            warn("put back the spool file", self.path, exc)
        _CLAIMS.forget(self.path)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True


# -- the spool of one app -------------------------------------------------------------


class Spool:
    """The spooled payloads in ``directory``; nothing is read or created until used.

    Safe to use from several threads and processes at once: every change is one
    atomic rename, and the spool is drained through ``claim()``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_files: int = DEFAULT_MAX_SPOOL_FILES,
        max_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
    ) -> None:
        """Raises ``ValueError`` for a bound below 1."""
        if max_files < 1 or max_bytes < 1:
            raise ValueError("max_spool_files and max_spool_bytes must be at least 1")
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._deleter: Optional[threading.Thread] = None  # deleting withdrawn spools
        self._deleter_pid = 0  # a forked child has no deleter, whatever it inherited
        self._delete_again = False

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r})"

    def save(self, requests: Iterable[Request]) -> int:
        """Save undelivered payloads, one file each, then keep the spool within its bounds.

        Each payload comes encoded already (a ``Request``, as the emitter sends
        it): the file holds its JSON, decompressed when the body was gzipped.
        The oldest payloads (by timestamp) go first when the spool holds more
        than ``max_files`` files or ``max_bytes`` bytes (files that a running
        process has claimed are not counted: they are in flight). Returns how
        many items were lost (each lost payload's items plus the drop count it
        carried), including payloads that could not be written.
        """
        lost = 0
        written: Dict[str, Payload] = {}
        for request in requests:
            payload = request.payload
            body = zlib.decompress(request.body, 31) if request.gzipped else request.body
            path = self.directory / f"{payload.payload_id}.json"
            if len(body) > self.max_bytes:
                logger.debug("telemetry: payload %s is larger than the spool; dropped",
                             payload.payload_id)
                lost += payload.items + payload.dropped
                continue
            # The file's mtime is the payload's age: it orders the spool, oldest first.
            age = int(payload.timestamp.timestamp()) * 1_000_000_000 + (
                payload.timestamp.microsecond * 1000)
            try:
                atomic_write(path, body, mtime_ns=age)
            except OSError as exc:
                warn("spool the payload to", path, exc)
                lost += payload.items + payload.dropped
                continue
            written[payload.payload_id] = payload
        if written:
            lost += self._enforce_bounds(written)
        return lost

    def _enforce_bounds(self, just_written: Dict[str, Payload]) -> int:
        entries = []
        for name in list_dir(self.directory):
            if _SPOOLED.match(name):
                try:
                    info = os.lstat(self.directory / name)
                except OSError:
                    continue  # claimed or deleted meanwhile
                entries.append((info.st_mtime_ns, name, info.st_size))
        entries.sort()
        files, size = len(entries), sum(entry[2] for entry in entries)
        lost = 0
        for _, name, file_size in entries:
            if files <= self.max_files and size <= self.max_bytes:
                break
            files, size = files - 1, size - file_size
            payload_id = name[: -len(".json")]
            claimed = self._claim_file(self.directory / name)
            if claimed is None:
                continue  # another process took it: it is not lost
            payload = just_written.get(payload_id)
            if payload is None:
                payload = self._decode(claimed, warn=False)
            if payload is not None:
                lost += payload.items + payload.dropped
            remove(claimed, "spool file")
            _CLAIMS.forget(claimed)
        if lost:  # the caller counts and reports them
            logger.debug("telemetry: spool full; the oldest payloads (%d items) were dropped", lost)
        return lost

    def trim(self) -> int:
        """Drop the oldest payloads beyond the bounds (as ``save`` does); the items lost.

        For a spool that grew past its bounds (other processes, a smaller bound
        now, files copied in): nothing the spool holds may cost more than its
        bounds allow. Also finishes deleting spools withdrawn by a process that
        ended before it could.
        """
        self._delete_withdrawn()
        return self._enforce_bounds({})

    def claim(self, limit: Optional[int] = None) -> List[Claimed]:
        """Take the ``limit`` oldest spooled payloads (all: None) for this process.

        Each file is renamed to ``<payload_id>.json.claimed-<pid>``: the rename
        is the claim, so two processes draining one spool never both get a
        file. Files claimed by a process that no longer runs are taken over.
        Garbage files are deleted with a warning. Every returned ``Claimed``
        must end with ``done()`` or ``release()``. Returned oldest first.
        """
        remove_dead_temporaries(self.directory)
        candidates = []
        for name in list_dir(self.directory):
            if _SPOOLED.match(name) or self._is_stale_claim(name):
                try:
                    age = os.lstat(self.directory / name).st_mtime_ns  # the payload's age
                except OSError:
                    continue  # claimed or deleted meanwhile
                candidates.append((age, name))
        candidates.sort()
        claimed: List[Claimed] = []
        for _, name in candidates:
            if limit is not None and len(claimed) >= limit:
                break
            target = self._claim_file(self.directory / name)
            if target is None:
                continue
            payload = self._decode(target, warn=True)
            if payload is None:
                remove(target, "corrupt spool file")
                _CLAIMS.forget(target)
                continue
            claimed.append(Claimed(payload, target))
        claimed.sort(key=lambda item: (item.payload.timestamp, item.payload.payload_id))
        return claimed

    def payloads(self) -> List[Payload]:
        """Every payload in the spool, claimed or not, oldest first; changes nothing."""
        payloads = []
        for name in list_dir(self.directory):
            if _SPOOLED.match(name) or _CLAIMED.match(name):
                payload = self._decode(self.directory / name, warn=True)
                if payload is not None:
                    payloads.append(payload)
        payloads.sort(key=lambda payload: (payload.timestamp, payload.payload_id))
        return payloads

    def size(self) -> SpoolSize:
        """How many payload files the spool holds (claimed or not), and their bytes."""
        files = size = 0
        for name in list_dir(self.directory):
            if _SPOOLED.match(name) or _CLAIMED.match(name):
                try:
                    size += os.lstat(self.directory / name).st_size
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
        return not pid_alive(pid)

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
                warn("claim the spool file", path, exc)
            return None
        return target

    def _decode(self, path: Path, *, warn: bool) -> Optional[Payload]:
        try:
            data = read(path, "spool file", limit=max(self.max_bytes, SMALL_FILE_LIMIT))
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

    def delete_all(self, *, in_background: bool = False) -> bool:
        """Delete every spool file (claimed or not) and the directory; False if some stayed.

        The directory is first renamed aside (``<dir>.withdrawn-<pid>-<token>``),
        one atomic step whatever it holds: from then on nothing of it can be
        claimed or sent, by this process or another, even if this one dies
        before the files are gone (a later ``delete_all`` or ``trim`` finishes
        the job). With ``in_background`` the files are then deleted on a
        background thread (consent withdrawn on the application's thread); the
        answer is then whether the spool was set aside.
        """
        aside = self.directory.with_name(
            f"{self.directory.name}{_WITHDRAWN}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.directory, aside)
            moved = True
        except (FileNotFoundError, NotADirectoryError):
            moved = False  # no spool: perhaps only withdrawn ones are left to delete
        except OSError as exc:
            # Cannot set it aside (e.g. open files elsewhere): delete in place, now.
            warn("set aside for deletion", self.directory, exc)
            return self._delete_files(self.directory) and self._delete_withdrawn()
        if in_background:
            if moved or self._withdrawn():  # no thread when there is nothing to delete
                self._delete_withdrawn_in_background()
            return True
        return self._delete_withdrawn()

    def _withdrawn(self) -> List[Path]:
        prefix = self.directory.name + _WITHDRAWN
        return [self.directory.parent / name for name in list_dir(self.directory.parent)
                if name.startswith(prefix)]

    def _deleter_running(self) -> bool:
        return self._deleter is not None and self._deleter_pid == os.getpid()

    def _delete_withdrawn_in_background(self) -> None:
        with _CLAIMS.deleting:
            self._delete_again = True
            if self._deleter_running():
                return  # it looks again before it ends
            self._deleter = threading.Thread(target=self._keep_deleting, daemon=True,
                                             name="telemetry-spool-delete")
            self._deleter_pid = os.getpid()
            self._deleter.start()

    def _keep_deleting(self) -> None:
        try:
            while True:
                with _CLAIMS.deleting:
                    if not self._delete_again:
                        self._deleter = None
                        return
                    self._delete_again = False
                self._delete_withdrawn()
        except Exception as exc:
            with _CLAIMS.deleting:
                self._deleter = None
            report_internal_error("spool deletion", exc)

    def _delete_withdrawn(self) -> bool:
        """Delete every withdrawn spool beside this one (ours and dead processes')."""
        deleted = True
        for directory in self._withdrawn():
            deleted = self._delete_files(directory) and deleted
        return deleted

    @staticmethod
    def _delete_files(directory: Path) -> bool:
        deleted = True
        for name in list_dir(directory):
            if _SPOOLED.match(name) or _CLAIMED.match(name) or TEMPORARY.match(name):
                deleted = remove(directory / name, "spool file") and deleted
        try:
            directory.rmdir()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            warn("delete", directory, exc)
            deleted = False
        return deleted
