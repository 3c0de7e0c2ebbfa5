"""The module-level API (README.md "Usage", "API") on a fresh default client, and its properties."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import xxhash
from conftest import typed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import telemetry
from telemetry._buffer import Buffer
from telemetry._client import NULL_COLLECTOR
from telemetry._wire import decode_payload, encode_payload

INSTANCE = uuid.UUID("3f0c2f5e-8a7b-4c1d-9e2f-0123456789ab")
PROJECT_ROOT = Path(__file__).resolve().parents[1]



def collect_one_of_each() -> None:
    telemetry.set("version", "1.4.2")
    telemetry.set_nested("memory", "heap", 1024)
    telemetry.add("bytes", 10)
    telemetry.increment("hits")
    telemetry.append("events", "start")
    telemetry.append_unique("agents", "curl")


ONE_OF_EACH = {
    "version": "1.4.2",
    "memory": {"heap": 1024},
    "bytes": 10,
    "hits": 1,
    "events": ["start"],
    "agents": [{"value": "curl", "count": 1}],
}


# -- before init ------------------------------------------------------------------


def test_calls_before_init_do_nothing(default_client: telemetry.Client) -> None:
    collect_one_of_each()
    telemetry.reset()
    assert telemetry.take_payload() is None
    assert default_client.take_payload() is None
    assert default_client.collector is NULL_COLLECTOR
    assert default_client.mode == "off"
    telemetry.init(INSTANCE, consent=True)
    payload = telemetry.take_payload()
    assert payload is not None
    assert payload.data == {}  # nothing collected before init() was kept
    assert payload.dropped == 0


def test_module_functions_act_on_the_default_client(default_client: telemetry.Client) -> None:
    telemetry.init(INSTANCE, consent=True)
    collect_one_of_each()
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.data == ONE_OF_EACH
    assert payload.items == 1 + 2 + 1 + 1 + 2 + 2
    telemetry.increment("hits")
    telemetry.reset()
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.data == {}


# -- init ---------------------------------------------------------------------------


def test_init_accepts_a_uuid_object(default_client: telemetry.Client) -> None:
    telemetry.init(INSTANCE, consent=True)
    assert default_client.instance_id == INSTANCE
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.instance_id == str(INSTANCE)


@pytest.mark.parametrize(
    "text",
    [
        str(INSTANCE),
        str(INSTANCE).upper(),
        INSTANCE.hex,
        "{" + str(INSTANCE) + "}",
    ],
)
def test_init_accepts_a_uuid_string(default_client: telemetry.Client, text: str) -> None:
    telemetry.init(text, consent=True)
    assert default_client.instance_id == INSTANCE
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.instance_id == "3f0c2f5e-8a7b-4c1d-9e2f-0123456789ab"


def test_init_without_an_id_makes_a_random_uuid(default_client: telemetry.Client) -> None:
    telemetry.init(consent=True)
    assert isinstance(default_client.instance_id, uuid.UUID)
    assert default_client.instance_id.int != 0


@pytest.mark.parametrize(
    "instance_id",
    [
        uuid.UUID(int=0),
        "00000000-0000-0000-0000-000000000000",
        "garbage",
        "",
        "3f0c2f5e-8a7b-4c1d-9e2f-0123456789a",
        12345,
        b"3f0c2f5e8a7b4c1d9e2f0123456789ab",
    ],
)
def test_init_refuses_a_nil_or_garbage_id(
    default_client: telemetry.Client, instance_id: Any
) -> None:
    with pytest.raises(ValueError, match="instance_id"):
        telemetry.init(instance_id, consent=True)
    telemetry.increment("hits")
    assert default_client.take_payload() is None
    telemetry.init(INSTANCE, consent=True)  # a failed init() did not count
    assert default_client.mode == "on"


@pytest.mark.parametrize(
    "disabled_keys", [[1], ["ok", None], "tls", [b"tls"], None, [["tls"]], 5]
)
def test_init_refuses_disabled_keys_that_are_not_str(
    default_client: telemetry.Client, disabled_keys: Any
) -> None:
    with pytest.raises(ValueError, match="disabled_keys"):
        telemetry.init(INSTANCE, consent=True, disabled_keys=disabled_keys)


@pytest.mark.parametrize("first_consent", [True, False, None])
def test_a_second_init_raises(
    default_client: telemetry.Client, first_consent: Optional[bool]
) -> None:
    telemetry.init(INSTANCE, consent=first_consent)
    with pytest.raises(RuntimeError, match="init"):
        telemetry.init(INSTANCE, consent=True)
    with pytest.raises(RuntimeError, match="init"):
        telemetry.init(uuid.uuid4(), consent=True)


def test_keys_disabled_at_init_stay_disabled(default_client: telemetry.Client) -> None:
    telemetry.init(INSTANCE, consent=True, disabled_keys=["tls", "dns:queries"])
    for key in ("tls", "tls:handshakes", "dns:queries", "dns:answers", "http"):
        telemetry.increment(key)
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.data == {"dns:answers": 1, "http": 1}


def test_init_passes_the_limits_to_the_buffer(default_client: telemetry.Client) -> None:
    telemetry.init(INSTANCE, consent=True, max_items=3, max_values_per_key=2)
    for value in range(3):
        telemetry.append("list", value)  # 2 + 1 items; the third is over the per-key cap
    telemetry.increment("full")
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.data == {"list": [0, 1]}
    assert payload.items == 3
    assert payload.dropped == 2


# -- consent --------------------------------------------------------------------------


@pytest.mark.parametrize("consent", [False, None])
def test_without_consent_telemetry_is_off(
    default_client: telemetry.Client, consent: Optional[bool]
) -> None:
    telemetry.init(INSTANCE, consent=consent)
    assert default_client.mode == "off"
    assert default_client.collector is NULL_COLLECTOR
    collect_one_of_each()
    assert default_client.take_payload() is None


@pytest.mark.parametrize(("consent", "mode"), [(True, "on"), ("local", "local"), ("on", "on")])
def test_with_consent_telemetry_collects(
    default_client: telemetry.Client, consent: Any, mode: str
) -> None:
    telemetry.init(INSTANCE, consent=consent)
    assert default_client.mode == mode
    assert default_client.collector is not NULL_COLLECTOR
    collect_one_of_each()
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.data == ONE_OF_EACH


def test_do_not_track_outranks_consent(
    default_client: telemetry.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    telemetry.init(INSTANCE, consent=True)
    assert default_client.mode == "off"
    collect_one_of_each()
    assert default_client.take_payload() is None


# -- fast_hash ------------------------------------------------------------------------

_PRIME1, _PRIME2, _PRIME3, _PRIME4, _PRIME5 = (
    2654435761,
    2246822519,
    3266489917,
    668265263,
    374761393,
)
_MASK = 0xFFFFFFFF


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (32 - bits))) & _MASK


def _lane(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def reference_xxh32(data: bytes, seed: int = 0) -> str:
    """XXH32 from its specification, in plain Python: an independent reference."""
    length, offset = len(data), 0
    if length >= 16:
        accs = [
            (seed + _PRIME1 + _PRIME2) & _MASK,
            (seed + _PRIME2) & _MASK,
            seed,
            (seed - _PRIME1) & _MASK,
        ]
        while offset + 16 <= length:
            for index in range(4):
                acc = (accs[index] + _lane(data, offset + 4 * index) * _PRIME2) & _MASK
                accs[index] = (_rotl(acc, 13) * _PRIME1) & _MASK
            offset += 16
        acc = _rotl(accs[0], 1) + _rotl(accs[1], 7) + _rotl(accs[2], 12) + _rotl(accs[3], 18)
    else:
        acc = seed + _PRIME5
    acc = (acc + length) & _MASK
    while offset + 4 <= length:
        acc = (_rotl((acc + _lane(data, offset) * _PRIME3) & _MASK, 17) * _PRIME4) & _MASK
        offset += 4
    while offset < length:
        acc = (_rotl((acc + data[offset] * _PRIME5) & _MASK, 11) * _PRIME1) & _MASK
        offset += 1
    acc ^= acc >> 15
    acc = (acc * _PRIME2) & _MASK
    acc ^= acc >> 13
    acc = (acc * _PRIME3) & _MASK
    acc ^= acc >> 16
    return f"{acc:08x}"


def test_reference_xxh32_matches_the_published_vector() -> None:
    assert reference_xxh32(b"") == "02cc5d05"


HASH_INPUTS = [
    b"",
    b"a",
    b"abc",
    b"Mozilla/5.0 (X11; Linux x86_64)",
    bytes(range(256)),
    "",
    "curl/8.5.0",
    "naïve ✓ 😀",
    "x" * 1000,
]


@pytest.mark.parametrize("data", HASH_INPUTS, ids=lambda data: repr(data)[:20])
def test_fast_hash_is_xxh32_hex(default_client: telemetry.Client, data: Any) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    digest = telemetry.fast_hash(data)
    assert digest == reference_xxh32(raw)
    assert digest == xxhash.xxh32_hexdigest(raw)
    assert digest == telemetry.Client.fast_hash(data)
    assert len(digest) == 8


def test_fast_hash_of_empty_input_is_the_known_vector() -> None:
    assert telemetry.fast_hash(b"") == "02cc5d05"
    assert telemetry.fast_hash("") == "02cc5d05"


@pytest.mark.parametrize(
    "options",
    [{"max_items": "10"}, {"max_items": True}, {"max_values_per_key": -1},
     {"max_pending": 0}, {"min_interval": 0}, {"min_interval": 10, "max_interval": 5},
     {"send_timeout": "soon"}],
)
def test_init_refuses_bad_limits_with_value_error(
    default_client: telemetry.Client, options: Dict[str, Any]
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each option has its own message
        telemetry.init(INSTANCE, consent=True, **options)
    assert default_client.mode == "off"


def test_fast_hash_never_raises_for_odd_input() -> None:
    assert telemetry.fast_hash("\ud800") == reference_xxh32("\ud800".encode("utf-8",
                                                                          "surrogatepass"))
    assert telemetry.fast_hash(None) == reference_xxh32(b"None")  # type: ignore[arg-type]
    assert telemetry.fast_hash(bytearray(b"ua")) == reference_xxh32(b"ua")


def test_fast_hash_works_before_init(default_client: telemetry.Client) -> None:
    assert telemetry.fast_hash("ua") == reference_xxh32(b"ua")


# -- import cost ----------------------------------------------------------------------


def test_import_telemetry_does_not_import_requests_nor_attrs() -> None:
    script = (
        "import sys, json, uuid\n"
        "import telemetry\n"
        "imported = ['requests' in sys.modules, 'attr' in sys.modules]\n"
        "c = telemetry.Client()\n"
        "c.init(uuid.uuid4(), consent=True)\n"
        "c.increment('hits')\n"
        "print(json.dumps([imported, 'requests' in sys.modules, telemetry.__file__]))\n"
    )
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("CI", "DO_NOT_TRACK") and not name.endswith("_TELEMETRY")
    }
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    on_import, after_collecting, path = json.loads(result.stdout)
    assert Path(path).resolve().parent == PROJECT_ROOT / "telemetry"
    assert on_import == [False, False]  # attrs loads with init(), requests with a send
    assert after_collecting is False


# -- fork -------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() in a threaded process
def test_a_forked_child_starts_with_an_empty_buffer_and_a_new_lock(
    default_client: telemetry.Client,
) -> None:
    telemetry.init(INSTANCE, consent=True)
    telemetry.increment("parent")
    buffer = default_client.collector  # on: the buffer itself
    assert isinstance(buffer, Buffer)
    read_end, write_end = os.pipe()
    buffer._lock.acquire()  # as if a parent thread were inside a collection call
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                signal.alarm(10)  # a deadlock on the inherited lock ends the child
                telemetry.increment("child")
                payload = default_client.take_payload()
                report = json.dumps(None if payload is None else payload.data)
                os.write(write_end, report.encode())
            finally:
                os._exit(0)
    finally:
        buffer._lock.release()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report_bytes = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    assert json.loads(report_bytes) == {"child": 1}
    payload = default_client.take_payload()
    assert payload is not None
    assert payload.data == {"parent": 1}


# -- the property: random call sequences ------------------------------------------------


class StrKey(str):
    """A ``str`` subclass key or value."""


class BadHash:
    """An object whose hash raises ValueError."""

    def __hash__(self) -> int:
        raise ValueError("unhashable in an unusual way")


class Invalid(Exception):
    pass


MAX_ITEMS = 12
MAX_VALUES_PER_KEY = 4
DISABLED = frozenset({"off"})


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def storable(text: str) -> bool:
    """No NUL and no lone surrogate: a string every store can keep."""
    return "\x00" not in text and not any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def model_key(key: object) -> Optional[str]:
    """The key as the buffer should store it, or None when it is not a valid key."""
    if not isinstance(key, str):
        return None
    plain = str.__str__(key)
    return plain if 1 <= len(plain) <= 256 and storable(plain) else None


def model_json(value: object, depth: int = 0) -> Any:
    """The README's JSON value, written independently of the buffer; raises Invalid."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise Invalid
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid
        return float(value)
    if isinstance(value, str):
        if len(value) > 1024 or not storable(value):
            raise Invalid
        return str.__str__(value)
    if isinstance(value, (list, tuple, dict)) and depth >= 32:
        raise Invalid
    if isinstance(value, (list, tuple)):
        return [model_json(item, depth + 1) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(name, str) and storable(name) for name in value):
            raise Invalid
        return {str.__str__(name): model_json(item, depth + 1) for name, item in value.items()}
    raise Invalid


