"""Hostile collection calls: whatever the application collects arrives intact or is counted.

Each test drives the real client against the real ``server_stub`` over loopback.
Time is virtual (``make_client`` + ``VirtualTime``) wherever the client waits;
only the server's scripted delays and the client's short ``send_timeout`` are real.
Randomness is seeded: the Hypothesis properties by ``derandomize``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest
from conftest import dead_endpoint, emitter_of, state_of
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
# More digits than str(int) allows: accepted by the buffer as a scalar, unencodable.
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


def test_an_int_too_long_to_encode_drops_only_its_key(
    make_client: MakeClient, telemetry_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by the fuzz above: json refuses an int of more than 4300 digits; encoding
    # raised ValueError and killed the emitter thread. The buffer now refuses such a
    # value ("huge"), but a counter can still grow past it ("grown").
    client = make_client()
    client.set("huge", 10**5000)
    for _ in range(10):
        client.add("grown", 10**4299)  # each fits; the sum (4301 digits) does not
    client.increment("kept")
    client.start_emitting()
    assert client.flush(timeout=5)
    client.increment("after")
    assert client.flush(timeout=5)
    stats = telemetry_server.stats()
    assert stats["keys"] == {"after": 1, "kept": 1}
    assert stats["dropped"] == 2  # huge and grown, one item each
    assert "cannot be encoded" in caplog.text


def test_an_int_too_long_to_encode_never_reaches_the_spool(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    client = make_client(endpoint=dead_endpoint())
    client.start_emitting()
    for _ in range(10):
        client.add("grown", 10**4299)  # each fits; the sum (4301 digits) does not
    client.increment("kept")
    client.stop_emitting(timeout=0.5)  # the last data was never encoded: now it is
    spooled = state_of(tmp_path).spool.payloads()
    assert [key for payload in spooled for key in payload.data] == ["kept"]
    # The drop is counted: on the spooled payload, or carried by the next one.
    carried = client.take_payload()
    assert carried is not None
    assert sum(payload.dropped for payload in spooled) + carried.dropped == 1
    assert "cannot be encoded" in caplog.text


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
