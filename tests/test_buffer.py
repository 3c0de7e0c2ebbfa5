"""``Buffer``: every rule of README.md "API", on the buffer directly."""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import Taken, taken, typed

from telemetry._buffer import Buffer

Call = Callable[[Buffer, Any], None]

# One collection call of each kind, on a key; what it stores and how many items a new key costs.
CALLS: Dict[str, Tuple[Call, Any, int]] = {
    "set": (lambda b, k: b.set(k, "v"), "v", 1),
    "set_nested": (lambda b, k: b.set_nested(k, "sub", 1), {"sub": 1}, 2),
    "add": (lambda b, k: b.add(k, 5), 5, 1),
    "increment": (lambda b, k: b.increment(k), 1, 1),
    "append": (lambda b, k: b.append(k, "e"), ["e"], 2),
    "append_unique": (lambda b, k: b.append_unique(k, "u"), [{"value": "u", "count": 1}], 2),
}
KINDS = sorted(CALLS)
# What kind of thing each call leaves under its key (add and increment share one).
KIND_OF = {name: ("counter" if name in ("add", "increment") else name) for name in CALLS}



def call(name: str, buffer: Buffer, key: Any) -> None:
    CALLS[name][0](buffer, key)


def warnings_about(caplog: pytest.LogCaptureFixture, key: str) -> List[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "telemetry"
        and record.levelno == logging.WARNING
        and repr(key) in record.getMessage()
    ]


class StrKey(str):
    """A ``str`` subclass, as some applications use for keys and values."""


# A str subclass key takes the slow path on every call: both paths must keep the caps.
KEY_TYPES = pytest.mark.parametrize("key_type", [str, StrKey])


class Color(enum.IntEnum):
    RED = 1


class BadHash:
    """An object whose hash raises something other than TypeError."""

    def __hash__(self) -> int:
        raise ValueError("no hash for you")


# -- keys -------------------------------------------------------------------------

BAD_KEYS: List[Any] = [5, None, b"key", 1.5, ("t",), ["unhashable"], BadHash(), "", "k" * 257]


@pytest.mark.parametrize("name", KINDS)
def test_invalid_keys_are_rejected_and_counted(name: str) -> None:
    buffer = Buffer()
    for key in BAD_KEYS:
        call(name, buffer, key)
    snapshot = taken(buffer)
    assert snapshot == Taken(data={}, items=0, dropped=len(BAD_KEYS))


@pytest.mark.parametrize("name", KINDS)
def test_keys_up_to_256_characters_are_accepted(name: str) -> None:
    buffer = Buffer()
    longest = "k" * 256
    call(name, buffer, longest)
    snapshot = taken(buffer)
    assert snapshot.data == {longest: CALLS[name][1]}
    assert snapshot.dropped == 0


@pytest.mark.parametrize("name", KINDS)
def test_str_subclass_keys_are_accepted_as_plain_str(name: str) -> None:
    buffer = Buffer()
    call(name, buffer, StrKey("key"))
    snapshot = taken(buffer)
    assert snapshot.data == {"key": CALLS[name][1]}
    assert [type(key) for key in snapshot.data] == [str]


def test_str_subclass_key_and_plain_key_are_the_same_key() -> None:
    buffer = Buffer()
    buffer.increment(StrKey("hits"))
    buffer.increment("hits")
    buffer.add(StrKey("hits"), 3)
    buffer.append_unique(StrKey("agents"), "a")
    buffer.append_unique("agents", StrKey("a"))
    snapshot = taken(buffer)
    assert snapshot.data == {"hits": 5, "agents": [{"value": "a", "count": 2}]}
    assert snapshot.items == 3


def test_set_nested_subkeys_are_validated_like_keys() -> None:
    buffer = Buffer()
    for subkey in (5, None, "", "s" * 257):
        buffer.set_nested("mapping", subkey, 1)
    buffer.set_nested("mapping", StrKey("s" * 256), 1)
    snapshot = taken(buffer)
    assert snapshot.data == {"mapping": {"s" * 256: 1}}
    assert snapshot.dropped == 4