def model_value(value: object) -> Any:
    normalized = model_json(value)
    text = json.dumps(normalized, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode("utf-8", "surrogatepass")) > 16 * 1024:
        raise Invalid
    return normalized


class Model:
    """What the buffer must hold after a sequence of calls (README.md "API" rules, as written)."""

    def __init__(self) -> None:
        self.kinds: Dict[str, str] = {}
        self.data: Dict[str, Any] = {}
        self.items = 0
        self.dropped = 0

    def reset(self) -> None:
        self.kinds.clear()
        self.data.clear()
        self.items = 0

    def take(self) -> None:
        self.reset()
        self.dropped = 0

    def _admit(self, items: int) -> bool:
        if self.items + items > MAX_ITEMS:
            self.dropped += 1
            return False
        self.items += items
        return True

    def _member_room(self, held: int) -> bool:
        if held >= MAX_VALUES_PER_KEY:
            self.dropped += 1
            return False
        return self._admit(1)

    def apply(self, operation: Tuple[Any, ...]) -> None:
        kind, raw_key, *args = operation
        key = model_key(raw_key)
        if key is None:
            self.dropped += 1
            return
        if key in DISABLED or key.partition(":")[0] in DISABLED:
            return
        try:
            if kind == "add":
                if type(args[0]) is not int or not INT64_MIN <= args[0] <= INT64_MAX:
                    raise Invalid
                argument: Any = args[0]
            elif kind == "increment":
                argument = 1
            elif kind == "set_nested":
                subkey = model_key(args[0])
                if subkey is None:
                    raise Invalid
                argument = (subkey, model_value(args[1]))
            else:
                argument = model_value(args[0])
                if kind == "append_unique" and isinstance(argument, (list, dict)):
                    raise Invalid
        except Invalid:
            self.dropped += 1
            return
        stored_kind = "counter" if kind in ("add", "increment") else kind
        if self.kinds.get(key, stored_kind) != stored_kind:
            self.dropped += 1
            return
        new = key not in self.kinds
        if stored_kind == "counter":
            if new and self._admit(1):
                self.data[key] = argument
            elif not new:
                total = self.data[key] + argument
                if not INT64_MIN <= total <= INT64_MAX:  # saturates; the call is dropped
                    total = max(INT64_MIN, min(total, INT64_MAX))
                    self.dropped += 1
                self.data[key] = total
        elif stored_kind == "set":
            if not new or self._admit(1):
                self.data[key] = argument
        elif stored_kind == "set_nested":
            subkey, value = argument
            if new:
                if self._admit(2):
                    self.data[key] = {subkey: value}
            elif subkey in self.data[key] or self._member_room(len(self.data[key])):
                self.data[key][subkey] = value
        elif stored_kind == "append":
            if new:
                if self._admit(2):
                    self.data[key] = [argument]
            elif self._member_room(len(self.data[key])):
                self.data[key].append(argument)
        else:  # append_unique: members keyed by type, so 1, 1.0 and True differ
            member = (type(argument).__name__, argument)
            if new:
                if self._admit(2):
                    self.data[key] = {member: 1}
            elif member in self.data[key]:
                self.data[key][member] += 1
            elif self._member_room(len(self.data[key])):
                self.data[key][member] = 1
        if key in self.data:
            self.kinds[key] = stored_kind

    def wire(self) -> Dict[str, Any]:
        return {
            key: (
                [{"value": member[1], "count": count} for member, count in value.items()]
                if self.kinds[key] == "append_unique"
                else value
            )
            for key, value in self.data.items()
        }


