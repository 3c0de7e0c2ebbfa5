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

Bound to a store (``Policy.bind``, which the app does), the policy lives in the
store: the file or the constructor's fields seed it only when the store holds
no policy yet, a later change of the file is applied as one more change, and
every process re-reads it at most ``refresh`` seconds after it changed
elsewhere. Every change is kept with its time and source (``http``, ``file``,
or ``api`` for ``update()``/``reset()`` in-process) in ``policy_changes``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple, Union

from ._storage import Runner, format_time

__all__ = [
    "DEFAULT_NEXT_UPDATE",
    "Policy",
    "PolicyRules",
    "PolicyStore",
    "RateLimit",
]

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

    def to_fields(self) -> Dict[str, Any]:
        """The whole policy in its file/JSON form (what ``GET /v1/policy`` answers)."""
        next_update: Union[int, float] = self.next_update
        if self.next_update.is_integer():
            next_update = int(self.next_update)
        stop: Union[bool, List[str]] = (
            self.stop if isinstance(self.stop, bool) else sorted(self.stop)
        )
        rate_limit: Optional[Dict[str, Any]] = None
        if self.rate_limit is not None:
            window = self.rate_limit.window
            rate_limit = {
                "payloads": self.rate_limit.payloads,
                "window": int(window) if window.is_integer() else window,
            }
        return {
            "next_update": next_update,
            "disabled_keys": list(self.disabled_keys),
            "enabled_keys": list(self.enabled_keys),
            "stop": stop,
            "rate_limit": rate_limit,
        }

    @classmethod
    def from_fields(cls, fields: object) -> PolicyRules:
        """A whole policy from its JSON form: missing fields take their defaults.

        Raises ``ValueError`` saying what is wrong (not an object, an unknown field,
        a bad value).
        """
        if not isinstance(fields, Mapping):
            raise ValueError("a policy is a JSON object")
        return cls().replace(fields)

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


class PolicyStore(Protocol):
    """What ``Policy`` needs of a store: a transaction that changes one thing at a time."""

    def writing(self) -> AbstractContextManager[Runner]:
        """A write transaction, serialised with every other one (across processes too)."""
        ...

    def reading(self) -> AbstractContextManager[Runner]:
        """A read-only transaction on one snapshot."""
        ...


# The stores create the table: policy_changes (seq, changed_at, source, policy).
SOURCES = ("http", "file", "api")


def _stored_rules(run: Runner) -> Optional[PolicyRules]:
    rows = run.fetchall("SELECT policy FROM policy_changes ORDER BY seq DESC LIMIT 1")
    if not rows:
        return None
    return PolicyRules.from_fields(json.loads(rows[0][0]))


def _record(run: Runner, rules: PolicyRules, source: str) -> None:
    changed_at = format_time(datetime.now(timezone.utc))
    run.execute(
        "INSERT INTO policy_changes (changed_at, source, policy) VALUES (?, ?, ?)",
        (changed_at, source, json.dumps(rules.to_fields(), separators=(",", ":"))),
    )