# -- disabled keys ----------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_app_disabled_key_also_disables_its_prefixed_keys(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = Buffer(disabled_keys=["tls"])
    for key in ("tls", "tls:handshakes", "tls:"):
        call(name, buffer, key)
    for key in ("tlsx", "other:tls", "tl"):
        call(name, buffer, key)
    snapshot = taken(buffer)
    assert set(snapshot.data) == {"tlsx", "other:tls", "tl"}
    assert snapshot.dropped == 0  # disabled keys are dropped silently, not counted
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_disabled_key_is_silent_even_with_an_invalid_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = Buffer(disabled_keys=["tls"])
    buffer.set("tls:version", float("nan"))
    buffer.append("tls", object())
    buffer.add("tls:bytes", 1.5)
    assert taken(buffer) == Taken(data={}, items=0, dropped=0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_disabling_an_exact_prefixed_key_disables_only_that_key() -> None:
    buffer = Buffer(disabled_keys=["a:b"])
    for key in ("a:b", "a:c", "a", "a:bc", "a:b:c"):
        buffer.increment(key)
    # Only the part before the *first* ':' is a prefix: "a:b:c" has prefix "a".
    assert taken(buffer).data == {"a:c": 1, "a": 1, "a:bc": 1, "a:b:c": 1}
    assert buffer.is_disabled("a:b")
    assert not buffer.is_disabled("a")


def test_server_disable_keys_drops_buffered_values_and_frees_their_items() -> None:
    buffer = Buffer()
    buffer.increment("tls:handshakes")  # 1 item
    buffer.set("tls", "1.3")  # 1 item
    buffer.append("tls:ciphers", "a")  # 2 items
    buffer.append("tls:ciphers", "b")  # 1 item
    buffer.append_unique("tls:curves", "x25519")  # 2 items
    buffer.set_nested("tls:versions", "1.2", 3)  # 2 items
    buffer.increment("tlsx")  # 1 item, not disabled
    buffer.append_unique("http", "GET")  # 2 items, not disabled
    assert buffer.item_count == 12

    buffer.disable_keys(["tls"])
    assert buffer.item_count == 3
    assert buffer.server_disabled_keys == frozenset({"tls"})
    buffer.increment("tls:handshakes")
    buffer.set("tls", "again")
    snapshot = taken(buffer)
    assert snapshot.data == {"tlsx": 1, "http": [{"value": "GET", "count": 1}]}
    assert snapshot.items == 3
    assert snapshot.dropped == 0


def test_server_disable_keys_frees_room_under_max_items() -> None:
    buffer = Buffer(max_items=3)
    buffer.append("noisy", 1)
    buffer.increment("kept")
    buffer.increment("new")  # full: dropped
    assert buffer.item_count == 3
    buffer.disable_keys(["noisy"])
    buffer.increment("new")
    snapshot = taken(buffer)
    assert snapshot.data == {"kept": 1, "new": 1}
    assert snapshot.items == 2
    assert snapshot.dropped == 1


def test_enable_keys_lifts_only_server_disables() -> None:
    buffer = Buffer(disabled_keys=["secret"])
    buffer.disable_keys(["tls", "secret", "dns:queries"])
    buffer.enable_keys(["tls", "secret", "dns:queries", "never-disabled"])
    assert buffer.server_disabled_keys == frozenset()
    for key in ("tls", "tls:handshakes", "secret", "secret:part", "dns:queries"):
        buffer.increment(key)
    assert taken(buffer).data == {"tls": 1, "tls:handshakes": 1, "dns:queries": 1}


def test_enable_keys_of_some_keys_keeps_the_others_disabled() -> None:
    buffer = Buffer()
    buffer.disable_keys(["a", "b"])
    buffer.enable_keys(["a"])
    buffer.increment("a:x")
    buffer.increment("b:x")
    assert taken(buffer).data == {"a:x": 1}


# -- values -----------------------------------------------------------------------

VALID_VALUES: List[Any] = [
    None,
    True,
    False,
    0,
    -5,
    2**63 - 1,
    -(2**63),
    1.5,
    -0.0,
    1e308,
    "",
    "é" * 1024,
    [],
    {},
    [None, True, 1, 1.0, "s", [[]], {"k": {"k": [1]}}],
    {"a": 1, "b": [1.5, "x"], "c": {"d": None}},
]


@pytest.mark.parametrize("value", VALID_VALUES, ids=lambda value: repr(value)[:30])
def test_json_values_are_stored_exactly(value: Any) -> None:
    buffer = Buffer()
    buffer.set("value", value)
    buffer.set_nested("mapping", "sub", value)
    buffer.append("list", value)
    snapshot = taken(buffer)
    assert typed(snapshot.data) == typed(
        {"value": value, "mapping": {"sub": value}, "list": [value]}
    )
    assert snapshot.dropped == 0


INVALID_VALUES: List[Any] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    "x" * 1025,
    ["x" * 1025],
    {"k": "x" * 1025},
    [[["x" * 1025]]],
    {"k": [float("nan")]},
    {1: "a"},
    {("t",): 1},
    {"ok": {2: "nested non-str key"}},
    b"bytes",
    {1, 2},
    frozenset({1}),
    object(),
    1j,
    [object()],
]