def nest(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"k": [value]}
    return value


# Each call kind mostly uses a key of its own, so calls meet again on it (counting-set
# repeats, per-key caps); shared keys make kinds collide; then the invalid and disabled.
shared_keys = st.sampled_from(["a", "b:x"])
odd_keys: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["K" * 256, "off", "off:sub", "", "k" * 257, 5, None, b"a", 1.5, ("a",),
                     "k\x00", "k\ud800"]),
    st.builds(list),
    st.builds(BadHash),
    st.just(StrKey("a")),
)


def keys_for(own: str) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(own), st.just(own), st.just(own), shared_keys, odd_keys)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # includes NaN and infinities
    st.text(max_size=6),
    st.sampled_from([1, 1.0, True, 0, -0.0, "x" * 1024, "x" * 1025, "\ud800", "a\x00b", "é\udfff",
                     StrKey("s"), INT64_MAX, INT64_MIN, INT64_MAX + 1, INT64_MIN - 1]),
)
json_ish = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=4), children, max_size=4),
    ),
    max_leaves=10,
)
weird = st.one_of(
    st.builds(object),
    st.sets(st.integers(), max_size=2),
    st.frozensets(st.integers(), max_size=2),
    st.binary(max_size=3),
    st.complex_numbers(allow_nan=False, allow_infinity=False, max_magnitude=10),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
    st.sampled_from(
        [
            ["y" * 1000] * 17,  # over 16 KiB
            ["é" * 1000] * 9,  # under 16 KiB of characters, over it in UTF-8 bytes
            ["é" * 1000] * 8,  # just under
            nest(15),  # 31 levels of containers
            nest(16),  # 33
            {"a": {"b": float("nan")}},
        ]
    ),
)
values = st.one_of(json_ish, weird)
# Few distinct members, so counting sets see repeats, the per-key cap and 1 / 1.0 / True.
MEMBER_POOL = [1, 1.0, True, 0, False, -0.0, None, "1", "a"]
SUBKEY_POOL = ["s1", "s2", "s3", "s4", "s5", "s6"]
members = st.one_of(st.sampled_from(MEMBER_POOL), values)
subkeys = st.one_of(st.sampled_from(SUBKEY_POOL), odd_keys)
# Bursts: many calls on one key in one step, with enough distinct members, elements
# and subkeys to reach the per-key cap and repeats to count (plain lists rarely do).
distinct_then_more = st.builds(
    lambda pool, count, more: list(pool[:count]) + more,
    st.permutations(MEMBER_POOL),
    st.integers(1, len(MEMBER_POOL)),
    st.lists(members, max_size=4),
)
subkey_values = st.builds(
    lambda names, count, value, more: [(name, value) for name in names[:count]] + more,
    st.permutations(SUBKEY_POOL),
    st.integers(1, len(SUBKEY_POOL)),
    values,
    st.lists(st.tuples(subkeys, values), max_size=2),
)
elements = st.builds(
    lambda value, count, more: [value] * count + more,
    values,
    st.integers(1, 7),
    st.lists(values, max_size=2),
)
amounts = st.one_of(
    st.integers(), st.integers(), st.booleans(), st.floats(), st.just("1"),
    st.sampled_from([INT64_MAX, INT64_MIN, 2**62, -(2**62), INT64_MAX + 1]),
)
operations = st.one_of(
    st.tuples(st.just("set"), keys_for("value"), values),
    st.tuples(st.just("set_nested"), keys_for("mapping"), subkeys, values),
    st.tuples(st.just("add"), keys_for("counter"), amounts),
    st.tuples(st.just("increment"), keys_for("counter")),
    st.tuples(st.just("append"), keys_for("list"), values),
    st.tuples(st.just("append_unique"), keys_for("counting"), members),
    st.tuples(
        st.just("burst"),
        st.just("append_unique"),
        keys_for("counting"),
        distinct_then_more,
    ),
    st.tuples(st.just("burst"), st.just("append"), keys_for("list"), elements),
    st.tuples(
        st.just("burst"),
        st.just("set_nested"),
        keys_for("mapping"),
        subkey_values,
    ),
    st.just(("reset",)),
    st.just(("take",)),
)


