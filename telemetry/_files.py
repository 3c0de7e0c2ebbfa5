"""Private files done safely: 0700 directories, 0600 files, atomic writes, no raising reads.

The building blocks of ``_state`` and ``_spool``. A write goes to a temporary
file in the same directory, is fsynced, then renamed over the old file, so a
crash leaves the old file or the new one, never a mix. Reads return None for a
missing or unreadable file (with a warning unless it is simply missing), and
raise ``UnsafeStateError`` for what must not be trusted: anything but a regular
file of this user that nobody else may change. A read never follows a symbolic
link and never blocks (a FIFO is refused, not opened for reading).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("telemetry")

SMALL_FILE_LIMIT = 64 * 1024
"""Consent, id, policy: a file bigger than this is garbage."""

# Temporary files are ".<final name>.<pid>.<random>.tmp": a dead writer's leftovers are known.
TEMPORARY = re.compile(r"^\.(.+)\.([0-9]+)\.[0-9a-f]+\.tmp$")


def warn(action: str, path: Path, exc: BaseException) -> None:
    logger.warning("telemetry: could not %s %s: %s", action, path, exc)


def warn_corrupt(what: str, path: Path, reason: str) -> None:
    logger.warning(
        "telemetry: ignoring the corrupt %s in %s (%s); it is replaced when next saved",
        what, path, reason,
    )


def make_private_dirs(directory: Path) -> None:
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


def atomic_write(
    path: Path, data: bytes, *, exclusive: bool = False, mtime_ns: Optional[int] = None
) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename.

    With ``exclusive``, raise ``FileExistsError`` rather than replace an
    existing file (two processes creating the same file: the first one wins).
    Raises ``OSError`` for disk problems; the temporary file never outlives
    the call unless the process dies during it.
    """
    make_private_dirs(path.parent)
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


def check_paths(directories: List[Path], files: List[Path]) -> Optional[str]:
    """Why one of these (where they exist) must not be trusted, or None.

    Only looks (``stat`` for directories, which may be links to elsewhere of
    the user's; ``lstat`` for files): never opens anything.
    """
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


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def read(path: Path, what: str, limit: int = SMALL_FILE_LIMIT) -> Optional[bytes]:
    """The file's bytes; None (with a warning unless it is simply missing) when unreadable.

    Raises ``UnsafeStateError`` for a symbolic link, anything but a regular
    file (opened without blocking, then refused), or a file someone else owns
    or may write.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None  # missing; a write there will say why it fails
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise UnsafeStateError(f"{path} is a symbolic link") from None
        warn(f"read the {what}", path, exc)
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
        warn(f"read the {what}", path, exc)
        return None
    finally:
        os.close(fd)
    if size > limit:
        warn_corrupt(what, path, f"larger than {limit} bytes")
        return None
    return b"".join(pieces)


def remove(path: Path, what: str) -> bool:
    """Delete a file; True when it is gone (or was never there)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError as exc:
        warn(f"delete the {what}", path, exc)
        return False
    return True


def list_dir(directory: Path) -> List[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        warn("list", directory, exc)
        return []


def pid_alive(pid: int) -> bool:
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


def remove_dead_temporaries(directory: Path, prefix: str = "") -> None:
    """Delete our temporary files (final name starting ``prefix``) whose writer died."""
    for name in list_dir(directory):
        match = TEMPORARY.match(name)
        if match and match.group(1).startswith(prefix) and not pid_alive(int(match.group(2))):
            remove(directory / name, "stale temporary file")

