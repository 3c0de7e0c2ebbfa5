"""The thread-safe, bounded store behind the collection calls — no I/O, no clock.

The collection calls take no lock: each checks its arguments (copying a mutable
value), appends one entry to a queue (a list: ``list.append`` is atomic) and
returns. ``fold`` applies the queued entries to the store, in call order and
under one short lock, when the queue reaches ``FOLD_AT`` entries, before
anything reads or empties the store, and before a call that is decided at once
(a key that is not a ``str``, an invalid value). Every call gets the outcome it
would have had alone: kinds, item accounting, per-key caps, 64-bit saturation
and drops are decided per call. A batch of counter calls only, of appends to
one list, or of ``set_nested`` or ``append_unique`` calls on one key that no cap
can stop is applied at C speed. Warnings are logged after the lock is released:
logging may do I/O.
"""

from __future__ import annotations

import collections
import json
import math
import operator
import threading
from collections.abc import Hashable, Iterable, Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    NamedTuple,
    Optional,
    Set,
    Tuple,
)

from telemetry._log import logger, report_internal_error

if TYPE_CHECKING:
    from telemetry._wire import JSONValue

MAX_KEY_LENGTH = 256
MAX_STRING_LENGTH = 1024
MAX_VALUE_BYTES = 16 * 1024
MAX_DEPTH = 32
DEFAULT_MAX_ITEMS = 100_000
DEFAULT_MAX_VALUES_PER_KEY = 10_000
_MAX_WARNED_KEYS = 1024

VALUE, NESTED, COUNTER, LIST, COUNTING_SET = "value", "mapping", "counter", "list", "counting set"

# Sentinels for "why a write did not happen" that are not the caller's fault.
_DISABLED = "<disabled>"
_FULL = "<full>"
_MISSING = object()
_PLAIN_SCALARS = frozenset({bool, type(None)})
# Every int must fit a signed 64-bit integer: what every store can sum and serve.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
_NUL = "\x00"
_SATURATED = "counter reached the signed 64-bit bound; it stays there and the excess is dropped"
# Queued calls that make the calling thread fold the queue into the store.
FOLD_AT = 4096
# Queue entries: ``key`` (increment), ``(key, amount)`` (add), ``(_SET, key, value)``,
# ``(_NESTED, key, subkey, value)``, ``(_APPEND, key, value)``, ``(_UNIQUE, key, member)``.
_SET, _NESTED, _APPEND, _UNIQUE = object(), object(), object(), object()
_first, _second, _third, _fourth = (operator.itemgetter(index) for index in range(4))
_count_elements = collections._count_elements  # type: ignore[attr-defined]  # Counter's, in C


class _InvalidValue(Exception):
    """A collection value is not an acceptable JSON value (internal signal)."""


def string_problem(text: str) -> Optional[str]:
    """Why a plain ``str`` cannot be stored everywhere (NUL, lone surrogates), or None."""
    if _NUL in text:
        return "string contains U+0000, which not every store can keep"
    if not text.isascii():  # O(1): only non-ASCII text can hold a surrogate
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "string contains a lone surrogate, which has no UTF-8 form"
    return None


def normalize_key(key: object) -> Tuple[str, Optional[str]]:
    """The key as a plain ``str`` and, when it is unusable, why."""
    if not isinstance(key, str):
        return "", f"key must be a str, not {type(key).__name__}"
    if type(key) is not str:
        key = str.__str__(key)
    if not key:
        return key, "key must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return key[:40], f"key is longer than {MAX_KEY_LENGTH} characters"
    problem = string_problem(key)
    if problem is not None:
        return ascii(key)[:60], f"key: {problem}"
    return key, None


def _spend(budget: List[int], size: int) -> None:
    budget[0] -= size
    if budget[0] < 0:
        raise _InvalidValue(f"value is larger than {MAX_VALUE_BYTES} bytes once encoded")


def _plain_string(value: str) -> str:
    if len(value) > MAX_STRING_LENGTH:
        raise _InvalidValue(f"string is longer than {MAX_STRING_LENGTH} characters")
    problem = string_problem(value)
    if problem is not None:
        raise _InvalidValue(problem)
    return value


