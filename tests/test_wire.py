"""Wire types and codec: ``Payload``/``Response`` encode and decode per docs/protocol.md."""

from __future__ import annotations

import gc
import gzip
import json
import logging
import random
import re
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import taken
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import _wire as wire
from telemetry._buffer import Buffer, member_value
from telemetry._version import __version__
from telemetry._wire import (
    CLIENT_NAME,
    SERVER_LIMITS,
    CountingSet,
    EncodedEvents,
    Payload,
    Response,
    WireLimits,
    decode_payload,
    decode_response,
    duration_to_seconds,
    encode_payload,
    encode_request,
    estimate_items,
    format_timestamp,
    iter_encoded_payload,
    new_payload_id,
    parse_retry_after,
    parse_timestamp,
    seconds_to_duration,
    split_to_fit,
    wire_data,
)

CADDY_EXAMPLE = Path("/work/shared/examples/caddy_go_client_payload.json")
if not CADDY_EXAMPLE.exists():  # a fresh clone keeps a copy next to the project
    CADDY_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / CADDY_EXAMPLE.name

UTC = timezone.utc
INSTANCE_ID = "3f0c2f5e-8a7b-4c1d-9e2f-0123456789ab"
PAYLOAD_ID = "9b1d" + "0123456789abcdef" + "0123456789ab"
WHEN = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)


def make_payload(**fields: Any) -> Payload:
    values: Dict[str, Any] = {
        "instance_id": INSTANCE_ID,
        "timestamp": WHEN,
        "payload_id": PAYLOAD_ID,
        "data": {},
    }
    values.update(fields)
    return Payload(**values)