def _value_id(value: object) -> str:
    """A test id for ``value`` that is the same in every process (no addresses)."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))[:30]


@pytest.mark.parametrize("value", INVALID_VALUES, ids=_value_id)
def test_invalid_values_are_rejected_and_counted(
    value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = Buffer()
    buffer.set("value", value)
    buffer.set_nested("mapping", "sub", value)
    buffer.append("list", value)
    buffer.append_unique("counting", value)
    assert taken(buffer) == Taken(data={}, items=0, dropped=4)
    for key in ("value", "mapping", "list", "counting"):
        assert len(warnings_about(caplog, key)) == 1


def test_strings_are_limited_to_1024_characters_not_bytes() -> None:
    buffer = Buffer()
    buffer.set("ascii", "a" * 1024)
    buffer.set("wide", "\U0001f600" * 1024)  # 4 bytes each in UTF-8
    buffer.append_unique("set", "b" * 1024)
    buffer.set("too_long", "a" * 1025)
    buffer.append_unique("set", "b" * 1025)
    snapshot = taken(buffer)
    assert set(snapshot.data) == {"ascii", "wide", "set"}
    assert snapshot.dropped == 2


def test_a_value_may_encode_to_exactly_16_kib_and_no_more() -> None:
    # ["a"*1024 x15, "a"*975]: 2 brackets + 15*(1024+2) + 975+2 + 15 commas = 16384 bytes.
    at_cap = ["a" * 1024] * 15 + ["a" * 975]
    over_cap = ["a" * 1024] * 15 + ["a" * 976]
    assert len(json.dumps(at_cap, separators=(",", ":"))) == 16 * 1024
    buffer = Buffer()
    buffer.set("at_cap", at_cap)
    buffer.set_nested("nested", "at_cap", at_cap)
    buffer.set("over_cap", over_cap)
    buffer.append("list", over_cap)
    snapshot = taken(buffer)
    assert snapshot.data == {"at_cap": at_cap, "nested": {"at_cap": at_cap}}
    assert snapshot.dropped == 2


def test_the_16_kib_cap_counts_utf8_bytes() -> None:
    wide = ["é" * 1024] * 8  # 8,217 characters but 16,409 bytes once encoded
    narrow = ["e" * 1024] * 8
    buffer = Buffer()
    buffer.set("wide", wide)
    buffer.set("narrow", narrow)
    snapshot = taken(buffer)
    assert snapshot.data == {"narrow": narrow}
    assert snapshot.dropped == 1


class CountingList(List[Any]):
    """A list that counts how many elements were read from it."""

    reads = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            CountingList.reads += 1
            yield item


def test_an_oversized_value_is_refused_without_copying_it_whole() -> None:
    inner = CountingList([0] * 2000)
    huge = [inner] * 2000  # 4 million elements once flattened, in a few KiB of memory
    CountingList.reads = 0
    buffer = Buffer()
    buffer.set("huge", huge)
    assert taken(buffer) == Taken(data={}, items=0, dropped=1)
    assert CountingList.reads < 16 * 1024


def nest(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def test_deep_nesting_is_bounded() -> None:
    buffer = Buffer()
    buffer.set("deep32", nest(32))
    buffer.set("deep33", nest(33))
    buffer.set("very_deep", nest(100_000))  # no RecursionError escapes
    cyclic: List[Any] = []
    cyclic.append(cyclic)
    buffer.set("cyclic", cyclic)
    snapshot = taken(buffer)
    assert snapshot.data == {"deep32": nest(32)}
    assert snapshot.dropped == 3


def test_tuples_become_lists() -> None:
    buffer = Buffer()
    buffer.set("t", (1, (2, 3), {"k": (4,)}))
    buffer.append("l", ())
    snapshot = taken(buffer)
    assert typed(snapshot.data) == typed({"t": [1, [2, 3], {"k": [4]}], "l": [[]]})


def test_str_and_int_subclass_values_are_stored_as_plain_types() -> None:
    buffer = Buffer()
    buffer.set("s", StrKey("text"))
    buffer.set("e", Color.RED)
    buffer.set("nested", {StrKey("k"): [StrKey("v"), Color.RED]})
    buffer.append_unique("u", StrKey("text"))
    buffer.append_unique("u", "text")
    data = taken(buffer).data
    assert typed(data) == typed(
        {"s": "text", "e": 1, "nested": {"k": ["v", 1]}, "u": [{"value": "text", "count": 2}]}
    )
    assert json.loads(json.dumps(data)) == data


def test_values_are_copied_so_later_mutation_does_not_change_the_buffer() -> None:
    items: List[Any] = [1, [2], {"k": [3]}]
    mapping: Dict[str, Any] = {"a": [1]}
    buffer = Buffer()
    buffer.set("list", items)
    buffer.set_nested("nested", "sub", mapping)
    buffer.append("appended", items)
    items.append(4)
    items[1].append(5)
    items[2]["k"].append(6)
    mapping["a"].append(2)
    mapping["b"] = 1
    data = taken(buffer).data
    assert data == {
        "list": [1, [2], {"k": [3]}],
        "nested": {"sub": {"a": [1]}},
        "appended": [[1, [2], {"k": [3]}]],
    }


UNSTORABLE_STRINGS = ["a\x00b", "\x00", "\ud800", "é\udfff", "x" * 100 + "\udc80"]


@pytest.mark.parametrize("text", UNSTORABLE_STRINGS, ids=ascii)
def test_strings_not_every_store_can_keep_are_rejected_at_the_call(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL refuses U+0000 in text and JSON; no store can keep a lone surrogate.
    buffer = Buffer()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for _ in range(3):
            buffer.set("scalar", text)
            buffer.set("container", ["ok", {"k": text}])
            buffer.set("name", {text: 1})
            buffer.set_nested("mapping", text, 1)
            buffer.set_nested("mapping2", "sub", text)
            buffer.append("list", text)
            buffer.append_unique("set", text)
            buffer.increment(text)
            buffer.increment(StrKey(text))
    snapshot = taken(buffer)
    assert snapshot.data == {}
    assert snapshot.dropped == 27
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 8  # one per key (both spellings of the key are one key)
    assert all("U+0000" in m or "surrogate" in m for m in warned)
    assert all("\x00" not in m and "\ud800" not in m for m in warned)


def test_ints_must_fit_64_bits_and_counters_saturate(caplog: pytest.LogCaptureFixture) -> None:
    top, bottom = 2**63 - 1, -(2**63)
    buffer = Buffer()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for value in (top + 1, bottom - 1, [top + 1], {"n": bottom - 1}, 10**5000):
            buffer.set("value", value)
            buffer.append("list", value)
            buffer.append_unique("set", value)
        buffer.add("rejected", top + 1)
        buffer.add("up", top - 1)
        buffer.increment("up")
        buffer.increment("up")  # past the bound: stays there, dropped
        buffer.add("up", 5)  # dropped
        buffer.add("up", -1)  # back under it: counts again
        buffer.add("down", bottom + 1)
        buffer.add("down", -2)  # dropped
        buffer.add("fresh", 1)
        buffer.add("fresh", top)  # saturates on the slow path's first update too
    snapshot = taken(buffer)
    assert snapshot.data == {"up": top - 1, "down": bottom, "fresh": top}
    assert snapshot.dropped == 15 + 1 + 2 + 1 + 1
    saturated = [r for r in caplog.records if "64-bit bound" in r.getMessage()]
    assert len(saturated) == 3  # once per key


class _Raises:
    """Methods that raise, for subclasses of the JSON container and scalar types."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__")

    def __hash__(self) -> int:
        raise RuntimeError("__hash__")