def test_random_call_sequences_never_raise_and_round_trip(
    default_client: telemetry.Client, fail_on_internal_errors: List[BaseException]
) -> None:
    telemetry.init(
        INSTANCE,
        consent=True,
        disabled_keys=DISABLED,
        max_items=MAX_ITEMS,
        max_values_per_key=MAX_VALUES_PER_KEY,
    )
    errors = fail_on_internal_errors

    def check_payload(model: Model) -> None:
        payload = default_client.take_payload()
        assert payload is not None
        body = encode_payload(payload)
        assert decode_payload(body) == payload
        wire = json.loads(body)
        assert typed(wire["data"]) == typed(model.wire())
        assert wire["client"]["dropped"] == model.dropped
        assert payload.items == model.items
        model.take()

    @settings(
        max_examples=100,  # sequences of 10-60 steps: thousands of calls (more by hand)
        deadline=None,
        derandomize=True,  # the same examples on every run: a failure is reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(operations, min_size=10, max_size=60))
    def run(sequence: List[Tuple[Any, ...]]) -> None:
        errors_before = len(errors)
        default_client.take_payload()  # start each example from an empty buffer
        model = Model()
        for operation in sequence:
            if operation[0] == "take":
                check_payload(model)
                continue
            if operation[0] == "reset":
                telemetry.reset()
                model.reset()
                continue
            calls: List[Tuple[Any, ...]]
            if operation[0] == "burst":
                _, name, key, arguments = operation
                if name == "set_nested":
                    calls = [(name, key, subkey, value) for subkey, value in arguments]
                else:
                    calls = [(name, key, value) for value in arguments]
            else:
                calls = [operation]
            for call in calls:
                getattr(telemetry, call[0])(*call[1:])
                model.apply(call)
        check_payload(model)
        assert errors[errors_before:] == []

    run()


def test_the_model_can_tell_a_difference() -> None:
    model = Model()
    for operation in [
        ("append_unique", "u", 1),
        ("append_unique", "u", 1.0),
        ("append_unique", "u", True),
        ("append", "l", 1),
        ("increment", "c"),
        ("add", "c", True),
    ]:
        model.apply(operation)
    assert typed(model.wire()) == typed(
        {
            "u": [
                {"value": 1, "count": 1},
                {"value": 1.0, "count": 1},
                {"value": True, "count": 1},
            ],
            "l": [1],
            "c": 1,
        }
    )
    assert typed(model.wire()) != typed({"u": [{"value": 1, "count": 3}], "l": [1], "c": 1})
    assert model.items == 2 + 2 + 1 + 2
    assert model.dropped == 1


def test_fast_hash_is_documented_as_not_cryptographic() -> None:
    assert "not cryptographic" in (telemetry.fast_hash.__doc__ or "").lower()
    assert "not cryptographic" in (telemetry.Client.fast_hash.__doc__ or "").lower()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `fast_hash(")]
    assert "not cryptographic" in row.lower()