def warning_messages(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- Payload encoding ---------------------------------------------------------------


def test_encode_payload_has_exactly_the_wire_fields() -> None:
    payload = make_payload(data={"hits": 3, "nested": {"a": [1, "x"]}}, dropped=7)
    assert json.loads(encode_payload(payload)) == {
        "instance_id": INSTANCE_ID,
        "timestamp": "2026-11-23T10:00:00.123456Z",
        "payload_id": PAYLOAD_ID,
        "data": {"hits": 3, "nested": {"a": [1, "x"]}},
        "client": {"name": "telemetry-python", "version": __version__, "dropped": 7},
    }


def test_encode_payload_never_sends_expect_next() -> None:
    body = encode_payload(make_payload(data={"expect": 1}))
    assert b"expect_next" not in body
    assert "expect_next" not in json.loads(body)


def test_encode_payload_is_compact_utf8() -> None:
    body = encode_payload(make_payload(data={"città": "naïve ✓"}))
    assert "città".encode() in body
    assert "naïve ✓".encode() in body
    assert b", " not in body
    assert b": " not in body
    assert json.loads(body.decode("utf-8"))["data"] == {"città": "naïve ✓"}


def test_encode_payload_with_empty_data_keeps_an_empty_object() -> None:
    assert json.loads(encode_payload(make_payload()))["data"] == {}


def test_counting_sets_go_on_the_wire_as_value_count_objects() -> None:
    buffer = Buffer()
    for value in ("GET", "POST", "GET", 443, 443.0, True):
        buffer.append_unique("methods", value)
    buffer.increment("hits")
    buffer.set_nested("memory", "heap", 1024)
    buffer.append("list", "x")
    buffer.set("version", "1.4.2")
    snapshot = taken(buffer)
    payload = make_payload(data=snapshot.data, dropped=snapshot.dropped, items=snapshot.items)
    wire = json.loads(encode_payload(payload))["data"]
    assert wire == {
        "methods": [
            {"value": "GET", "count": 2},
            {"value": "POST", "count": 1},
            {"value": 443, "count": 1},
            {"value": 443.0, "count": 1},
            {"value": True, "count": 1},
        ],
        "hits": 1,
        "memory": {"heap": 1024},
        "list": ["x"],
        "version": "1.4.2",
    }
    assert [type(entry["value"]) for entry in wire["methods"]] == [str, str, int, float, bool]


def test_encode_payload_escapes_lone_surrogates_and_decodes_them_back() -> None:
    payload = make_payload(data={"key\ud800": "\udfff", "plain": "é"})
    body = encode_payload(payload)
    body.decode("utf-8")  # valid UTF-8
    assert decode_payload(body) == payload


@pytest.mark.parametrize("chunk_keys", [1, 2, 3, 7, 512])
@pytest.mark.parametrize("keys", [0, 1, 5, 1100])
def test_encoded_chunks_join_to_exactly_encode_payload(chunk_keys: int, keys: int) -> None:
    data: Dict[str, Any] = {f"key{n}": [n, {"é": n}] for n in range(keys)}
    payload = make_payload(data=data, dropped=2)
    pieces = list(iter_encoded_payload(payload, chunk_keys=chunk_keys))
    assert "".join(pieces).encode("utf-8") == encode_payload(payload)
    assert json.loads("".join(pieces))["data"] == data
    assert len(pieces) >= 2 + -(-keys // chunk_keys)  # head, the key batches, tail


def test_default_chunking_splits_a_big_payload() -> None:
    payload = make_payload(data={f"k{n}": n for n in range(1100)})
    pieces = list(iter_encoded_payload(payload))
    assert len(pieces) >= 2 + 3
    assert "".join(pieces).encode("utf-8") == encode_payload(payload)


def test_encoded_chunks_join_for_big_single_values() -> None:
    data: Dict[str, Any] = {
        "small": 1,
        "list": list(range(5000)),
        "tuple": tuple(range(1500)),
        "mapping": {f"k{n}": [n] for n in range(3000)},
        "strings": ["é\ud800"] * 2100,
        "after": "x",
    }
    payload = make_payload(data=data)
    pieces = list(iter_encoded_payload(payload, chunk_keys=2))
    joined = "".join(pieces)
    assert joined.encode("utf-8") == encode_payload(payload)
    decoded = decode_payload(joined)
    assert decoded.data == {**data, "tuple": list(range(1500))}


def test_encoded_chunks_join_with_lone_surrogates_in_some_chunks() -> None:
    payload = make_payload(data={"a": "é", "b": "\ud800", "c": "ü", "d": 1})
    pieces = list(iter_encoded_payload(payload, chunk_keys=1))
    joined = "".join(pieces)
    assert joined.encode("utf-8") == encode_payload(payload)
    assert decode_payload(joined) == payload


def test_encode_payload_refuses_non_finite_floats() -> None:
    with pytest.raises(ValueError, match="JSON"):
        encode_payload(make_payload(data={"x": float("nan")}))


# -- timestamps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (WHEN, "2026-11-23T10:00:00.123456Z"),
        (datetime(2026, 11, 23, 10, 0, tzinfo=UTC), "2026-11-23T10:00:00.000000Z"),
        (
            datetime(2026, 11, 23, 11, 30, 0, 5, tzinfo=timezone(timedelta(hours=1, minutes=30))),
            "2026-11-23T10:00:00.000005Z",
        ),
        (
            datetime(2026, 11, 22, 23, 0, tzinfo=timezone(timedelta(hours=-11))),
            "2026-11-23T10:00:00.000000Z",
        ),
        (datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "0999-01-02T03:04:05.000000Z"),
    ],
)
def test_timestamps_are_rfc3339_utc_with_z_and_microseconds(when: datetime, text: str) -> None:
    assert format_timestamp(when) == text
    assert json.loads(encode_payload(make_payload(timestamp=when)))["timestamp"] == text


