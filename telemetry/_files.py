"""Private files done safely: 0700 directories, 0600 files, atomic writes, no raising reads.

The building blocks of ``_state`` and ``_spool``. A write goes to a temporary
file in the same directory, is fsynced, then renamed over the old file, so a
crash leaves the old file or the new one, never a mix. Reads return None for a
missing or unreadable file (with a warning unless it is simply missing).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
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


def read(path: Path, what: str, limit: int = SMALL_FILE_LIMIT) -> Optional[bytes]:
    """The file's bytes; None (with a warning unless it is simply missing) when unreadable."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None  # missing; a write there will say why it fails
    except OSError as exc:
        warn(f"read the {what}", path, exc)
        return None
    if len(data) > limit:
        warn_corrupt(what, path, f"larger than {limit} bytes")
        return None
    return data


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