def _raising(base: type, *names: str) -> type:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    return type(f"Bad{base.__name__}", (_Raises, base), dict.fromkeys(names, boom))


BAD_SUBCLASS_VALUES = [  # (value, what its base type holds)
    (_raising(list)([1, 2]), [1, 2]),
    (_raising(dict)(a=1), {"a": 1}),
    (_raising(list, "__iter__", "__len__")([1, 2]), [1, 2]),
    (_raising(tuple, "__iter__", "__len__")((1, 2)), [1, 2]),
    (_raising(dict, "__iter__", "__len__", "items", "keys", "values", "__getitem__")(a=1),
     {"a": 1}),
    (_raising(int, "__int__", "__index__", "__lt__", "__gt__", "__le__", "__ge__")(5), 5),
    (_raising(float, "__float__", "__lt__", "__gt__")(1.5), 1.5),
    (_raising(str, "__str__", "__len__", "__iter__", "__contains__", "encode")("s"), "s"),
]


@pytest.mark.parametrize(("value", "plain"), BAD_SUBCLASS_VALUES,
                         ids=[type(v).__mro__[2].__name__ for v, _ in BAD_SUBCLASS_VALUES])
def test_subclasses_with_raising_methods_are_read_as_their_base_type(
    value: Any, plain: Any, caplog: pytest.LogCaptureFixture,
    fail_on_internal_errors: List[BaseException],
) -> None:
    buffer = Buffer()
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for _ in range(1000):
            buffer.set("value", value)
            buffer.set_nested("mapping", "sub", value)
            buffer.append("list", value)
            buffer.append_unique("set", value)
            buffer.add("counter", value)
            buffer.set(value, 1)
    errors = list(fail_on_internal_errors)
    fail_on_internal_errors.clear()  # reported here, not by the fixture
    assert errors == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(caplog.records) <= 6  # at most one warning per key, not one per call
    data = taken(buffer).data
    assert typed(data["value"]) == typed(plain)
    assert typed(data["mapping"]) == typed({"sub": plain})