def test_payload_timestamp_is_stored_in_utc() -> None:
    local = datetime(2026, 11, 23, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    payload = make_payload(timestamp=local)
    assert payload.timestamp.utcoffset() == timedelta(0)
    assert payload.timestamp == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        make_payload(timestamp=datetime(2026, 11, 23, 10, 0))
    with pytest.raises(ValueError, match="timezone"):
        format_timestamp(datetime(2026, 11, 23, 10, 0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23T10:00:00.123456Z", WHEN),
        ("2026-11-23T10:00:00Z", datetime(2026, 11, 23, 10, 0, tzinfo=UTC)),
        ("2026-11-23t10:00:00.5z", datetime(2026, 11, 23, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-23T11:30:00.123456+01:30", WHEN),
        ("2026-11-23T02:00:00.123456-08:00", WHEN),
        ("2026-11-23T10:00:00.123456+00:00", WHEN),
        ("2026-11-23T10:00:00.123456789Z", WHEN),  # nanoseconds are truncated
        ("2026-11-23T10:00:00.123456999Z", WHEN),
        ("2026-11-23T10:00:00.1234567-00:00", WHEN),
        ("2026-11-23T10:00:00.1Z", datetime(2026, 11, 23, 10, 0, 0, 100000, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_accepts_z_offsets_and_nine_digit_fractions(
    text: str, expected: datetime
) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2026-11-23",
        "2026-11-23T10:00:00",  # no zone
        "2026-11-23T10:00Z",
        "2026-11-23T10:00:00.Z",
        "2026-11-23T10:00:00.1234567890Z",  # ten fraction digits
        "2026-11-23T10:00:00+0100",  # RFC 3339 offsets have a colon
        "2026-11-23T10:00:00Z ",
        "2026-11-23T10:00:00Z\n",
        " 2026-11-23T10:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-11-23T24:00:00Z",
        "2026-11-23T10:00:00+24:00",
        "\u0662\u0660\u0662\u0666-11-23T10:00:00Z",  # Arabic-Indic digits
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    ],
)
def test_parse_timestamp_rejects_anything_else_with_value_error(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_timestamp(text)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.datetimes(timezones=st.just(UTC)))
def test_format_then_parse_timestamp_round_trips(when: datetime) -> None:
    text = format_timestamp(when)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    assert parse_timestamp(text) == when


def test_caddy_example_timestamp_parses_but_the_body_is_not_a_client_payload() -> None:
    body = CADDY_EXAMPLE.read_bytes()
    obj = json.loads(body)
    assert parse_timestamp(obj["timestamp"]) == datetime(
        2026, 11, 23, 10, 37, 53, 527539, tzinfo=UTC
    )
    assert parse_timestamp(obj["expect_next"]) == datetime(1, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="payload_id"):
        decode_payload(body)  # it has no payload_id: not something this client wrote


# -- payload ids --------------------------------------------------------------------


def test_payload_ids_are_random_128_bit_lowercase_hex() -> None:
    ids = {make_payload(payload_id=new_payload_id()).payload_id for _ in range(100)}
    ids.add(Payload(instance_id=INSTANCE_ID, timestamp=WHEN).payload_id)
    assert len(ids) == 101
    for payload_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", payload_id)


@pytest.mark.parametrize(
    "payload_id",
    [
        "",
        "9B1D0123456789ABCDEF0123456789AB",
        "9b1d0123456789abcdef0123456789a",
        "9b1d0123456789abcdef0123456789abc",
        "9b1d0123456789abcdef0123456789ag",
        "9b1d0123456789abcdef0123456789ab\n",
        "9b1d0123-4567-89ab-cdef-0123456789ab",
    ],
)
def test_invalid_payload_ids_are_refused(payload_id: str) -> None:
    with pytest.raises(ValueError, match="payload_id"):
        make_payload(payload_id=payload_id)


# -- Payload decoding ---------------------------------------------------------------


def test_decode_payload_round_trips_every_field() -> None:
    payload = make_payload(
        data={"n": 1, "f": 1.5, "s": [{"value": None, "count": 2}], "m": {"k": [True]}},
        dropped=4,
        client_version="9.9.9",
    )
    decoded = decode_payload(encode_payload(payload))
    assert decoded == payload
    assert decoded.payload_id == PAYLOAD_ID
    assert decoded.timestamp == WHEN
    assert decoded.dropped == 4
    assert decoded.client_name == CLIENT_NAME
    assert decoded.client_version == "9.9.9"
    assert decoded.items == 1 + 1 + 2 + 2


def test_payload_equality_ignores_local_item_bookkeeping() -> None:
    assert make_payload(items=5) == make_payload(items=9)
    assert make_payload(items=5) != make_payload(dropped=1, items=5)


def test_decode_payload_accepts_text_bytes_and_mappings() -> None:
    payload = make_payload(data={"a": 1})
    body = encode_payload(payload)
    assert decode_payload(body) == payload
    assert decode_payload(body.decode("utf-8")) == payload
    assert decode_payload(json.loads(body)) == payload


def valid_payload_object() -> Dict[str, Any]:
    return json.loads(encode_payload(make_payload(data={"a": 1})))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("instance_id", 5),
        ("timestamp", "yesterday"),
        ("timestamp", None),
        ("payload_id", None),
        ("payload_id", "XYZ"),
        ("data", [1]),
        ("client", "telemetry-python"),
    ],
)
def test_decode_payload_refuses_malformed_fields(field: str, value: Any) -> None:
    obj = valid_payload_object()
    obj[field] = value
    with pytest.raises(ValueError):  # noqa: PT011
        decode_payload(json.dumps(obj))


@pytest.mark.parametrize("dropped", [-1, True, "3", 1.0, None])
def test_decode_payload_refuses_a_bad_dropped_count(dropped: Any) -> None:
    obj = valid_payload_object()
    obj["client"]["dropped"] = dropped
    with pytest.raises(ValueError, match="dropped"):
        decode_payload(json.dumps(obj))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b"null",
        b"\xff\xfe{",
        b"[" * 100_000,
        b'{"instance_id":"x","timestamp":"2026-11-23T10:00:00Z","payload_id":"'
        + PAYLOAD_ID.encode()
        + b'","data":{"n":NaN}}',
        b'{"instance_id":"x","timestamp":"2026-11-23T10:00:00Z","payload_id":"'
        + PAYLOAD_ID.encode()
        + b'","data":{"n":-Infinity}}',
    ],
)
def test_decode_payload_raises_value_error_for_non_payloads(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        decode_payload(body)


# -- responses ----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n"])
def test_an_empty_response_body_means_defaults(body: bytes) -> None:
    assert decode_response(body) == Response()
    assert Response() == Response(
        next_update=None, stop=False, error=None, disable_keys=(), enable_keys=()
    )


@pytest.mark.parametrize(
    "body", [b"not json", b"<html>", b"[]", b"[1]", b"null", b"true", b"3", b'"s"', b"\xff"]
)
def test_a_response_that_is_not_a_json_object_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="JSON"):
        decode_response(body)


def test_a_deeply_nested_response_raises_value_error() -> None:
    with pytest.raises(ValueError, match="JSON"):
        decode_response(b"[" * 100_000)


def test_a_full_response_is_decoded(caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps(
        {
            "next_update": 3_600_000_000_000,
            "stop": True,
            "error": "slow down",
            "disable_keys": ["tls", "dns:queries"],
            "enable_keys": ["http"],
        }
    ).encode()
    assert decode_response(body) == Response(
        next_update=3_600_000_000_000,
        stop=True,
        error="slow down",
        disable_keys=("tls", "dns:queries"),
        enable_keys=("http",),
    )
    assert warning_messages(caplog) == []


def test_unknown_response_fields_are_ignored_silently(caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"next_update": 5, "future_field": {"x": 1}, "Stop": true}'
    assert decode_response(body) == Response(next_update=5)
    assert warning_messages(caplog) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"next_update": true}', Response()),
        (b'{"next_update": 1.5}', Response()),
        (b'{"next_update": 3.6e12}', Response()),
        (b'{"next_update": "1h"}', Response()),
        (b'{"next_update": [1], "stop": true}', Response(stop=True)),
        (b'{"stop": 1}', Response()),
        (b'{"stop": "true"}', Response()),
        (b'{"stop": [true]}', Response()),
        (b'{"error": 5, "next_update": 7}', Response(next_update=7)),
        (b'{"disable_keys": "tls"}', Response()),
        (b'{"disable_keys": ["tls", 5]}', Response()),
        (b'{"enable_keys": {"tls": true}, "disable_keys": ["a"]}', Response(disable_keys=("a",))),
    ],
)
def test_wrong_typed_known_fields_are_ignored_and_named(
    body: bytes, expected: Response, caplog: pytest.LogCaptureFixture
) -> None:
    decoded = decode_response(body)
    assert decoded == expected
    assert len(decoded.ignored) == 1  # the emitter warns, at most once an hour per field
    assert warning_messages(caplog) == []


