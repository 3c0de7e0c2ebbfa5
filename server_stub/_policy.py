"""What the server tells clients: the policy, read from a JSON file and/or set in-process.

The response fields it becomes are described in ``docs/protocol.md`` ("The response").

A policy file looks like::

    {"next_update": 3600, "disabled_keys": ["tls"], "enabled_keys": [],
     "stop": false, "rate_limit": {"payloads": 10, "window": 60}}

Every field is optional. ``next_update`` is in seconds (it goes out as integer
nanoseconds, a Go duration); ``stop`` is ``true`` (stop every client) or a list
of instance ids; ``rate_limit`` is off unless set. Unknown fields are an error,
so a typo (``disable_keys``) cannot silently do nothing.

The file is re-read whenever its mtime, size or inode changes (one ``stat`` per
request). A file that cannot be read or is invalid is logged and the previous
policy stays in force.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

__all__ = ["DEFAULT_NEXT_UPDATE", "Policy", "PolicyRules", "RateLimit"]

logger = logging.getLogger("server_stub")

DEFAULT_NEXT_UPDATE = 3600.0
"""Seconds a client is told to wait when the policy does not say otherwise."""

_NANOSECONDS = 1_000_000_000
# Largest Go time.Duration: next_update must fit in an int64 of nanoseconds.
_MAX_NEXT_UPDATE = (2**63 - 1) / _NANOSECONDS

_FileSignature = Tuple[int, int, int, int]


@dataclass(frozen=True)
class RateLimit:
    """At most ``payloads`` accepted payloads per instance in each ``window`` seconds."""

    payloads: int
    window: float


@dataclass(frozen=True)
class PolicyRules:
    """One immutable version of the policy; ``Policy.current()`` hands these out."""

    next_update: float = DEFAULT_NEXT_UPDATE
    disabled_keys: Tuple[str, ...] = ()
    enabled_keys: Tuple[str, ...] = ()
    stop: Union[bool, frozenset[str]] = False
    rate_limit: Optional[RateLimit] = None
    # Field names exactly as they appear in a policy file and in Policy.update().
    FIELDS = ("next_update", "disabled_keys", "enabled_keys", "stop", "rate_limit")

    @property
    def next_update_ns(self) -> int:
        return round(self.next_update * _NANOSECONDS)

    def stops(self, instance_id: str) -> bool:
        if isinstance(self.stop, bool):
            return self.stop
        return instance_id.lower() in self.stop

    def response_fields(self, instance_id: str) -> dict[str, Any]:
        """The body of a successful ``/v1/update`` answer for this instance."""
        fields: dict[str, Any] = {"next_update": self.next_update_ns}
        if self.disabled_keys:
            fields["disable_keys"] = list(self.disabled_keys)
        if self.enabled_keys:
            fields["enable_keys"] = list(self.enabled_keys)
        if self.stops(instance_id):
            fields["stop"] = True
        return fields

    def replace(self, fields: Mapping[str, Any]) -> PolicyRules:
        """A copy with ``fields`` (file/JSON spelling) validated and applied.

        Raises ``ValueError`` naming the first bad field.
        """
        unknown = sorted(set(fields) - set(self.FIELDS))
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(unknown)}")
        changes: dict[str, Any] = {}
        for name, value in fields.items():
            changes[name] = _PARSERS[name](value)
        return dataclasses.replace(self, **changes)


def _parse_next_update(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("next_update must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 <= seconds <= _MAX_NEXT_UPDATE:
        raise ValueError("next_update must be between 0 and ~292 years")
    return seconds


def _parse_keys(value: object) -> Tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError("disabled_keys/enabled_keys must be a list of strings")
    if not all(isinstance(key, str) and key for key in value):
        raise ValueError("disabled_keys/enabled_keys must hold non-empty strings")
    return tuple(sorted(set(value)))


def _parse_stop(value: object) -> Union[bool, frozenset[str]]:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError("stop must be true, false or a list of instance ids")
    if not all(isinstance(instance_id, str) for instance_id in value):
        raise ValueError("stop must be true, false or a list of instance ids")
    return frozenset(instance_id.lower() for instance_id in value)


def _parse_rate_limit(value: object) -> Optional[RateLimit]:
    if value is None or isinstance(value, RateLimit):
        return value
    if not isinstance(value, Mapping) or set(value) != {"payloads", "window"}:
        raise ValueError('rate_limit must be null or {"payloads": N, "window": seconds}')
    payloads, window = value["payloads"], value["window"]
    if isinstance(payloads, bool) or not isinstance(payloads, int) or payloads < 1:
        raise ValueError("rate_limit.payloads must be a positive integer")
    if isinstance(window, bool) or not isinstance(window, (int, float)):
        raise ValueError("rate_limit.window must be a number of seconds")
    if not math.isfinite(window) or window <= 0:
        raise ValueError("rate_limit.window must be positive")
    return RateLimit(payloads=payloads, window=float(window))


_PARSERS: dict[str, Any] = {
    "next_update": _parse_next_update,
    "disabled_keys": _parse_keys,
    "enabled_keys": _parse_keys,
    "stop": _parse_stop,
    "rate_limit": _parse_rate_limit,
}


class Policy:
    """The live policy: a file (optional) plus in-process changes, safe across threads.

    ``update()`` changes fields in-process; when the file changes later, its
    content replaces the whole policy (fields it omits go back to defaults).
    """

    def __init__(self, path: Union[str, os.PathLike[str], None] = None, **fields: Any) -> None:
        """Defaults updated by ``fields``, or, with ``path``, that file, loaded now.

        Raises ``ValueError``/``OSError`` when the initial file is missing or invalid:
        at start there is no previous policy to fall back on.
        """
        if path is not None and fields:
            raise ValueError("give policy fields or a policy file, not both")
        self.path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._rules = PolicyRules().replace(fields)
        self._signature: Optional[_FileSignature] = None
        if self.path is not None:
            self._signature = _signature(self.path)
            self._rules = _read_rules(self.path)

    def __repr__(self) -> str:
        return f"Policy(path={self.path!r}, rules={self._rules!r})"

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike[str]]) -> Policy:
        return cls(path)

    def current(self) -> PolicyRules:
        """The rules in force, re-reading the file first if it changed."""
        with self._lock:
            if self.path is not None:
                self._reload_if_changed(self.path)
            return self._rules

    def update(self, **fields: Any) -> None:
        """Change fields in-process, e.g. ``update(stop=True, next_update=5)``.

        Raises ``ValueError`` for an unknown field or a bad value (nothing changes).
        """
        with self._lock:
            self._rules = self._rules.replace(fields)

    def reset(self) -> None:
        """Back to defaults (the file, if any, is read again on its next change)."""
        with self._lock:
            self._rules = PolicyRules()

    def _reload_if_changed(self, path: str) -> None:
        try:
            signature = _signature(path)
        except OSError as exc:
            if self._signature is not None:
                logger.warning("policy file %s unreadable, keeping previous policy: %s", path, exc)
                self._signature = None
            return
        if signature == self._signature:
            return
        self._signature = signature
        try:
            self._rules = _read_rules(path)
        except (OSError, ValueError) as exc:
            logger.error("policy file %s invalid, keeping previous policy: %s", path, exc)
        else:
            logger.info("policy reloaded from %s", path)


def _signature(path: str) -> _FileSignature:
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)


def _read_rules(path: str) -> PolicyRules:
    with open(path, "rb") as policy_file:
        content = json.load(policy_file)
    if not isinstance(content, dict):
        raise ValueError("a policy file holds a JSON object")
    return PolicyRules().replace(content)