class Policy:
    """The live policy: a file (optional) plus in-process changes, safe across threads.

    ``update()`` changes fields in-process; when the file changes later, its
    content replaces the whole policy (fields it omits go back to defaults).
    Once bound to a store (``bind``), the store holds it (see the module's doc).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str], None] = None,
        *,
        refresh: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        """Defaults updated by ``fields``, or, with ``path``, that file, loaded now.

        ``refresh``: at most this many seconds pass, once bound to a store, before
        a change made elsewhere (another worker) applies here. Raises
        ``ValueError``/``OSError`` when the initial file is missing or invalid:
        at start there is no previous policy to fall back on.
        """
        if path is not None and fields:
            raise ValueError("give policy fields or a policy file, not both")
        self.path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._rules = PolicyRules().replace(fields)
        self._seeded_by = "api" if fields else None
        self._signature: Optional[_FileSignature] = None
        self._store: Optional[PolicyStore] = None
        self._refresh = refresh
        self._clock = clock
        self._fetched_at = 0.0
        if self.path is not None:
            self._signature = _signature(self.path)
            self._rules = _read_rules(self.path)
            self._seeded_by = "file"

    def __repr__(self) -> str:
        return f"Policy(path={self.path!r}, rules={self._rules!r})"

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike[str]]) -> Policy:
        return cls(path)

    def bind(self, store: PolicyStore) -> None:
        """Keep the policy in ``store`` from now on, seeding it when it holds none yet."""
        with self._lock:
            self._store = store
            with store.writing() as run:
                stored = _stored_rules(run)
                if stored is None and self._seeded_by is not None:
                    _record(run, self._rules, self._seeded_by)
                    stored = self._rules
            self._rules = stored if stored is not None else PolicyRules()
            self._fetched_at = self._clock()

    def current(self) -> PolicyRules:
        """The rules in force, re-reading the file first if it changed."""
        with self._lock:
            if self.path is not None:
                self._reload_if_changed(self.path)
            if self._store is not None and not (
                0 <= self._clock() - self._fetched_at < self._refresh
            ):
                with self._store.reading() as run:
                    self._rules = _stored_rules(run) or PolicyRules()
                self._fetched_at = self._clock()
            return self._rules

    def update(self, **fields: Any) -> None:
        """Change fields in-process, e.g. ``update(stop=True, next_update=5)``.

        Raises ``ValueError`` for an unknown field or a bad value (nothing changes).
        """
        with self._lock:
            if self._store is None:
                self._rules = self._rules.replace(fields)
                return
            with self._store.writing() as run:
                rules = (_stored_rules(run) or PolicyRules()).replace(fields)
                _record(run, rules, "api")
            self._set(rules)

    def set(self, fields: object, source: str = "http") -> PolicyRules:
        """Replace the whole policy with ``fields`` (its JSON form; omitted fields take
        their defaults); the new rules. Raises ``ValueError`` saying what is wrong."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        rules = PolicyRules.from_fields(fields)
        with self._lock:
            if self._store is not None:
                with self._store.writing() as run:
                    _record(run, rules, source)
            self._set(rules)
        return rules

    def reset(self) -> None:
        """Back to defaults (the file, if any, is read again on its next change)."""
        if self._store is not None:
            self.set({}, "api")
            return
        with self._lock:
            self._rules = PolicyRules()

    def history(self, limit: int = 100) -> List[Dict[str, Any]]:
        """The latest ``limit`` changes kept in the store, newest first:
        ``{"time", "source", "policy", "changed"}`` (``changed``: the fields that differ
        from the policy before it). Empty when not bound to a store."""
        if self._store is None:
            return []
        with self._store.reading() as run:
            rows = run.fetchall(
                "SELECT changed_at, source, policy FROM policy_changes"
                " ORDER BY seq DESC LIMIT ?",
                (limit + 1,),
            )
        changes = []
        policies = [json.loads(policy) for _, _, policy in rows]
        for index, (changed_at, source, _) in enumerate(rows[:limit]):
            before = (
                policies[index + 1] if index + 1 < len(policies) else PolicyRules().to_fields()
            )
            after = policies[index]
            changed = [name for name in PolicyRules.FIELDS if after.get(name) != before.get(name)]
            changes.append(
                {"time": changed_at, "source": source, "policy": after, "changed": changed}
            )
        return changes

    def _set(self, rules: PolicyRules) -> None:
        self._rules = rules
        self._fetched_at = self._clock()

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
            rules = _read_rules(path)
        except (OSError, ValueError) as exc:
            logger.error("policy file %s invalid, keeping previous policy: %s", path, exc)
            return
        if self._store is not None:
            # Every worker sees the change; the first one to get here records it.
            with self._store.writing() as run:
                if _stored_rules(run) != rules:
                    _record(run, rules, "file")
        self._set(rules)
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
