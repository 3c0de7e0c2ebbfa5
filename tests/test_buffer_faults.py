"""Hostile collection calls: whatever the application collects arrives intact or is counted.

Each test drives the real client against the real ``server_stub`` over loopback.
Time is virtual (``make_client`` + ``VirtualTime``) wherever the client waits;
only the server's scripted delays and the client's short ``send_timeout`` are real.
Randomness is seeded: the Hypothesis properties by ``derandomize``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Tuple

import pytest
from conftest import emitter_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import telemetry
from server_stub import Server
from telemetry._wire import decode_payload, encode_payload

MakeClient = Callable[..., telemetry.Client]


# -- fuzz: whatever the application collects ------------------------------------------------


class _StrKey(str):
    pass


class _HugeInt(int):
    """An int with more digits than ``str(int)`` allows (4300), and a short repr."""

    def __repr__(self) -> str:
        return f"_HugeInt(~{self.bit_length()} bits)"


def _nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


_KEYS: st.SearchStrategy[Any] = (
    st.text(max_size=8)
    | st.sampled_from(["k", "k:sub", "x" * 256, "x" * 257, "", "\ud800", "é:ü", "a b"])
    | st.builds(_StrKey, st.text(min_size=1, max_size=4))
    | st.sampled_from([None, 5, 1.5, b"k", ("k",), frozenset()])
)
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([2**64, -(2**63), -0.0, 5e-324, 1.7976931348623157e308,
                       "\ud800", "\x00", "x" * 1025, "\u2028"])
)
# More digits than str(int) allows (an int subclass): refused at the call like any int
# outside 64 bits.
_HUGE_INTS = st.sampled_from([10**5000, -(10**4400)]).map(_HugeInt)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=3) | st.tuples(children)
    | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3),
    max_leaves=8,
) | st.sampled_from([object(), {1, 2}, b"bytes", 1j, _nested(33), _nested(31)]) | _HUGE_INTS
_CALLS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), _KEYS, _VALUES),
        st.tuples(st.just("set_nested"), _KEYS, _KEYS, _VALUES),
        st.tuples(st.just("add"), _KEYS, st.integers() | _SCALARS | _HUGE_INTS),
        st.tuples(st.just("increment"), _KEYS),
        st.tuples(st.just("append"), _KEYS, _VALUES),
        st.tuples(st.just("append_unique"), _KEYS, _VALUES),
        st.just(("reset",)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(calls=_CALLS)
def test_any_collection_call_is_delivered_intact(
    make_client: MakeClient, telemetry_server: Server,
    fail_on_internal_errors: List[BaseException], calls: List[Tuple[Any, ...]],
) -> None:
    client = make_client(max_items=50, max_values_per_key=5)
    client.start_emitting()
    seen = len(telemetry_server.requests)
    for call in calls:
        getattr(client, call[0])(*call[1:])  # never raises
    assert client.flush(timeout=10)
    assert fail_on_internal_errors == []
    thread = emitter_of(client).thread
    assert thread is not None and thread.is_alive()
    sent = [r for r in telemetry_server.requests[seen:] if r.path.startswith("/v1/update/")]
    stored = {p["payload_id"]: p for p in telemetry_server.stored_payloads()}
    for request in sent:
        assert request.status == 200, (request.status, request.decoded_body)
        assert request.decoded_body is not None
        payload = decode_payload(request.decoded_body)  # the client's own codec agrees
        assert json.loads(encode_payload(payload)) == request.json
        assert stored[payload.payload_id]["data"] == request.json["data"]
    client.stop_emitting(timeout=1)


def test_ints_past_64_bits_never_reach_the_server(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # An int a store cannot sum must not cost the whole payload: it is refused at
    # the call ("huge"), and a counter that grows past the bound stays at it ("grown").
    client = make_client()
    client.set("huge", 2**63)
    for _ in range(3):
        client.add("grown", 2**62)  # the second and third pass the bound
    client.increment("kept")
    client.start_emitting()
    assert client.flush(timeout=5)
    client.increment("after")
    assert client.flush(timeout=5)
    stats = telemetry_server.stats()
    assert stats["keys"] == {"after": 1, "kept": 1, "grown": 2**63 - 1}
    assert stats["dropped"] == 3  # huge, and the two calls past the bound
    assert "signed 64-bit" in caplog.text


def test_a_string_no_store_can_keep_never_costs_the_payload(
    make_client: MakeClient, telemetry_server: Server
) -> None:
    # U+0000 made a PostgreSQL-backed server refuse a whole payload: refused at the call.
    client = make_client()
    for _ in range(100):
        client.increment("hits")
    client.set("name", "a\x00b")
    client.append_unique("agents", "\ud800")
    client.start_emitting()
    assert client.flush(timeout=5)
    stats = telemetry_server.stats()
    assert stats["keys"] == {"hits": 100}
    assert stats["dropped"] == 2


def test_an_int_too_long_to_encode_inside_a_container_is_a_rejected_value(
    make_client: MakeClient, fail_on_internal_errors: List[BaseException]
) -> None:
    client = make_client()
    client.append("list", [10**5000])
    client.set("mapping", {"n": 10**5000})
    client.set("scalar", -(10**5000))
    client.add("counter", 10**5000)
    errors = list(fail_on_internal_errors)
    fail_on_internal_errors.clear()  # reported here, not by the fixture
    assert errors == []
    payload = client.take_payload()
    assert payload is not None and payload.data == {} and payload.dropped == 4