def test_stop_is_only_true_for_json_true(caplog: pytest.LogCaptureFixture) -> None:
    assert decode_response(b'{"stop": true}').stop is True
    assert decode_response(b'{"stop": false}').stop is False
    assert warning_messages(caplog) == []
    for body in (b'{"stop": 1}', b'{"stop": "yes"}', b'{"stop": {}}'):
        assert decode_response(body).stop is False


def test_next_update_keeps_non_positive_integers_for_the_emitter_to_judge() -> None:
    assert decode_response(b'{"next_update": 0}').next_update == 0
    assert decode_response(b'{"next_update": -5}').next_update == -5


def test_a_response_with_a_utf8_body_in_bytes_decodes() -> None:
    body = json.dumps({"error": "über"}, ensure_ascii=False).encode("utf-8")
    assert decode_response(body).error == "über"


# -- durations and Retry-After ------------------------------------------------------


def test_durations_are_integer_nanoseconds() -> None:
    assert seconds_to_duration(1.5) == 1_500_000_000
    assert seconds_to_duration(3600) == 3_600_000_000_000
    assert isinstance(seconds_to_duration(0.1), int)
    assert duration_to_seconds(1_500_000_000) == 1.5
    assert duration_to_seconds(seconds_to_duration(60.0)) == 60.0


NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 5 ", 5.0),
        ("007", 7.0),
        ("Mon, 23 Nov 2026 10:00:30 GMT", 30.0),
        ("Mon, 23 Nov 2026 11:00:00 GMT", 3600.0),
        ("Mon, 23 Nov 2026 09:00:00 GMT", 0.0),  # in the past: no wait
        ("Monday, 23-Nov-26 10:01:00 GMT", 60.0),  # obsolete RFC 850 form
        ("Mon, 23 Nov 2026 11:00:30 +0100", 30.0),
    ],
)
def test_parse_retry_after_takes_delta_seconds_and_http_dates(header: str, seconds: float) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_parse_retry_after_uses_the_given_now() -> None:
    header = format_datetime(datetime(2026, 11, 23, 10, 5, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(header, now=NOW) == 300.0
    assert parse_retry_after(header, now=NOW + 60) == 240.0


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "soon",
        "-5",
        "1.5",
        "+5",
        "5s",
        "1e3",
        "\u00b2",  # a superscript two: str.isdigit() says yes, but it is no number
        "\u0663",  # an Arabic-Indic three
        "Mon, 99 Nov 2026 10:00:30 GMT",
        "Mon, 23 Nov 99999 10:00:30 GMT",
    ],
)
def test_parse_retry_after_garbage_is_none(header: str) -> None:
    assert parse_retry_after(header, now=NOW) is None


# -- splitting to fit the server's limits --------------------------------------------------------