def test_append_unique_takes_scalars_only() -> None:
    buffer = Buffer()
    for value in ([1], (1,), {"a": 1}, [], float("nan"), object()):
        buffer.append_unique("set", value)
    buffer.append_unique("set", "ok")
    snapshot = taken(buffer)
    assert snapshot.data == {"set": [{"value": "ok", "count": 1}]}
    assert snapshot.dropped == 6


def test_counting_set_keeps_1_and_1_0_and_true_distinct() -> None:
    buffer = Buffer()
    for value in (1, 1.0, True, 1, None, "1", True, 1, 0, False, 0.0, None):
        buffer.append_unique("set", value)
    snapshot = taken(buffer)
    assert typed(snapshot.data["set"]) == typed(
        [
            {"value": 1, "count": 3},
            {"value": 1.0, "count": 1},
            {"value": True, "count": 2},
            {"value": None, "count": 2},
            {"value": "1", "count": 1},
            {"value": 0, "count": 1},
            {"value": False, "count": 1},
            {"value": 0.0, "count": 1},
        ]
    )
    assert snapshot.items == 1 + 8


def test_counting_set_counts_repeats() -> None:
    buffer = Buffer()
    for agent in ["curl"] * 5 + ["firefox"] * 2 + ["curl", "wget"]:
        buffer.append_unique("agents", agent)
    snapshot = taken(buffer)
    assert snapshot.data == {
        "agents": [
            {"value": "curl", "count": 6},
            {"value": "firefox", "count": 2},
            {"value": "wget", "count": 1},
        ]
    }
    assert snapshot.items == 4


def test_add_takes_int_only() -> None:
    buffer = Buffer()
    for amount in (True, False, 1.0, "1", None, [1]):
        buffer.add("counter", amount)
    assert taken(buffer) == Taken(data={}, items=0, dropped=6)
    buffer.add("counter", -5)
    buffer.add("counter", 0)
    buffer.add("zero", 0)
    buffer.add("counter", True)  # rejected on an existing counter too
    buffer.add("counter", 2**64)  # over 64 bits: rejected
    snapshot = taken(buffer)
    assert typed(snapshot.data) == typed({"counter": -5, "zero": 0})
    assert snapshot.dropped == 2


def test_increment_is_add_one() -> None:
    buffer = Buffer()
    buffer.increment("n")
    buffer.add("n", 10)
    buffer.increment("n")
    assert taken(buffer).data == {"n": 12}


def test_set_overwrites() -> None:
    buffer = Buffer()
    buffer.set("version", "1.0")
    buffer.set("version", {"major": 2})
    buffer.set_nested("m", "a", 1)
    buffer.set_nested("m", "a", 2)
    buffer.set_nested("m", "b", None)
    snapshot = taken(buffer)
    assert snapshot.data == {"version": {"major": 2}, "m": {"a": 2, "b": None}}
    assert snapshot.items == 1 + 3


def test_append_keeps_order_and_duplicates() -> None:
    buffer = Buffer()
    for value in ("x", 1, "x", {"k": 1}):
        buffer.append("list", value)
    assert taken(buffer).data == {"list": ["x", 1, "x", {"k": 1}]}


# -- kind mismatch ----------------------------------------------------------------

MISMATCHED = [
    (first, second) for first in KINDS for second in KINDS if KIND_OF[first] != KIND_OF[second]
]