def _normalize(value: object, depth: int, budget: List[int]) -> JSONValue:
    """A private JSON-ready copy of ``value`` (tuples become lists); raises _InvalidValue.

    ``budget[0]`` is what is left of the size cap, charged a lower bound of each
    part's encoded size, so a huge value (or one that shares a sub-list many
    times over) is refused after O(cap) work instead of being copied whole.
    Subclasses of the JSON types are read through their base type's own
    methods (``list.__iter__``, ``dict.items`` ...): what an override does,
    raising included, never reaches the buffer.
    """
    if type(value) is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _InvalidValue("int does not fit in a signed 64-bit integer")
        _spend(budget, 1)
        return value
    if value is None or type(value) is bool:
        _spend(budget, 1)
        return value
    if type(value) is str:
        _spend(budget, len(value) + 2)
        return _plain_string(value)
    if isinstance(value, float):
        plain_float = float.__float__(value)
        if not math.isfinite(plain_float):
            raise _InvalidValue(f"float {plain_float!r} is not finite")
        _spend(budget, 1)
        return plain_float
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return _normalize(int.__int__(value), depth, budget)
    if isinstance(value, str):
        return _normalize(str.__str__(value), depth, budget)
    if depth >= MAX_DEPTH:
        raise _InvalidValue(f"value is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        items = list.__iter__(value) if isinstance(value, list) else tuple.__iter__(value)
        size = list.__len__(value) if isinstance(value, list) else tuple.__len__(value)
        _spend(budget, 1 + size)  # brackets and separators
        return [_normalize(item, depth + 1, budget) for item in items]
    if isinstance(value, dict):
        _spend(budget, 1 + 2 * dict.__len__(value))  # braces, separators and colons
        normalized: Dict[str, JSONValue] = {}
        for name, item in dict.items(value):
            if not isinstance(name, str):
                raise _InvalidValue(f"mapping key {name!r} is not a str")
            plain_name = str.__str__(name)
            _spend(budget, len(plain_name) + 2)
            normalized[_plain_string(plain_name)] = _normalize(item, depth + 1, budget)
        return normalized
    raise _InvalidValue(f"{type(value).__name__} is not a JSON value")


def normalize_value(value: object) -> Tuple[JSONValue, Optional[str]]:
    """A JSON-ready private copy of ``value`` and, when it is unacceptable, why."""
    try:
        normalized = _normalize(value, 0, [MAX_VALUE_BYTES])
    except _InvalidValue as exc:
        return None, str(exc)
    except RecursionError:
        return None, "value is nested too deeply"
    except Exception as exc:  # e.g. a subclass whose __class__ or a member's repr raises
        return None, f"value could not be read ({type(exc).__name__})"
    if isinstance(normalized, (list, dict)):
        text = json.dumps(normalized, ensure_ascii=False, separators=(",", ":"))
        if len(text.encode("utf-8")) > MAX_VALUE_BYTES:
            return None, f"value is larger than {MAX_VALUE_BYTES} bytes once encoded"
    return normalized, None


def checked_value(value: object) -> Tuple[JSONValue, Optional[str]]:
    """``normalize_value`` with a quick exit for the common scalars."""
    kind = type(value)
    if (
        (kind is str and len(value) <= MAX_STRING_LENGTH  # type: ignore[arg-type]
         and value.isascii() and _NUL not in value)  # type: ignore[attr-defined,operator]
        or (kind is int and _INT_MIN <= value <= _INT_MAX)  # type: ignore[operator]
        or kind in _PLAIN_SCALARS
    ):
        return value, None  # type: ignore[return-value]
    return normalize_value(value)


def _checked_for_queue(value: object) -> Tuple[JSONValue, Optional[str], bool]:
    """``checked_value`` (off the inlined fast path), and whether the result may be queued.

    A copied list or mapping (up to 16 KiB) is applied at once, never queued:
    the queue's ``FOLD_AT`` entries stay small.
    """
    normalized, problem = checked_value(value)
    return normalized, problem, type(normalized) is not list and type(normalized) is not dict


def _member_key(value: JSONValue) -> Hashable:
    """Dictionary key for a counting-set member: 1, 1.0 and True stay distinct."""
    kind = type(value)
    if kind is str or kind is int:
        return value  # type: ignore[return-value]
    return (kind.__name__, value)


def member_value(member: Hashable) -> JSONValue:
    """The value a counting-set member was stored for (undoes ``_member_key``)."""
    return member[1] if type(member) is tuple else member  # type: ignore[return-value]


class _Store:
    """The buffered data, one dictionary per kind. Swapped out whole by a snapshot."""

    __slots__ = ("counters", "lists", "nested", "sets", "values")

    def __init__(self) -> None:
        self.values: Dict[str, JSONValue] = {}
        self.nested: Dict[str, Dict[str, JSONValue]] = {}
        self.counters: Dict[str, int] = {}
        self.lists: Dict[str, List[JSONValue]] = {}
        self.sets: Dict[str, Dict[Hashable, int]] = {}

    def _tables(self) -> Tuple[Tuple[str, Mapping[str, object]], ...]:
        return (
            (VALUE, self.values),
            (NESTED, self.nested),
            (COUNTER, self.counters),
            (LIST, self.lists),
            (COUNTING_SET, self.sets),
        )

    def kind_of(self, key: str) -> Optional[str]:
        for kind, table in self._tables():
            if key in table:
                return kind
        return None

    def keys(self) -> List[str]:
        return [key for _, table in self._tables() for key in table]

    def pop(self, key: str) -> int:
        """Remove ``key``; returns how many items it held."""
        for scalar_table in (self.values, self.counters):
            if scalar_table.pop(key, _MISSING) is not _MISSING:
                return 1
        for container_table in (self.nested, self.lists, self.sets):
            container = container_table.pop(key, None)
            if container is not None:
                return 1 + len(container)
        return 0


class Snapshot(NamedTuple):
    """What ``Buffer.take`` removed: the data as stored, its item count, drops since last take.

    ``plain_tables`` (values, mappings, counters, lists) hold wire values already;
    ``counting_sets`` map each stored member (``member_value`` gives its value) to
    its count. ``_wire.wire_data`` puts them in the wire's shapes.
    """

    plain_tables: Tuple[Dict[str, Any], ...]
    counting_sets: Dict[str, Dict[Hashable, int]]
    items: int
    dropped: int


def _amount_problem(amount: object) -> Optional[str]:
    """Why ``amount`` cannot be added to a counter, or None."""
    if type(amount) is not int:
        return f"add() takes an int amount, not {type(amount).__name__}"
    if not _INT_MIN <= amount <= _INT_MAX:
        return "add() amount does not fit in a signed 64-bit integer"
    return None


def _subkey_problem(subkey: str) -> Optional[str]:
    """Why a new ``set_nested`` subkey (a plain ``str``) is invalid, or None."""
    if 0 < len(subkey) <= MAX_KEY_LENGTH and subkey.isascii() and _NUL not in subkey:
        return None  # ``normalize_key``'s common case, inlined
    problem = normalize_key(subkey)[1]
    return problem and "sub" + problem


def _entry(op: Any) -> Tuple[Any, Any]:
    """The key and amount of a queue entry: a key (``increment``) or ``(key, amount)``."""
    return (op, 1) if type(op) is str else op


def _sum_counts(counts: Dict[Any, int]) -> Optional[Dict[str, List[int]]]:
    """Per key of the counted queue entries: [calls, total, positive part, negative part].

    None when a key is not a plain ``str`` or an amount does not fit 64 bits: then
    the calls replay one by one. (A ``str`` subclass key equal to a plain key is
    counted under the plain key, as the store's dictionary would.)
    """
    sums: Dict[str, List[int]] = {}
    for op, calls in counts.items():
        if type(op) is str:
            key, amount = op, 1
        elif len(op) == 2:
            key, amount = op
            if type(key) is not str or not _INT_MIN <= amount <= _INT_MAX:
                return None
        else:  # another kind of call
            return None
        entry = sums.get(key)
        if entry is None:
            entry = sums[key] = [0, 0, 0, 0]
        change = amount * calls
        entry[0] += calls
        entry[1] += change
        entry[2 if change > 0 else 3] += change
    return sums


class Buffer:
    """Thread-safe, bounded collection buffer with item accounting (README.md, "API")."""

    def __init__(
        self,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_values_per_key: int = DEFAULT_MAX_VALUES_PER_KEY,
        disabled_keys: Iterable[str] = (),
    ) -> None:
        self.max_items = max_items
        self.max_values_per_key = max_values_per_key
        self.app_disabled_keys: FrozenSet[str] = frozenset(disabled_keys)
        self._server_disabled_keys: FrozenSet[str] = frozenset()
        self._lock = threading.Lock()
        self._store = _Store()
        self._items = 0
        self._dropped = 0
        self._warned_keys: Set[str] = set()
        self._warned_full = False
        self._collecting = True
        self._new_queue()

    def _new_queue(self) -> None:
        # The lock-free part: the collection calls append to ``_queue`` (see the
        # entries' shapes by ``_SET``); only ``fold``, one at a time, removes.
        self._queue: List[object] = []
        self._fold_lock = threading.Lock()

    def configure(
        self, *, max_items: int, max_values_per_key: int, disabled_keys: Iterable[str]
    ) -> None:
        """Set the caps and the application's disabled keys (before any collection)."""
        self.max_items = max_items
        self.max_values_per_key = max_values_per_key
        self.app_disabled_keys = frozenset(disabled_keys)

    def set_collecting(self, collecting: bool) -> None:
        """Whether the collection calls store anything; when not, they return at once."""
        self._collecting = collecting

    @property
    def collecting(self) -> bool:
        """Whether the collection calls store anything (``set_collecting``)."""
        return self._collecting

    # -- the collection calls -------------------------------------------------
    # Each call does at once only what cannot wait: the checks of its argument
    # types and of its value (a mutable value is copied now), then it appends
    # one entry to the queue, taking no lock. ``fold`` applies the entries in
    # call order. A call the slow path must refuse at once (a key that is not a
    # ``str``, an invalid value) or whose value is a copied container folds the
    # queue first, then takes ``_write_now``.

    def increment(self, key: object) -> None:
        """Add 1 to the integer counter ``key``."""
        if not self._collecting:
            return
        if type(key) is str:
            queue = self._queue
            queue.append(key)
            if len(queue) >= FOLD_AT:
                self.fold()
            return
        try:
            self._write_now(key, COUNTER, None, self._new_count, 1)
        except Exception as exc:
            report_internal_error("increment", exc)

    def add(self, key: object, amount: object) -> None:
        """Add ``amount`` to the integer counter ``key``; a new key starts at ``amount``."""
        if not self._collecting:
            return
        if type(amount) is int:
            queue = self._queue
            queue.append((key, amount))  # the key and the amount's range are checked by ``fold``
            if len(queue) >= FOLD_AT:
                self.fold()
            return
        try:
            self._write_now(key, COUNTER, _amount_problem(amount), self._new_count, amount)
        except Exception as exc:
            report_internal_error("add", exc)

    def set(self, key: object, value: object) -> None:
        """Store ``value`` under ``key``, overwriting."""
        if not self._collecting:
            return
        try:
            if (type(value) is str and len(value) <= MAX_STRING_LENGTH  # ``checked_value``'s
                    and value.isascii() and _NUL not in value):  # common case, inlined
                normalized: JSONValue = value
                problem = None
                small = True
            else:
                normalized, problem, small = _checked_for_queue(value)
            if small and problem is None and type(key) is str:
                queue = self._queue
                queue.append((_SET, key, normalized))
                if len(queue) >= FOLD_AT:
                    self.fold()
                return
            self._write_now(key, VALUE, problem, self._new_value, normalized)
        except Exception as exc:
            report_internal_error("set", exc)

    def set_nested(self, key: object, subkey: object, value: object) -> None:
        """Store ``value`` under ``key`` → ``subkey``."""
        if not self._collecting:
            return
        try:
            # A new subkey is checked by ``fold``: a subkey already there is valid.
            if (type(key) is str and type(subkey) is str  # ``checked_value``'s common
                    and type(value) is str and len(value) <= MAX_STRING_LENGTH  # case, inlined
                    and value.isascii() and _NUL not in value):
                queue = self._queue
                queue.append((_NESTED, key, subkey, value))
                if len(queue) >= FOLD_AT:
                    self.fold()
                return
            normalized, problem, small = _checked_for_queue(value)
            if small and problem is None and type(key) is str and type(subkey) is str:
                queue = self._queue
                queue.append((_NESTED, key, subkey, normalized))
                if len(queue) >= FOLD_AT:
                    self.fold()
                return
            subname, subkey_problem = normalize_key(subkey)
            problem = (subkey_problem and "sub" + subkey_problem) or problem
            self._write_now(key, NESTED, problem, self._new_nested, subname, normalized)
        except Exception as exc:
            report_internal_error("set_nested", exc)

    def append(self, key: object, value: object) -> None:
        """Append ``value`` to the list ``key``."""
        if not self._collecting:
            return
        try:
            if (type(value) is str and len(value) <= MAX_STRING_LENGTH  # ``checked_value``'s
                    and value.isascii() and _NUL not in value):  # common case, inlined
                normalized: JSONValue = value
                problem = None
                small = True
            else:
                normalized, problem, small = _checked_for_queue(value)
            if small and problem is None and type(key) is str:
                queue = self._queue
                queue.append((_APPEND, key, normalized))
                if len(queue) >= FOLD_AT:
                    self.fold()
                return
            self._write_now(key, LIST, problem, self._new_element, normalized)
        except Exception as exc:
            report_internal_error("append", exc)

    def append_unique(self, key: object, value: object) -> None:
        """Add ``value`` to the counting set ``key``, counting how often each value came."""
        if not self._collecting:
            return
        try:
            kind = type(value)
            if type(key) is str and (  # ``checked_value``'s common cases, inlined:
                    (kind is str and len(value) <= MAX_STRING_LENGTH  # type: ignore[arg-type]
                     and value.isascii() and _NUL not in value)  # type: ignore[attr-defined,operator]
                    or (kind is int and _INT_MIN <= value <= _INT_MAX)):  # type: ignore[operator]
                queue = self._queue  # a plain str or int is its own member key
                queue.append((_UNIQUE, key, value))
                if len(queue) >= FOLD_AT:
                    self.fold()
                return
            normalized, problem = checked_value(value)
            if problem is None and isinstance(normalized, (list, dict)):
                problem = "append_unique() takes a scalar (hashable) value"
            member = _member_key(normalized)
            if problem is None and type(key) is str:
                queue = self._queue
                queue.append((_UNIQUE, key, member))
                if len(queue) >= FOLD_AT:
                    self.fold()
                return
            self._write_now(key, COUNTING_SET, problem, self._new_member, member)
        except Exception as exc:
            report_internal_error("append_unique", exc)

    # -- folding the queue ----------------------------------------------------

    def fold(self) -> None:
        """Apply the queued calls to the store, each with the outcome it would have had alone.

        A batch of counter calls only is counted at C speed (repeats of one
        entry cost no Python work), summed per key, and the store is touched
        once per key; appends to one list, and ``set_nested`` or
        ``append_unique`` calls on one key, are applied at C speed when no cap
        can stop one of them; any other batch is applied entry by entry, in call
        order, under one lock acquisition. Warnings are logged after the lock is
        released.
        """
        try:
            with self._fold_lock:
                queue = self._queue
                # Other threads only append: the first ``taken`` entries are these
                # ``ops`` until this fold removes them, and entries appended
                # meanwhile stay for the next fold. Copy and removal are C speed.
                taken = len(queue)
                if not taken:
                    return
                ops = queue[:taken]
                del queue[:taken]
                if not (self._fold_counters(ops) or self._fold_appends(ops)
                        or self._fold_one_key(ops)):
                    self._fold_in_order(ops)
        except Exception as exc:
            report_internal_error("fold", exc)

    def _fold_counters(self, ops: List[Any]) -> bool:
        """Fold ``ops`` if they are all plain counter calls; False (nothing done) if not.

        A key whose sums could cross a signed 64-bit bound on the way is
        replayed call by call, so saturation drops exactly the calls it would
        have. New keys are admitted in the order of their first call.
        """
        for end in (ops[0], ops[-1]):
            if type(end) is tuple and len(end) > 2:
                return False  # another kind of call is in the batch: no use counting
        counts: Dict[object, int] = {}
        try:
            _count_elements(counts, ops)
            sums = _sum_counts(counts)
        except Exception:  # an unhashable value, or a key that cannot be hashed or compared
            return False
        if sums is None:
            return False
        warnings: List[Tuple[str, str]] = []
        replay: Set[str] = set()
        with self._lock:
            counters = self._store.counters
            for key, (calls, total, up, down) in sums.items():
                current = counters.get(key)
                if current is None:
                    name, problem = normalize_key(key)
                    if problem is None:
                        problem = self._check(name, COUNTER) or self._admit(1)
                    if problem is not None:
                        if problem is not _DISABLED:
                            self._dropped += calls
                            warnings.append((name, problem))
                        continue
                    current = counters[key] = 0
                if current + up <= _INT_MAX and current + down >= _INT_MIN:
                    counters[key] = current + total
                else:
                    replay.add(key)
            for op in ops if replay else ():
                key, amount = _entry(op)
                if key in replay:
                    total = counters[key] + amount
                    if _INT_MIN <= total <= _INT_MAX:
                        counters[key] = total
                    else:
                        counters[key] = _INT_MAX if total > 0 else _INT_MIN
                        self._dropped += 1
                        warnings.append((key, _SATURATED))
        for name, problem in warnings:
            self._warn(name, problem)
        return True

    def _fold_appends(self, ops: List[Any]) -> bool:
        """Fold ``ops`` at C speed if they all append to one existing list with room
        for every one of them; False (nothing done) if not.
        """
        for end in (ops[0], ops[-1]):  # a quick look first: most mixed batches end here
            if type(end) is not tuple or end[0] is not _APPEND:
                return False
        try:
            if set(map(_first, ops)) != {_APPEND}:
                return False
            keys = set(map(_second, ops))
            values = list(map(_third, ops))  # raises (so nothing is done) for a short entry
        except Exception:  # an increment of "" (no first character), or an add entry
            return False
        if len(keys) != 1:
            return False
        with self._lock:
            elements = self._store.lists.get(keys.pop())
            if (elements is None or len(elements) + len(values) > self.max_values_per_key
                    or self._items + len(values) > self.max_items):
                return False
            elements.extend(values)
            self._items += len(values)
        return True

    def _fold_one_key(self, ops: List[Any]) -> bool:
        """Fold ``ops`` at C speed if they are all ``set_nested`` calls, or all
        ``append_unique`` calls, on one key the store holds with that kind, and
        no cap can stop one of them; False (nothing done) if not.

        Then call order matters only within the key, and the C-speed steps keep
        it: repeats of a subkey collapse to the last value (new subkeys in the
        order of their first call), and ``Counter``'s counting adds up members.
        Only the new subkeys are checked (a subkey already held is valid); the
        calls checked their members. A batch that might reach a cap replays.
        """
        first, last = ops[0], ops[-1]
        if type(first) is not tuple or type(last) is not tuple:
            return False
        tag = first[0]
        if (tag is not _UNIQUE and tag is not _NESTED) or last[0] is not tag:
            return False  # a quick look first: most other batches end here
        key, calls = first[1], len(ops)
        try:
            if (operator.countOf(map(_first, ops), tag) != calls
                    or operator.countOf(map(_second, ops), key) != calls):
                return False
            latest = dict(zip(map(_third, ops), map(_fourth, ops))) if tag is _NESTED else None
        except Exception:  # an increment of "" (no first character), a short entry, an add's key
            return False
        with self._lock:
            if latest is None:
                counts = self._store.sets.get(key)
                if counts is None:
                    return False
                held = len(counts)
                if not (self._room_for(held, calls)  # the exact count only near a cap:
                        or self._room_for(held, len(set(map(_third, ops)).difference(counts)))):
                    return False
                _count_elements(counts, map(_third, ops))
                self._items += len(counts) - held
                return True
            mapping = self._store.nested.get(key)
            if mapping is None:
                return False
            new = set(latest).difference(mapping)
            if new and (not self._room_for(len(mapping), len(new))
                        or any(map(_subkey_problem, new))):
                return False
            mapping.update(latest)
            self._items += len(new)
        return True

    def _room_for(self, held: int, new: int) -> bool:
        """Whether a key holding ``held`` members can take ``new`` more, caps and budget alike."""
        return held + new <= self.max_values_per_key and self._items + new <= self.max_items

    def _fold_in_order(self, ops: List[Any]) -> None:
        """Apply ``ops`` one by one in call order: the common cases inline, the rest ``_decide``."""
        warnings: List[Tuple[str, str]] = []
        with self._lock:
            store = self._store
            counters, values, nested = store.counters, store.values, store.nested
            lists, sets = store.lists, store.sets
            cap, room = self.max_values_per_key, self.max_items - self._items
            # ``room`` is ``max_items - self._items``, kept in a local across the
            # inline cases and written back around ``_decide`` (which admits too).
            try:
                for op in ops:
                    if type(op) is str:  # increment
                        current = counters.get(op)
                        if current is not None and current < _INT_MAX:
                            counters[op] = current + 1
                            continue
                        args: Tuple[Any, ...] = (op, COUNTER, None, self._new_count, 1)
                    else:
                        tag = op[0]
                        if tag is _APPEND:
                            _, key, value = op
                            elements = lists.get(key)
                            if elements is not None and len(elements) < cap and room > 0:
                                room -= 1  # ``_admit_member``, inlined for the common case
                                elements.append(value)
                                continue
                            args = (key, LIST, None, self._new_element, value)
                        elif tag is _SET:
                            _, key, value = op
                            if key in values:
                                values[key] = value
                                continue
                            args = (key, VALUE, None, self._new_value, value)
                        elif tag is _UNIQUE:
                            _, key, member = op
                            counts = sets.get(key)
                            if counts is not None:
                                count = counts.get(member)
                                if count is not None:
                                    counts[member] = count + 1
                                    continue
                                if len(counts) < cap and room > 0:
                                    room -= 1  # a queued member was checked by the call
                                    counts[member] = 1
                                    continue
                            args = (key, COUNTING_SET, None, self._new_member, member)
                        elif tag is _NESTED:
                            _, key, subname, value = op
                            mapping = nested.get(key)
                            if mapping is not None:
                                if subname in mapping:
                                    mapping[subname] = value
                                    continue
                                problem = _subkey_problem(subname)
                                if problem is None and len(mapping) < cap and room > 0:
                                    room -= 1
                                    mapping[subname] = value
                                    continue
                            else:
                                problem = _subkey_problem(subname)
                            args = (key, NESTED, problem, self._new_nested, subname, value)
                        else:  # add: (key, amount)
                            key, amount = op
                            current = counters.get(key) if type(key) is str else None
                            if (current is not None and _INT_MIN <= amount <= _INT_MAX
                                    and _INT_MIN <= current + amount <= _INT_MAX):
                                counters[key] = current + amount
                                continue
                            args = (key, COUNTER, _amount_problem(amount), self._new_count, amount)
                    self._items = self.max_items - room
                    warning = self._decide(*args)
                    room = self.max_items - self._items
                    if warning is not None:
                        warnings.append(warning)
            finally:
                self._items = self.max_items - room
        for name, problem in warnings:
            self._warn(name, problem)

    # -- the slow path ----------------------------------------------------------

    def _write_now(
        self,
        key: object,
        kind: str,
        problem: Optional[str],
        write: Callable[..., Optional[str]],
        *args: Any,
    ) -> None:
        """A call decided at once: fold the queue (those calls came first), then ``_decide``.

        Always through ``fold``: even with the queue empty, a fold in another
        thread may be applying this thread's earlier calls; it waits for that.
        """
        self.fold()
        with self._lock:
            warning = self._decide(key, kind, problem, write, *args)
        if warning is not None:
            self._warn(*warning)

    def _decide(
        self,
        key: object,
        kind: str,
        problem: Optional[str],
        write: Callable[..., Optional[str]],
        *args: Any,
    ) -> Optional[Tuple[str, str]]:
        """Validate ``key``, then ``write(name, *args)``; the lock is held.

        ``write`` returns why it could not write (full, per-key cap) or None. A
        failed write is counted as dropped; the returned (key, problem) is for
        ``_warn`` (once per key), after the lock is released.
        """
        name, key_problem = normalize_key(key)
        if key_problem is None and self.is_disabled(name):
            return None  # dropped silently, whatever the value: the key is not wanted at all
        problem = key_problem or problem
        if problem is None:
            problem = self._check(name, kind) or write(name, *args)
            if problem is None:
                return None
        if problem is not _DISABLED:
            self._dropped += 1
        return name, problem

    # The ``write`` callbacks of ``_decide``; called with the lock held. Each
    # also handles the key having appeared since the caller's fast path looked.

    def _new_count(self, name: str, amount: int) -> Optional[str]:
        counters = self._store.counters
        if name not in counters:
            problem = self._admit(1)
            if problem is not None:
                return problem
            counters[name] = 0
        total = counters[name] + amount
        if not _INT_MIN <= total <= _INT_MAX:
            counters[name] = _INT_MAX if total > 0 else _INT_MIN
            return _SATURATED
        counters[name] = total
        return None

    def _new_value(self, name: str, value: JSONValue) -> Optional[str]:
        values = self._store.values
        problem = None if name in values else self._admit(1)
        if problem is None:
            values[name] = value
        return problem

    def _new_nested(self, name: str, subname: str, value: JSONValue) -> Optional[str]:
        mapping = self._store.nested.get(name)
        if mapping is None:
            problem = self._admit_first_member()
            if problem is None:
                self._store.nested[name] = {subname: value}
            return problem
        problem = None if subname in mapping else self._admit_member(len(mapping))
        if problem is None:
            mapping[subname] = value
        return problem

    def _new_element(self, name: str, value: JSONValue) -> Optional[str]:
        values = self._store.lists.get(name)
        if values is None:
            problem = self._admit_first_member()
            if problem is None:
                self._store.lists[name] = [value]
            return problem
        problem = self._admit_member(len(values))
        if problem is None:
            values.append(value)
        return problem

    def _new_member(self, name: str, member: Hashable) -> Optional[str]:
        counts = self._store.sets.get(name)
        if counts is None:
            problem = self._admit_first_member()
            if problem is None:
                self._store.sets[name] = {member: 1}
            return problem
        if member in counts:
            counts[member] += 1
            return None
        problem = self._admit_member(len(counts))
        if problem is None:
            counts[member] = 1
        return problem

    # -- accounting (called with the lock held) -------------------------------

    def _check(self, key: str, kind: str) -> Optional[str]:
        """Why ``key`` cannot take a write of ``kind`` now, or None."""
        if self.is_disabled(key):
            return _DISABLED
        existing = self._store.kind_of(key)
        if existing is not None and existing != kind:
            return f"key holds a {existing}, not a {kind}"
        return None

    def _admit(self, items: int) -> Optional[str]:
        if self._items + items > self.max_items:
            return _FULL
        self._items += items
        return None

    def _admit_member(self, held: int) -> Optional[str]:
        if held >= self.max_values_per_key:
            return f"key already holds {self.max_values_per_key} values (max_values_per_key)"
        return self._admit(1)

    def _admit_first_member(self) -> Optional[str]:
        """A new container key with its first member: two items."""
        if self.max_values_per_key < 1:
            return "max_values_per_key is 0: the key cannot hold a value"
        return self._admit(2)

    # -- logging (called without the lock) ------------------------------------

    def _warn(self, key: str, problem: str) -> None:
        if problem is _DISABLED:
            return
        if problem is _FULL:
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "telemetry buffer is full (max_items=%d); new items are dropped and counted "
                    "until the next send",
                    self.max_items,
                )
            return
        if key in self._warned_keys:
            return
        if len(self._warned_keys) >= _MAX_WARNED_KEYS:
            return
        self._warned_keys.add(key)
        logger.warning("telemetry key %r: %s; call ignored (further warnings for it are muted)",
                       key, problem)

    # -- the rest of the buffer's interface -----------------------------------

    def is_disabled(self, key: str) -> bool:
        """Whether ``key`` or its part before the first ``:`` is disabled."""
        prefix = key.partition(":")[0]
        for disabled in (self.app_disabled_keys, self._server_disabled_keys):
            if key in disabled or prefix in disabled:
                return True
        return False

    @property
    def server_disabled_keys(self) -> FrozenSet[str]:
        return self._server_disabled_keys

    def disable_keys(self, keys: Iterable[str]) -> None:
        """Server-disable ``keys``: drop what they hold and refuse them from now on."""
        self.fold()  # calls made before the disable are kept until it drops them
        with self._lock:
            self._server_disabled_keys = self._server_disabled_keys | frozenset(keys)
            # Copying the key list is C-speed; the per-key test runs off the lock.
            candidates = self._store.keys()
        doomed = [key for key in candidates if self.is_disabled(key)]
        if doomed:
            with self._lock:
                for key in doomed:
                    self._items -= self._store.pop(key)

    def enable_keys(self, keys: Iterable[str]) -> None:
        """Lift a server disable of ``keys`` (application-disabled keys stay disabled)."""
        self.fold()  # calls made while disabled stay dropped
        with self._lock:
            self._server_disabled_keys = self._server_disabled_keys - frozenset(keys)

    def take(self) -> Snapshot:
        """Remove and return everything buffered; O(1) under the lock, no copy.

        Queued calls are folded in first (by the caller: the emitter's thread).
        """
        self.fold()
        with self._lock:
            store, self._store = self._store, _Store()
            items, self._items = self._items, 0
            dropped, self._dropped = self._dropped, 0
            self._warned_full = False
        plain = (store.values, store.nested, store.counters, store.lists)
        return Snapshot(plain, store.sets, items, dropped)

    def has_data(self) -> bool:
        """Whether a snapshot now would carry anything (queued calls, items or drop counts).

        Read in the direction calls move (queue, then a fold in progress, then
        the store), so a call on its way from the queue to the store is seen.
        """
        return (bool(self._queue) or self._fold_lock.locked()
                or self._items > 0 or self._dropped > 0)

    def count_dropped(self, items: int) -> None:
        """Add ``items`` lost outside the buffer (e.g. a rejected payload) to the next report."""
        with self._lock:
            self._dropped += items

    def reset(self) -> None:
        """Empty the buffer (drop counts still reach the server)."""
        self.fold()  # the queued calls' drops are decided; then their data goes
        with self._lock:
            self._store = _Store()
            self._items = 0
            self._warned_full = False

    @property
    def item_count(self) -> int:
        self.fold()
        return self._items

    @property
    def dropped(self) -> int:
        self.fold()
        return self._dropped

    def after_fork_in_child(self) -> None:
        """Start empty with fresh locks: the parent's threads may have held the old ones."""
        self._new_queue()  # the parent's queued calls are the parent's
        self._lock = threading.Lock()
        self._store = _Store()
        self._items = 0
        self._dropped = 0
        self._warned_full = False
