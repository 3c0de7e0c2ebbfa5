"""The console's page renderers, fed JSON API answers of the documented shapes.

The browser tests run the real thing end to end; these pin the details that
are awkward to reach there: escaping in every place a client string lands,
the policy form's parsing and its error messages.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

import pytest

from server_stub._pages import (
    Answer,
    Frame,
    PolicyForm,
    events_page,
    instance_page,
    key_kind,
    key_page,
    keys_page,
    overview_page,
    policy_page,
)

HOSTILE = "<img src=x onerror=alert(1)>"
SCRIPT_END = "</script><script>alert(2)</script>"
FRAME = Frame(title="T", days=7, since="2026-11-25", until="2026-12-02", csrf="c" * 64)


def days(count: int) -> List[str]:
    return [f"2026-11-{25 + i:02}T00:00:00Z" for i in range(count)]


def stats_answer() -> Answer:
    keys: Dict[str, Any] = {
        "requests": 1234,
        HOSTILE: 3,
        "version": SCRIPT_END,
        "features": [{"value": HOSTILE, "count": 4}, {"value": "tls", "count": 9}],
    }
    body = {
        "instances": 5,
        "payloads": 17,
        "dropped": 2,
        "keys": keys,
        "events": {"log": {"error": 2}, HOSTILE: {SCRIPT_END: 1}},
    }
    return Answer("/v1/stats?since=2026-11-25&until=2026-12-02", 200, body)


def active_answer() -> Answer:
    points = [
        {"t": t, "instances": i, "payloads": 2 * i, "dropped": 0} for i, t in enumerate(days(7))
    ]
    return Answer("/v1/active?bucket=day", 200, {"bucket": "day", "points": points})


def assert_no_markup_from(html: str, *hostile: str) -> None:
    for text in hostile:
        assert text not in html
    assert "<img" not in html
    # Our one script tag, from our own file; no other.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/console.js" defer>']


def count(html: str, cls: str) -> int:
    return len(re.findall(rf'class="{cls}"', html))


def test_overview_shows_the_totals_and_a_bar_per_day() -> None:
    html = overview_page(FRAME, stats_answer(), active_answer())
    for figure in ("5", "17", "2"):
        assert f'<span class="figure">{figure}</span>' in html
    assert '<span class="figure">3</span>' in html  # events: 2 + 1
    # three charts of 7 days (the first day's 0s are bars of height 0) + top keys (3 counted)
    assert count(html, "bar") == 3 * 7 + 3
    assert_no_markup_from(html, HOSTILE, SCRIPT_END)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'href="/data/v1/active?bucket=day"' in html
    assert 'href="/data/v1/active?bucket=day&amp;format=csv"' in html


def test_keys_page_lists_every_key_with_its_kind() -> None:
    html = keys_page(FRAME, stats_answer())
    assert "counting set" in html and "counter" in html
    assert 'href="/key?name=%3Cimg+src%3Dx+onerror%3Dalert%281%29%3E&amp;days=7"' in html
    assert_no_markup_from(html, HOSTILE, SCRIPT_END)


def test_key_kinds() -> None:
    assert key_kind(3) == "counter"
    assert key_kind(True) == "set"
    assert key_kind([{"value": 1, "count": 2}]) == "counting set"
    assert key_kind([1, 2]) == "set"
    assert key_kind({"a": 1}) == "set"


def test_key_page_charts_series_and_breakdown() -> None:
    points = [{"t": t, "value": 3, "instances": 1} for t in days(7)]
    series = Answer("/v1/series?key=x", 200, {"key": HOSTILE, "bucket": "day", "points": points})
    values = [
        {"value": HOSTILE, "count": 4, "instances": 2},
        {"value": "tls", "count": 1, "instances": 1},
    ]
    breakdown = Answer(
        "/v1/breakdown?key=x", 200, {"key": "f", "kind": "counting_set", "values": values}
    )
    html = key_page(Frame(title=f"Key {HOSTILE}"), HOSTILE, series, breakdown)
    assert count(html, "bar") == 7 + 2
    assert count(html, "point") == 7
    assert_no_markup_from(html, HOSTILE)


def test_a_set_key_has_no_total_chart_and_ranks_by_instances() -> None:
    points = [{"t": t, "value": None, "instances": 1} for t in days(7)]
    series = Answer("/v1/series", 200, {"key": "v", "bucket": "day", "points": points})
    values = [{"value": "1.2", "instances": 7}, {"value": {"a": [1]}, "instances": 1}]
    breakdown = Answer("/v1/breakdown", 200, {"key": "v", "kind": "set", "values": values})
    html = key_page(FRAME, "v", series, breakdown)
    assert "Total per day" not in html
    assert count(html, "bar") == 2
    assert "{&quot;a&quot;: [1]}" in html


def test_events_page_shows_attributes_as_text() -> None:
    event = {
        "instance_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "event_id": "a" * 32,
        "event_time": "2026-12-01T10:00:00.000000Z",
        "event_type": HOSTILE,
        "event_name": SCRIPT_END,
        "attrs": {"note": SCRIPT_END, HOSTILE: 1},
        "received_at": "2026-12-01T10:00:01.000000Z",
    }
    events = Answer("/v1/events?limit=50", 200, {"events": [event], "next_offset": None})
    html = events_page(FRAME, stats_answer(), events)
    assert_no_markup_from(html, HOSTILE, SCRIPT_END)
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in html
    assert 'href="/instance/0f8fad5b-d9cb-469f-a165-70867728950e?days=7"' in html


def test_instance_page_shows_payload_data_escaped() -> None:
    payload = {
        "payload_id": "b" * 32,
        "timestamp": "2026-12-01T10:00:00Z",
        "received_at": "2026-12-01T10:00:01Z",
        "data": {HOSTILE: SCRIPT_END},
        "client": None,
    }
    answer = Answer("/v1/instances/x", 200, {"payloads": [payload], "next_offset": 20})
    html = instance_page(Frame(title="I", here="/instance/x"), answer, None)
    assert_no_markup_from(html, HOSTILE, SCRIPT_END)
    assert 'href="/instance/x?offset=20&amp;days=30"' in html


def test_an_api_error_is_shown_escaped_instead_of_the_data() -> None:
    failed = Answer("/v1/stats", 400, {"error": f"bad {HOSTILE}"})
    html = keys_page(FRAME, failed)
    assert 'role="alert"' in html and "400: bad &lt;img" in html
    assert_no_markup_from(html, HOSTILE)


def test_policy_form_builds_the_policy_json() -> None:
    form = PolicyForm.from_fields(
        {
            "next_update": "90.5",
            "disabled_keys": "tls\n\n  version  \n",
            "enabled_keys": "",
            "stop": "some",
            "stop_ids": "0F8FAD5B-D9CB-469F-A165-70867728950E\n",
            "rate_limited": "on",
            "rate_payloads": "10",
            "rate_window": "60",
        }
    )
    assert form.to_policy() == {
        "next_update": 90.5,
        "disabled_keys": ["tls", "version"],
        "enabled_keys": [],
        "stop": ["0F8FAD5B-D9CB-469F-A165-70867728950E"],
        "rate_limit": {"payloads": 10, "window": 60},
    }
    assert form.errors == {}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"next_update": "soon"}, "next_update"),
        ({"next_update": "nan"}, "next_update"),
        ({"next_update": "60", "stop": "some", "stop_ids": " \n"}, "stop_ids"),
        (
            {"next_update": "60", "rate_limited": "on", "rate_payloads": "1.5", "rate_window": "9"},
            "rate_payloads",
        ),
        ({"next_update": "60", "stop": "maybe"}, "stop"),
    ],
)
def test_policy_form_errors_name_their_field(fields: Dict[str, str], field: str) -> None:
    form = PolicyForm.from_fields(fields)
    assert form.to_policy() is None
    assert list(form.errors) == [field]
    policy = Answer("/v1/policy", 200, {"next_update": 60})
    history = Answer("/v1/policy/history", 200, {"changes": []})
    html = policy_page(FRAME, policy, history, form, can_change=True, needs_token=False)
    assert f'id="{field}-error"' in html
    assert f'aria-describedby="{field}-error"' in html
    assert 'name="admin_token"' not in html


def test_policy_form_round_trips_the_policy_in_force() -> None:
    policy = {
        "next_update": 7200,
        "disabled_keys": ["a", "b"],
        "enabled_keys": ["c"],
        "stop": True,
        "rate_limit": {"payloads": 5, "window": 30.0},
    }
    form = PolicyForm.from_policy(policy)
    assert form.to_policy() == policy
    html = policy_page(
        FRAME,
        Answer("/v1/policy", 200, policy),
        Answer("/v1/policy/history", 200, {"changes": []}),
        form,
        can_change=True,
        needs_token=True,
    )
    assert 'name="admin_token"' in html
    assert f'name="csrf" value="{"c" * 64}"' in html