def secrets_hex(size: int) -> str:
    """``size`` hex digits from a seeded random source: text gzip cannot shrink much."""
    return random.Random(size).randbytes(size // 2).hex()


def _split_payload(**data: Any) -> Payload:
    return make_payload(data=data, dropped=3)


@pytest.mark.parametrize(
    ("data", "limits", "requests", "dropped"),
    [
        ({"a": 1}, WireLimits(), 1, 0),  # fits: the payload itself
        # 2.3 times too big: three parts at once (halving made four)
        ({f"k{i}": "v" * 900 for i in range(10)}, WireLimits(max_raw_bytes=4000), 3, 0),
        ({f"k{i}": "v" * 900 for i in range(10)}, WireLimits(max_raw_bytes=2000), 10, 0),
        # A key too big even alone is dropped, with the drop count its part carried.
        ({"big": "v" * 5000, "small": 1}, WireLimits(max_raw_bytes=4000), 1, 1 + 3),
        ({"small": 1, "big": "v" * 5000}, WireLimits(max_raw_bytes=4000), 1, 1),
        ({"big": "v" * 5000}, WireLimits(max_raw_bytes=4000), 0, 1 + 3),
        ({"ok": 1, "huge": 10**5000}, WireLimits(), 1, 1),  # cannot be encoded at all
        # Compressed bodies count against max_body_bytes: gzip does not save this one.
        ({"k": secrets_hex(3000)}, WireLimits(max_body_bytes=1000), 0, 1 + 3),
    ],
)
def test_split_to_fit_table(
    data: Dict[str, Any], limits: WireLimits, requests: int, dropped: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payload = _split_payload(**data)
    parts, lost = split_to_fit(payload, limits)
    assert (len(parts), lost) == (requests, dropped)
    for part in parts:
        raw = gzip.decompress(part.body) if part.gzipped else part.body
        assert len(part.body) <= limits.max_body_bytes and len(raw) <= limits.max_raw_bytes
        assert json.loads(raw) == json.loads(encode_payload(part.payload))
        assert part.gzipped == (len(raw) > limits.gzip_threshold)
    if requests == 1 and dropped == 0:
        assert parts[0].payload is payload
    elif parts:
        ids = {part.payload.payload_id for part in parts}
        assert len(ids) == len(parts) and payload.payload_id not in ids
        # The drop count travels once, on the first part (or is lost with it).
        assert [part.payload.dropped for part in parts[1:]] == [0] * (len(parts) - 1)
    # Nothing vanishes: every item and the drop count is sent or counted as lost.
    sent = sum(part.payload.items + part.payload.dropped for part in parts)
    assert sent + lost == estimate_items(data) + 3
    if dropped:
        assert "dropped" in caplog.text


def test_payload_items_default_to_the_estimate_and_may_be_given() -> None:
    data = {"a": 1, "l": [1, 2, 3], "m": {"x": 1}}
    assert make_payload(data=data).items == 1 + 4 + 2
    assert make_payload(data=data, items=42).items == 42


# -- counting sets: a view of the buffer's counts, written straight to text ----------

SET_MEMBERS: Dict[Any, int] = {"curl": 3, 7: 1, ("float", 1.0): 2, ("bool", True): 1,
                               ("NoneType", None): 4, "é\ud800": 1, 'q"\\': 2}


def _as_list(counts: Dict[Any, int]) -> List[Dict[str, Any]]:
    return [{"value": member_value(member), "count": count} for member, count in counts.items()]


def test_a_counting_set_reads_and_compares_as_the_list_it_stands_for() -> None:
    view = CountingSet(SET_MEMBERS, member_value)
    expected = _as_list(SET_MEMBERS)
    assert len(view) == len(expected)
    assert list(view) == expected
    assert view == expected and expected == view  # both ways round
    assert view != expected[:-1] and view != "curl"
    assert view[0] == {"value": "curl", "count": 3}
    assert view[-2:] == expected[-2:]
    assert list(view.counts()) == [(item["value"], item["count"]) for item in expected]
    assert estimate_items({"agents": view, "n": 1}) == 1 + len(expected) + 1
    with pytest.raises(TypeError):
        hash(view)


@pytest.mark.parametrize("chunk_elements", [1, 2, 3, 1024])
@pytest.mark.parametrize("chunk_keys", [1, 2, 512])
def test_a_counting_set_encodes_exactly_as_its_list(chunk_keys: int, chunk_elements: int) -> None:
    sets = {"small": SET_MEMBERS, "big": {f"{n:04x}": n + 1 for n in range(2500)}, "one": {"x": 1}}
    viewed: Dict[str, Any] = {"n": 1, "words": ["a", "b"]}
    listed: Dict[str, Any] = dict(viewed)
    for key, counts in sets.items():
        viewed[key], listed[key] = CountingSet(counts, member_value), _as_list(counts)
        viewed[key + ":after"] = listed[key + ":after"] = {"k": 1.5}
    pieces = list(iter_encoded_payload(make_payload(data=viewed), chunk_keys, chunk_elements))
    expected = list(iter_encoded_payload(make_payload(data=listed), chunk_keys, chunk_elements))
    assert "".join(pieces) == "".join(expected)
    assert encode_payload(make_payload(data=viewed)) == encode_payload(make_payload(data=listed))
    assert decode_payload(encode_payload(make_payload(data=viewed))) == make_payload(data=viewed)
    if chunk_elements < 1024:  # the big set is spread over pieces of at most chunk_elements
        assert len(pieces) > 2500 // chunk_elements


def test_a_snapshot_of_counting_sets_keeps_no_object_per_member() -> None:
    buffer = Buffer()
    for key in ("agents:0", "agents:1"):
        for n in range(5000):
            buffer.append_unique(key, f"{n * 2654435761 % 2**32:08x}")
    snapshot = buffer.take()
    # Disabled only to read the collector's allocation count: each object it tracks
    # counts one while it lives, and enough of them start a collection.
    gc.disable()
    try:
        before = gc.get_count()[0]
        data = wire_data(snapshot.plain_tables, snapshot.counting_sets, member_value)
        request, _ = encode_request(make_payload(data=data))
        kept = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert kept < 100  # a dict per member would be 10,000
    sent = json.loads(gzip.decompress(request.body))["data"]
    assert [len(sent[key]) for key in ("agents:0", "agents:1")] == [5000, 5000]


# -- events kept as their JSON text ------------------------------------------------

WIRE_EVENTS = [
    {"event_id": f"{n:032x}", "event_time": "2027-01-15T08:00:00.123456Z",
     "event_type": "behavioral", "event_name": f"click-{n % 7}", "page": "/é/ü", "n": n,
     "ratio": n / 3, "ok": n % 2 == 0, "none": None}
    for n in range(300)
]


def test_encoded_events_read_and_compare_as_the_events_they_hold() -> None:
    encoded = EncodedEvents.of(WIRE_EVENTS)
    assert len(encoded) == 300 and list(encoded) == WIRE_EVENTS
    expected = list(WIRE_EVENTS)
    assert encoded == expected and expected == encoded  # both ways round
    assert encoded == tuple(WIRE_EVENTS) and encoded != WIRE_EVENTS[:-1] and encoded != "x"
    assert encoded[5] == WIRE_EVENTS[5] and encoded[-1] == WIRE_EVENTS[-1]
    part = encoded[10:20]
    assert isinstance(part, EncodedEvents) and part == WIRE_EVENTS[10:20]
    assert not any(gc.is_tracked(text) for text in encoded.texts)
    with pytest.raises(TypeError):
        hash(encoded)


def test_encoded_events_slice_across_their_chunks_as_a_list_would() -> None:
    encoded = EncodedEvents.of(WIRE_EVENTS)
    assert len(encoded.chunks) == 5  # 300 events, 64 a chunk: not one string per event
    assert [len(chunk) for chunk in encoded.chunks] == [
        len(",".join(encoded.texts[start : start + 64])) for start in range(0, 300, 64)
    ]
    for start, stop in [(0, 300), (0, 64), (63, 65), (64, 128), (1, 299), (100, 100),
                        (250, 400), (-70, -3), (290, 10)]:
        part = encoded[start:stop]
        assert isinstance(part, EncodedEvents) and len(part) == len(WIRE_EVENTS[start:stop])
        assert list(part) == WIRE_EVENTS[start:stop], (start, stop)
        assert part[1:-1] == WIRE_EVENTS[start:stop][1:-1]  # a slice of a slice
        assert encode_payload(make_payload(events=part)) == encode_payload(
            make_payload(events=WIRE_EVENTS[start:stop]))
    assert encoded[::7] == WIRE_EVENTS[::7] and encoded[-300] == WIRE_EVENTS[0]
    assert EncodedEvents() == [] and not EncodedEvents.of([]).chunks
    with pytest.raises(IndexError):
        encoded[300]
    with pytest.raises(IndexError):
        encoded[-301]
    assert encoded[10:200] == EncodedEvents.of(WIRE_EVENTS[10:200])  # chunked differently


def test_encoded_events_encode_exactly_as_the_same_events_as_dicts() -> None:
    data = {"n": 1, "words": ["a"]}
    encoded = make_payload(data=data, events=EncodedEvents.of(WIRE_EVENTS))
    plain = make_payload(data=data, events=WIRE_EVENTS)
    assert isinstance(encoded.events, EncodedEvents)  # the payload keeps them encoded
    assert encode_payload(encoded) == encode_payload(plain)
    assert list(iter_encoded_payload(encoded)) == list(iter_encoded_payload(plain))
    assert decode_payload(encode_payload(encoded)) == plain == encoded


def test_an_encoded_lone_surrogate_is_escaped_and_decodes_back() -> None:
    event = {"event_id": "0" * 32, "event_time": "2027-01-15T08:00:00Z",
             "event_type": "metric", "event_name": "x", "bad": "a\ud800b"}
    encoded = EncodedEvents.of([event])
    assert encoded.texts[0].encode("utf-8")  # no UnicodeEncodeError
    assert list(decode_payload(encode_payload(make_payload(events=encoded))).events) == [event]


def test_split_to_fit_encodes_a_payload_far_too_big_about_twice_not_once_per_halving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: List[int] = []
    real_encode_request = wire.encode_request

    def counting(payload: Payload, limits: WireLimits = SERVER_LIMITS) -> Any:
        encoded.append(len(payload.events))
        return real_encode_request(payload, limits)

    monkeypatch.setattr(wire, "encode_request", counting)
    events = EncodedEvents.of(WIRE_EVENTS)
    body = len(encode_payload(make_payload(events=events)))
    parts, lost = split_to_fit(make_payload(events=events),
                               WireLimits(max_body_bytes=body // 10, gzip_threshold=10**9))
    assert lost == 0 and 10 <= len(parts) <= 13
    assert [event for part in parts for event in part.payload.events] == WIRE_EVENTS
    assert sum(encoded) <= 2.5 * len(WIRE_EVENTS)  # halving: about 5 times


def test_split_to_fit_keeps_encoded_events_encoded_and_sends_them_all_in_order() -> None:
    payload = make_payload(data={"k": 1}, events=EncodedEvents.of(WIRE_EVENTS))
    parts, lost = split_to_fit(payload, WireLimits(max_body_bytes=4000, gzip_threshold=10**9))
    assert lost == 0 and len(parts) > 2
    event_parts = [part.payload.events for part in parts if part.payload.events]
    assert all(isinstance(events, EncodedEvents) for events in event_parts)
    assert [event for events in event_parts for event in events] == WIRE_EVENTS
    for part in parts:
        assert len(part.body) <= 4000
        assert json.loads(part.body) == json.loads(encode_payload(part.payload))