@pytest.mark.parametrize(("first", "second"), MISMATCHED)
def test_kind_mismatch_is_a_counted_no_op_warned_once_per_key(
    first: str, second: str, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = Buffer()
    call(first, buffer, "key")
    call(first, buffer, "other")
    caplog.clear()
    for _ in range(3):
        call(second, buffer, "key")
    call(second, buffer, "other")
    snapshot = taken(buffer)
    assert snapshot.data == {"key": CALLS[first][1], "other": CALLS[first][1]}
    assert snapshot.dropped == 4
    assert len(warnings_about(caplog, "key")) == 1
    assert len(warnings_about(caplog, "other")) == 1


def test_invalid_values_warn_once_per_key(caplog: pytest.LogCaptureFixture) -> None:
    buffer = Buffer()
    for _ in range(5):
        buffer.set("a", float("nan"))
        buffer.add("b", 1.5)
    assert len(warnings_about(caplog, "a")) == 1
    assert len(warnings_about(caplog, "b")) == 1
    assert taken(buffer).dropped == 10


# -- item accounting: max_items ---------------------------------------------------


@KEY_TYPES
@pytest.mark.parametrize("name", KINDS)
def test_new_keys_fill_max_items_10(name: str, key_type: Callable[[str], str]) -> None:
    buffer = Buffer(max_items=10)
    cost = CALLS[name][2]
    for index in range(10 // cost + 3):
        call(name, buffer, key_type(f"key{index}"))
    snapshot = taken(buffer)
    assert len(snapshot.data) == 10 // cost
    assert snapshot.items == 10
    assert snapshot.dropped == 3


def test_each_new_subkey_is_one_item_under_max_items_10() -> None:
    buffer = Buffer(max_items=10)
    for index in range(12):  # the first call costs 2 (key and subkey), then 1 each
        buffer.set_nested("m", f"s{index}", index)
    buffer.set_nested("m", "s0", "overwritten")
    snapshot = taken(buffer)
    assert snapshot.data == {"m": {"s0": "overwritten", **{f"s{i}": i for i in range(1, 9)}}}
    assert snapshot.items == 10
    assert snapshot.dropped == 3


def test_each_appended_element_is_one_item_under_max_items_10() -> None:
    buffer = Buffer(max_items=10)
    for index in range(12):  # the first append costs 2 (key and element), then 1 each
        buffer.append("l", index)
    snapshot = taken(buffer)
    assert snapshot.data == {"l": list(range(9))}
    assert snapshot.items == 10
    assert snapshot.dropped == 3


def test_each_distinct_set_value_is_one_item_under_max_items_10() -> None:
    buffer = Buffer(max_items=10)
    for index in range(12):  # the first costs 2 (key and value), then 1 per new value
        buffer.append_unique("u", index)
    for _ in range(4):
        buffer.append_unique("u", 0)  # a known value only counts: never limited
    snapshot = taken(buffer)
    assert snapshot.data == {
        "u": [{"value": 0, "count": 5}] + [{"value": i, "count": 1} for i in range(1, 9)]
    }
    assert snapshot.items == 10
    assert snapshot.dropped == 3


def test_updates_of_existing_things_never_hit_max_items() -> None:
    buffer = Buffer(max_items=10)
    buffer.set("v", 1)  # 1
    buffer.increment("c")  # 2
    buffer.set_nested("n", "a", 1)  # 4
    buffer.append("l", 1)  # 6
    buffer.append_unique("u", "x")  # 8
    buffer.set("w", 1)  # 9
    buffer.append("new_list", 1)  # would cost 2: dropped
    buffer.increment("d")  # 10
    assert buffer.item_count == 10
    assert buffer.dropped == 1

    buffer.set("v", [1, 2, 3])
    buffer.add("c", 5)
    buffer.increment("d")
    buffer.set_nested("n", "a", "x")
    buffer.append_unique("u", "x")
    assert buffer.dropped == 1

    buffer.set("new", 1)
    buffer.increment("new_counter")
    buffer.set_nested("n", "b", 1)
    buffer.append("l", 2)
    buffer.append_unique("u", "y")
    snapshot = taken(buffer)
    assert snapshot.items == 10
    assert snapshot.dropped == 6
    assert snapshot.data == {
        "v": [1, 2, 3],
        "w": 1,
        "n": {"a": "x"},
        "c": 6,
        "d": 2,
        "l": [1],
        "u": [{"value": "x", "count": 2}],
    }


def test_a_full_buffer_warns_once_per_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    buffer = Buffer(max_items=1)
    buffer.increment("a")
    for index in range(5):
        buffer.increment(f"k{index}")
    assert buffer.dropped == 5  # counter calls are decided (and warned about) when folded
    full = [r for r in caplog.records if "full" in r.getMessage()]
    assert len(full) == 1
    taken(buffer)
    buffer.increment("a")
    buffer.increment("b")
    assert buffer.dropped == 1
    full = [r for r in caplog.records if "full" in r.getMessage()]
    assert len(full) == 2


def test_a_full_buffer_warns_again_after_reset(caplog: pytest.LogCaptureFixture) -> None:
    buffer = Buffer(max_items=1)
    buffer.increment("a")
    buffer.increment("b")
    buffer.reset()
    buffer.increment("a")
    buffer.increment("b")
    assert taken(buffer).dropped == 2  # counter calls are decided (and warned about) when folded
    assert len([r for r in caplog.records if "full" in r.getMessage()]) == 2


def test_the_default_max_items_is_100_000_new_keys() -> None:
    buffer = Buffer()
    for index in range(100_000):
        buffer.set(f"k{index}", index)
    buffer.set("one_more", 1)
    buffer.set("k0", "overwritten")
    snapshot = taken(buffer)
    assert len(snapshot.data) == 100_000
    assert snapshot.data["k0"] == "overwritten"
    assert snapshot.items == 100_000
    assert snapshot.dropped == 1


def test_the_default_max_items_counts_every_distinct_set_value() -> None:
    buffer = Buffer()
    for number in range(10):  # 10 keys + 10 * 9,999 distinct values = 100,000 items
        for value in range(9_999):
            buffer.append_unique(f"set{number}", value)
    assert buffer.item_count == 100_000
    buffer.append_unique("set0", 9_999)  # a new value, under the per-key cap: full
    buffer.increment("another")
    buffer.append_unique("set0", 0)  # known: counted
    snapshot = taken(buffer)
    assert snapshot.items == 100_000
    assert snapshot.dropped == 2
    set0 = snapshot.data["set0"]
    assert isinstance(set0, list)
    assert len(set0) == 9_999
    assert set0[0] == {"value": 0, "count": 2}


# -- the per-key cap --------------------------------------------------------------


@KEY_TYPES
def test_max_values_per_key_bounds_lists(key_type: Callable[[str], str]) -> None:
    buffer = Buffer(max_values_per_key=3)
    for index in range(5):
        buffer.append(key_type("a"), index)
        buffer.append(key_type("b"), index)
    snapshot = taken(buffer)
    assert snapshot.data == {"a": [0, 1, 2], "b": [0, 1, 2]}
    assert snapshot.items == 8
    assert snapshot.dropped == 4


@KEY_TYPES
def test_max_values_per_key_bounds_counting_sets(key_type: Callable[[str], str]) -> None:
    buffer = Buffer(max_values_per_key=3)
    for value in ("a", "b", "c", "d", "a", "e", "c"):
        buffer.append_unique(key_type("set"), value)
    buffer.append_unique(key_type("other"), "d")
    snapshot = taken(buffer)
    assert snapshot.data == {
        "set": [
            {"value": "a", "count": 2},
            {"value": "b", "count": 1},
            {"value": "c", "count": 2},
        ],
        "other": [{"value": "d", "count": 1}],
    }
    assert snapshot.items == 4 + 2
    assert snapshot.dropped == 2


@KEY_TYPES
def test_max_values_per_key_bounds_nested_mappings(key_type: Callable[[str], str]) -> None:
    buffer = Buffer(max_values_per_key=3)
    for subkey in ("a", "b", "c", "d", "e"):
        buffer.set_nested(key_type("m"), subkey, 1)
    buffer.set_nested(key_type("m"), "a", "overwrite is fine")
    snapshot = taken(buffer)
    assert snapshot.data == {"m": {"a": "overwrite is fine", "b": 1, "c": 1}}
    assert snapshot.items == 4
    assert snapshot.dropped == 2


def test_the_per_key_cap_warns_once_per_key(caplog: pytest.LogCaptureFixture) -> None:
    buffer = Buffer(max_values_per_key=1)
    for index in range(5):
        buffer.append("list", index)
    assert taken(buffer).dropped == 4  # calls are decided (and warned about) when folded
    assert len(warnings_about(caplog, "list")) == 1


def test_max_values_per_key_zero_admits_no_container_values() -> None:
    buffer = Buffer(max_values_per_key=0)
    buffer.append("l", 1)
    buffer.append_unique("u", 1)
    buffer.set_nested("n", "a", 1)
    buffer.set("v", [1, 2])  # a set value is one item, not a container of items
    buffer.increment("c")
    snapshot = taken(buffer)
    assert snapshot.data == {"v": [1, 2], "c": 1}
    assert snapshot.items == 2
    assert snapshot.dropped == 3


def test_the_default_per_key_cap_is_10_000() -> None:
    buffer = Buffer()
    for index in range(10_005):
        buffer.append("l", index)
    snapshot = taken(buffer)
    assert snapshot.data["l"] == list(range(10_000))
    assert snapshot.items == 10_001
    assert snapshot.dropped == 5


# -- take, drop counts, reset -------------------------------------------------------


def test_take_empties_the_buffer_and_resets_drop_counts() -> None:
    buffer = Buffer(max_items=2)
    buffer.increment("a")
    buffer.append("l", 1)  # costs 2: dropped
    buffer.set("b", float("nan"))  # invalid: dropped
    buffer.set("b", 1)
    first = taken(buffer)
    assert first == Taken(data={"a": 1, "b": 1}, items=2, dropped=2)
    assert buffer.item_count == 0
    assert buffer.dropped == 0
    assert taken(buffer) == Taken(data={}, items=0, dropped=0)


def test_calls_after_take_go_to_the_next_snapshot() -> None:
    buffer = Buffer(max_items=4)
    buffer.append("l", 1)
    buffer.increment("c")
    first = taken(buffer)
    buffer.append("l", 2)
    buffer.increment("c")
    buffer.increment("d")
    second = taken(buffer)
    assert first == Taken(data={"l": [1], "c": 1}, items=3, dropped=0)
    assert second == Taken(data={"l": [2], "c": 1, "d": 1}, items=4, dropped=0)


def test_count_dropped_reaches_the_next_snapshot() -> None:
    buffer = Buffer()
    buffer.count_dropped(7)
    buffer.set("a", float("nan"))
    assert taken(buffer).dropped == 8
    assert taken(buffer).dropped == 0


def test_reset_empties_the_buffer_but_keeps_drop_counts() -> None:
    buffer = Buffer(max_items=2)
    buffer.increment("a")
    buffer.increment("b")
    buffer.increment("c")  # full: dropped
    buffer.reset()
    assert buffer.item_count == 0
    buffer.append("l", 1)  # the room is back
    snapshot = taken(buffer)
    assert snapshot == Taken(data={"l": [1]}, items=2, dropped=1)


def test_reset_lets_a_key_change_kind() -> None:
    buffer = Buffer()
    buffer.increment("k")
    buffer.reset()
    buffer.append("k", 1)
    assert taken(buffer).data == {"k": [1]}


# -- threads and fork ---------------------------------------------------------------

THREADS = 8
CALLS_PER_THREAD = 50_000


def test_concurrent_mixed_calls_give_exact_totals() -> None:
    buffer = Buffer(max_items=1_000_000, max_values_per_key=1_000_000)
    start = threading.Barrier(THREADS)
    failures: List[BaseException] = []

    def work(thread: int) -> None:
        try:
            start.wait()
            for index in range(CALLS_PER_THREAD):
                step = index % 5
                if step == 0:
                    buffer.increment("hits")
                elif step == 1:
                    buffer.add("bytes", index)
                elif step == 2:
                    buffer.append_unique("agents", f"agent{index % 7}")
                elif step == 3:
                    buffer.append(f"list{thread}", index)
                else:
                    buffer.set_nested("last", f"thread{thread}", index)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    steps = [index % 5 for index in range(CALLS_PER_THREAD)]
    hits = THREADS * steps.count(0)
    total_bytes = THREADS * sum(i for i in range(CALLS_PER_THREAD) if i % 5 == 1)
    agents = Counter(f"agent{i % 7}" for i in range(CALLS_PER_THREAD) if i % 5 == 2)
    appended = [i for i in range(CALLS_PER_THREAD) if i % 5 == 3]
    last = max(i for i in range(CALLS_PER_THREAD) if i % 5 == 4)

    snapshot = taken(buffer)
    data = snapshot.data
    assert data["hits"] == hits == 80_000
    assert data["bytes"] == total_bytes
    agent_counts = data["agents"]
    assert isinstance(agent_counts, list)
    assert {
        entry["value"]: entry["count"] for entry in agent_counts if isinstance(entry, dict)
    } == {agent: THREADS * count for agent, count in agents.items()}
    for number in range(THREADS):
        assert data[f"list{number}"] == appended
    assert data["last"] == {f"thread{number}": last for number in range(THREADS)}
    assert snapshot.items == 1 + 1 + (1 + 7) + THREADS * (1 + len(appended)) + (1 + THREADS)
    assert snapshot.dropped == 0


def test_concurrent_takes_lose_no_update() -> None:
    buffer = Buffer()
    done = threading.Event()
    snapshots: List[Taken] = []

    def take_repeatedly() -> None:
        while not done.is_set():
            snapshots.append(taken(buffer))

    def increment() -> None:
        for _ in range(20_000):
            buffer.increment("hits")
            buffer.append_unique("set", "x")

    taker = threading.Thread(target=take_repeatedly)
    workers = [threading.Thread(target=increment) for _ in range(4)]
    taker.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    taker.join()
    snapshots.append(taken(buffer))
    hits = set_counts = 0
    for snapshot in snapshots:
        count = snapshot.data.get("hits", 0)
        entries = snapshot.data.get("set", [])
        assert isinstance(count, int)
        assert isinstance(entries, list)
        hits += count
        for entry in entries:
            assert isinstance(entry, dict)
            assert entry["value"] == "x"
            entry_count = entry["count"]
            assert isinstance(entry_count, int)
            set_counts += entry_count
    assert len(snapshots) > 1
    assert hits == 80_000
    assert set_counts == 80_000


def test_after_fork_in_child_gives_an_empty_buffer_with_a_new_lock() -> None:
    buffer = Buffer()
    buffer.increment("parent")
    buffer.set("x", float("nan"))  # a drop count that belongs to the parent
    old_lock = buffer._lock
    old_lock.acquire()  # as if a parent thread held it at fork time
    try:
        buffer.after_fork_in_child()
        assert buffer._lock is not old_lock
        buffer.increment("child")  # would deadlock on the old lock
        snapshot = taken(buffer)
    finally:
        old_lock.release()
    assert snapshot == Taken(data={"child": 1}, items=1, dropped=0)
