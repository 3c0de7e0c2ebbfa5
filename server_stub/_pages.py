"""The console's HTML: pure functions from the JSON API's answers to pages.

Nothing here reads the store or the request: the console hands each function
the answers of its sub-requests to the JSON API (``Answer``), so the numbers a
page shows are the API's. Every string that reaches the markup goes through
``escape`` (text and attributes alike): keys, values, event names and
attributes all come from untrusted clients. No inline script or style: the
stylesheet and the optional script are files served beside the pages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlencode

from ._svg import Point, bar_chart, format_number, line_chart, ranking_chart

__all__ = [
    "WINDOWS",
    "Answer",
    "Frame",
    "PolicyForm",
    "events_page",
    "instance_page",
    "key_kind",
    "key_page",
    "keys_page",
    "login_page",
    "message_page",
    "overview_page",
    "policy_page",
    "value_label",
]

WINDOWS = (7, 30, 90)
"""The window selector's choices, in days."""
_TOP_KEYS = 10
_VALUE_CHARS = 120


@dataclass(frozen=True)
class Answer:
    """One JSON API answer: the query it came from (``/v1/...?...``), status and body."""

    query: str
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return self.status == 200 and isinstance(self.body, dict)

    @property
    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return f"{self.status}: {self.body['error']}"
        return f"the API answered {self.status}"


@dataclass(frozen=True)
class Frame:
    """What every page shows around its content: title, navigation, window, forms' token."""

    title: str
    section: str = ""
    """The navigation entry that is current: overview, keys, events, policy or ""."""
    days: int = 30
    since: str = ""
    until: str = ""
    """The window, ``YYYY-MM-DD``; ``until`` is exclusive."""
    here: str = "/"
    """This page's path and query without ``days``: the window links point back to it."""
    csrf: str = ""
    signed_in: bool = False
    """A session exists: show the sign-out button."""
    data: bool = True
    """False on pages that show no collected data (login, refusals): no navigation."""
    windowed: bool = True
    """The page's data depends on the window (say which one)."""


# -- small helpers ------------------------------------------------------------------------


def _href(path: str, **params: object) -> str:
    """``path?a=b`` with the non-None params, URL-encoded (escape it for an attribute)."""
    query = urlencode({name: value for name, value in params.items() if value is not None})
    return f"{path}?{query}" if query else path


def _with_days(here: str, days: int) -> str:
    return f"{here}{'&' if '?' in here else '?'}days={days}"


def value_label(value: object) -> str:
    """How a client's value reads on a page: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _short(text: str, limit: int = _VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_kind(value: object) -> str:
    """A key's kind from its ``/v1/stats`` total: counter, counting set or set (a value)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "counter"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(item, dict) and set(item) == {"value", "count"} for item in value)
    ):
        return "counting set"
    return "set"


def _day(t: object) -> str:
    """``2026-11-30T00:00:00Z`` → ``2026-11-30``."""
    return str(t)[:10]


def _number(value: object) -> Optional[float]:
    """``value`` when it is a number (not a bool), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _number_cell(value: object) -> str:
    number = _number(value)
    return f'<td class="num">{escape(format_number(number))}</td>'


class _Ids:
    """Unique element ids within one page."""

    def __init__(self) -> None:
        self._used: Dict[str, int] = {}

    def __call__(self, stem: str) -> str:
        count = self._used.get(stem, 0) + 1
        self._used[stem] = count
        return stem if count == 1 else f"{stem}-{count}"


_CSV_QUERIES = ("/v1/stats", "/v1/series", "/v1/breakdown", "/v1/active")


def _sources(query: str) -> str:
    """Links to the JSON (and CSV, where the API has it) that a page part came from, and
    the API query itself."""
    links = f'<a href="{escape("/data" + query)}">JSON</a>'
    if query.split("?", 1)[0] in _CSV_QUERIES:
        separator = "&" if "?" in query else "?"
        links += f' · <a href="{escape(f"/data{query}{separator}format=csv")}">CSV</a>'
    return f'<p class="sources">Data: {links} <code>GET {escape(query)}</code></p>'


def _problem(answer: Answer, what: str) -> str:
    return (
        f'<p class="problem" role="alert">Could not load {escape(what)}: '
        f"{escape(answer.error)} <code>GET {escape(answer.query)}</code></p>"
    )


def _table(
    caption: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    numeric_from: int = 1,
    empty: str = "Nothing in this window.",
) -> str:
    """A table; ``rows`` hold ready (escaped) cell markup, ``<td>`` included."""
    head = "".join(
        f'<th scope="col"{" class=" + chr(34) + "num" + chr(34) if i >= numeric_from else ""}>'
        f"{escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">{escape(empty)}</td></tr>'
    return (
        f"<table><caption>{escape(caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _panel(ids: _Ids, heading: str, chart: str, table: str, query: Optional[str]) -> str:
    """A chart with its numbers as a table beside it, and where the numbers came from."""
    panel_id = ids("panel")
    return (
        f'<section class="panel" aria-labelledby="{panel_id}-h">'
        f'<h2 id="{panel_id}-h">{escape(heading)}</h2>'
        f'<div class="chart-and-table"><figure class="chart-box">{chart}</figure>'
        f'<div class="table-box" role="region" tabindex="0" '
        f'aria-label="{escape(heading)}, as a table">{table}</div></div>'
        + (_sources(query) if query else "")
        + "</section>"
    )


# -- the frame ----------------------------------------------------------------------------

_NAVIGATION = (
    ("overview", "/", "Overview"),
    ("keys", "/keys", "Keys"),
    ("events", "/events", "Events"),
    ("policy", "/policy", "Policy"),
)


def _page(frame: Frame, content: str) -> str:
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(frame.title)} · telemetry console</title>",
        '<link rel="stylesheet" href="/static/console.css">',
        '<link rel="icon" href="/favicon.svg" type="image/svg+xml">',
        '<script src="/static/console.js" defer></script>',
        '</head><body><a class="skip" href="#main">Skip to content</a>',
        '<header class="top"><p class="brand"><a href="/">telemetry console</a></p>',
    ]
    if frame.data:
        items = "".join(
            f'<li><a href="{escape(_with_days(path, frame.days))}"'
            + (' aria-current="page"' if name == frame.section else "")
            + f">{label}</a></li>"
            for name, path, label in _NAVIGATION
        )
        parts.append(f'<nav class="sections" aria-label="Sections"><ul>{items}</ul></nav>')
        windows = "".join(
            f'<li><a href="{escape(_with_days(frame.here, days))}"'
            + (' aria-current="true"' if days == frame.days else "")
            + f">{days} days</a></li>"
            for days in WINDOWS
        )
        parts.append(f'<nav class="window" aria-label="Time window"><ul>{windows}</ul></nav>')
    if frame.signed_in:
        parts.append(
            '<form class="signout" method="post" action="/logout">'
            f'<input type="hidden" name="csrf" value="{escape(frame.csrf)}">'
            '<button type="submit">Sign out</button></form>'
        )
    parts.append(f'</header><main id="main"><h1>{escape(frame.title)}</h1>')
    if frame.data and frame.windowed:
        parts.append(
            f'<p class="window-note">{frame.days} days: '
            f'<time datetime="{escape(frame.since)}">{escape(frame.since)}</time> to '
            f'<time datetime="{escape(frame.until)}">{escape(frame.until)}</time> '
            "(UTC, end excluded).</p>"
        )
    parts.append(content)
    parts.append("</main><footer><p>Served by server_stub.")
    if frame.data:
        parts.append(" Every value on this page was sent by clients and is shown as text.")
    parts.append("</p></footer></body></html>")
    return "".join(parts)


def message_page(frame: Frame, message: str) -> str:
    """A page that only says something (a refusal, a missing page): no data."""
    return _page(frame, f'<p class="problem" role="alert">{escape(message)}</p>')


def login_page(frame: Frame, *, next_path: str, error: str = "") -> str:
    """The sign-in form: the read or admin token, kept by the server in a session cookie."""
    error_html = (
        f'<p id="token-error" class="field-error" role="alert">{escape(error)}</p>' if error else ""
    )
    invalid = ' aria-invalid="true" aria-describedby="token-error"' if error else ""
    content = (
        "<p>This console shows what the server collected. Sign in with the server's read "
        "token or admin token.</p>"
        '<form class="login" method="post" action="/login">'
        f'<input type="hidden" name="next" value="{escape(next_path)}">'
        '<label for="token">Token</label>'
        f'<input id="token" name="token" type="password" autocomplete="current-password" '
        f"required autofocus{invalid}>"
        f"{error_html}"
        '<button type="submit">Sign in</button></form>'
    )
    return _page(frame, content)


# -- overview -----------------------------------------------------------------------------


def _headline(label: str, value: object, note: str = "") -> str:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    note_html = f'<span class="note">{escape(note)}</span>' if note else ""
    return (
        f'<div class="headline"><dt>{escape(label)}</dt>'
        f'<dd><span class="figure">{escape(format_number(number))}</span>{note_html}</dd></div>'
    )


def _event_total(events: object) -> int:
    if not isinstance(events, dict):
        return 0
    return sum(
        count
        for names in events.values()
        if isinstance(names, dict)
        for count in names.values()
        if isinstance(count, int)
    )


def _points(answer: Answer) -> List[Mapping[str, Any]]:
    points = answer.body.get("points") if answer.ok else None
    return [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []


def _time_panel(
    ids: _Ids,
    heading: str,
    answer: Answer,
    field_name: str,
    column: str,
    *,
    line: bool = False,
    unit: str = "",
) -> str:
    if not answer.ok:
        return _problem(answer, heading.lower())
    points = _points(answer)
    marks = [
        Point(_day(p.get("t")), _number(p.get(field_name)), tick=_day(p.get("t"))[5:])
        for p in points
    ]
    draw = line_chart if line else bar_chart
    chart = draw(marks, title=heading, unit=unit)
    rows = (
        [
            f'<th scope="row"><time>{escape(_day(p.get("t")))}</time></th>',
            _number_cell(p.get(field_name)),
        ]
        for p in reversed(points)
    )
    table = _table(f"{heading}, newest first", ["Day", column], rows)
    return _panel(ids, heading, chart, table, answer.query)


def overview_page(frame: Frame, stats: Answer, active: Answer) -> str:
    """Headline numbers, then active instances, payloads and dropped items per day, top keys."""
    ids = _Ids()
    parts: List[str] = []
    if stats.ok:
        body = stats.body
        keys = body.get("keys") if isinstance(body.get("keys"), dict) else {}
        parts.append(
            '<section aria-labelledby="headlines-h"><h2 id="headlines-h" class="visually-hidden">'
            'Headline numbers</h2><dl class="headlines">'
            + _headline("Active instances", body.get("instances"))
            + _headline("Payloads", body.get("payloads"))
            + _headline("Dropped items", body.get("dropped"), "reported by clients")
            + _headline("Events", _event_total(body.get("events")))
            + _headline("Keys", len(keys))
            + "</dl>"
            + _sources(stats.query)
            + "</section>"
        )
    else:
        parts.append(_problem(stats, "the totals"))
    parts.append(_time_panel(ids, "Active instances per day", active, "instances", "Instances"))
    parts.append(_time_panel(ids, "Payloads per day", active, "payloads", "Payloads"))
    parts.append(_time_panel(ids, "Dropped items per day", active, "dropped", "Dropped"))
    if stats.ok and isinstance(stats.body.get("keys"), dict):
        parts.append(_top_keys(ids, frame, stats.body["keys"], stats.query))
    return _page(frame, "".join(parts))


def _key_link(frame: Frame, key: str) -> str:
    href = _href("/key", name=key, days=frame.days)
    return f'<a href="{escape(href)}">{escape(_short(key))}</a>'


def _summary(value: object) -> Tuple[str, Optional[float]]:
    """A key's total as text, and as a number for charts (counters and counting sets)."""
    kind = key_kind(value)
    if kind == "counter":
        assert isinstance(value, int)
        return format_number(value), value
    if kind == "counting set":
        assert isinstance(value, list)
        total = sum(item["count"] for item in value if isinstance(item.get("count"), int))
        return f"{format_number(len(value))} values, {format_number(total)} counted", total
    return _short(value_label(value)), None


def _top_keys(ids: _Ids, frame: Frame, keys: Mapping[str, Any], query: str) -> str:
    numbers = ((key, _summary(value)[1]) for key, value in keys.items())
    counted = sorted(
        ((key, number) for key, number in numbers if number is not None),
        key=lambda item: (-item[1], item[0]),
    )[:_TOP_KEYS]
    chart = ranking_chart([Point(k, n) for k, n in counted], title="Top keys by count")
    rows = (
        [f'<th scope="row">{_key_link(frame, key)}</th>', _number_cell(number)]
        for key, number in counted
    )
    table = _table("Top keys by count", ["Key", "Count"], rows)
    return _panel(ids, "Top keys by count", chart, table, query)


# -- keys ---------------------------------------------------------------------------------


def keys_page(frame: Frame, stats: Answer) -> str:
    """Every key reported in the window: its kind and total (or latest value)."""
    if not stats.ok:
        return _page(frame, _problem(stats, "the keys"))
    keys = stats.body.get("keys")
    keys = keys if isinstance(keys, dict) else {}
    rows = []
    for key, value in keys.items():
        text, number = _summary(value)
        cell = _number_cell(number) if key_kind(value) == "counter" else f"<td>{escape(text)}</td>"
        rows.append(
            [
                f'<th scope="row">{_key_link(frame, key)}</th>',
                f"<td>{escape(key_kind(value))}</td>",
                cell,
            ]
        )
    table = _table(
        f"{len(keys)} keys", ["Key", "Kind", "Total or latest value"], rows, numeric_from=3
    )
    return _page(frame, f'<section class="panel">{table}{_sources(stats.query)}</section>')


# -- one key ------------------------------------------------------------------------------


def key_page(frame: Frame, key: str, series: Answer, breakdown: Answer) -> str:
    """A key's series (sum per day for counters; reporting instances) and its breakdown."""
    ids = _Ids()
    parts: List[str] = []
    if series.ok and any(isinstance(p.get("value"), (int, float)) for p in _points(series)):
        parts.append(_time_panel(ids, "Total per day", series, "value", "Total"))
    parts.append(
        _time_panel(ids, "Instances reporting per day", series, "instances", "Instances", line=True)
    )
    if not breakdown.ok:
        parts.append(_problem(breakdown, "the breakdown"))
    else:
        parts.append(_breakdown_panel(ids, breakdown))
    return _page(frame, "".join(parts))


def _breakdown_panel(ids: _Ids, answer: Answer) -> str:
    kind = answer.body.get("kind")
    values = [v for v in answer.body.get("values") or [] if isinstance(v, dict)]
    if kind == "counting_set":
        heading, measure, column = "Top values by count", "count", "Count"
    elif kind == "set":
        heading, measure, column = "Latest value per instance", "instances", "Instances"
    else:
        return (
            '<section class="panel"><h2>Breakdown</h2><p>'
            + ("A counter has no breakdown." if kind == "counter" else "No values in this window.")
            + f"</p>{_sources(answer.query)}</section>"
        )
    marks = []
    for item in values:
        number = item.get(measure)
        marks.append(
            Point(
                value_label(item.get("value")), number if isinstance(number, (int, float)) else None
            )
        )
    chart = ranking_chart(marks, title=heading)
    headers = ["Value", column] + (["Instances"] if kind == "counting_set" else [])
    rows = []
    for item in values:
        cells = [
            f'<th scope="row">{escape(_short(value_label(item.get("value"))))}</th>',
            _number_cell(item.get(measure)),
        ]
        if kind == "counting_set":
            cells.append(_number_cell(item.get("instances")))
        rows.append(cells)
    return _panel(ids, heading, chart, _table(heading, headers, rows), answer.query)


# -- events -------------------------------------------------------------------------------


def _event_attributes(event: Mapping[str, Any]) -> List[Tuple[str, object]]:
    attributes = event.get("attrs")
    return sorted(attributes.items()) if isinstance(attributes, dict) else []


def _events_table(frame: Frame, events: Sequence[Mapping[str, Any]], caption: str) -> str:
    rows = []
    for event in events:
        attributes = "".join(
            f"<div><dt>{escape(_short(str(name), 60))}</dt>"
            f"<dd>{escape(_short(value_label(value)))}</dd></div>"
            for name, value in _event_attributes(event)
        )
        instance = str(event.get("instance_id", ""))
        instance_cell = (
            f'<a href="{escape(_href("/instance/" + instance, days=frame.days))}" '
            f'aria-label="Instance {escape(instance)}" title="{escape(instance)}">'
            f"{escape(instance[:8])}…</a>"
            if instance
            else ""
        )
        rows.append(
            [
                f"<td><time>{escape(str(event.get('event_time', '')))}</time></td>",
                f"<td>{escape(str(event.get('event_type', '')))}</td>",
                f"<td>{escape(str(event.get('event_name', '')))}</td>",
                f"<td>{instance_cell}</td>",
                f'<td><dl class="attributes">{attributes}</dl></td>',
            ]
        )
    return _table(
        caption,
        ["Time (UTC)", "Type", "Name", "Instance", "Attributes"],
        rows,
        numeric_from=99,
        empty="No events.",
    )


def events_page(
    frame: Frame, stats: Answer, events: Answer, *, event_type: str = "", event_name: str = ""
) -> str:
    """Counts by type and name in the window, then the latest events with their attributes."""
    ids = _Ids()
    parts: List[str] = []
    if stats.ok:
        counts = stats.body.get("events")
        counts = counts if isinstance(counts, dict) else {}
        pairs = sorted(
            (
                (str(t), str(n), c)
                for t, names in counts.items()
                if isinstance(names, dict)
                for n, c in names.items()
                if isinstance(c, int)
            ),
            key=lambda item: (-item[2], item[0], item[1]),
        )
        chart = ranking_chart(
            [Point(f"{t} / {n}", c) for t, n, c in pairs[:20]], title="Events by type and name"
        )
        rows = []
        for t, n, c in pairs:
            href = _href("/events", type=t, name=n, days=frame.days)
            rows.append(
                [
                    f'<th scope="row">{escape(_short(t))}</th>',
                    f'<td><a href="{escape(href)}">{escape(_short(n))}</a></td>',
                    _number_cell(c),
                ]
            )
        table = _table("Events by type and name", ["Type", "Name", "Count"], rows, numeric_from=2)
        parts.append(_panel(ids, "Events by type and name", chart, table, stats.query))
    else:
        parts.append(_problem(stats, "the event counts"))
    title = "Latest events"
    if event_type:
        title += f" of type {event_type}" + (f", name {event_name}" if event_name else "")
    if events.ok:
        listed = [e for e in events.body.get("events") or [] if isinstance(e, dict)]
        clear = (
            f' <a href="{escape(_href("/events", days=frame.days))}">Show all types</a>'
            if event_type
            else ""
        )
        parts.append(
            f'<section class="panel" aria-labelledby="latest-h"><h2 id="latest-h">'
            f"{escape(title)}</h2>{clear}"
            f'<div class="table-box wide" role="region" tabindex="0" aria-label="{escape(title)}">'
            f"{_events_table(frame, listed, title)}</div>{_sources(events.query)}</section>"
        )
    else:
        parts.append(_problem(events, "the latest events"))
    return _page(frame, "".join(parts))


# -- one instance -------------------------------------------------------------------------


def instance_page(frame: Frame, instance: Answer, events: Optional[Answer]) -> str:
    """One instance's stored payloads, newest first, and its latest events."""
    parts: List[str] = []
    if not instance.ok:
        parts.append(_problem(instance, "this instance's payloads"))
    else:
        payloads = [p for p in instance.body.get("payloads") or [] if isinstance(p, dict)]
        items = []
        for payload in payloads:
            data = json.dumps(payload.get("data"), indent=2, sort_keys=True, ensure_ascii=False)
            client = payload.get("client")
            client_text = value_label(client) if client else "\N{EN DASH}"
            items.append(
                '<li class="payload"><dl class="payload-meta">'
                f"<div><dt>Taken</dt><dd><time>{escape(str(payload.get('timestamp', '')))}"
                "</time></dd></div>"
                f"<div><dt>Received</dt><dd><time>{escape(str(payload.get('received_at', '')))}"
                "</time></dd></div>"
                f"<div><dt>Payload id</dt><dd><code>{escape(str(payload.get('payload_id', '')))}"
                "</code></dd></div>"
                f"<div><dt>Client</dt><dd>{escape(_short(client_text))}</dd></div></dl>"
                f'<pre class="payload-data" tabindex="0">{escape(data)}</pre></li>'
            )
        more = instance.body.get("next_offset")
        older = _href(frame.here.split("?", 1)[0], offset=more, days=frame.days)
        more_html = (
            f'<p>Older payloads: <a href="{escape(older)}">next page</a></p>'
            if isinstance(more, int)
            else ""
        )
        listing = (
            f'<ol class="payloads">{"".join(items)}</ol>' if items else "<p>No payloads stored.</p>"
        )
        parts.append(
            f'<section class="panel" aria-labelledby="payloads-h"><h2 id="payloads-h">'
            f"Payloads, newest first</h2>{listing}{more_html}{_sources(instance.query)}</section>"
        )
    if events is not None:
        if events.ok:
            listed = [e for e in events.body.get("events") or [] if isinstance(e, dict)]
            parts.append(
                '<section class="panel" aria-labelledby="ievents-h"><h2 id="ievents-h">'
                'Latest events</h2><div class="table-box wide" role="region" tabindex="0" '
                'aria-label="Latest events">'
                f"{_events_table(frame, listed, 'Latest events')}</div>"
                f"{_sources(events.query)}</section>"
            )
        else:
            parts.append(_problem(events, "this instance's events"))
    return _page(frame, "".join(parts))


# -- policy -------------------------------------------------------------------------------


@dataclass
class PolicyForm:
    """The policy form's fields as typed (strings), and the errors to show beside them."""

    next_update: str = "3600"
    disabled_keys: str = ""
    enabled_keys: str = ""
    stop: str = "none"
    """``none``, ``all`` or ``some`` (the ids in ``stop_ids``)."""
    stop_ids: str = ""
    rate_limited: bool = False
    rate_payloads: str = ""
    rate_window: str = ""
    errors: Dict[str, str] = field(default_factory=dict)
    """Field name (or ``form``) → message."""

    @classmethod
    def from_policy(cls, policy: Mapping[str, Any]) -> PolicyForm:
        """The form filled in from a ``GET /v1/policy`` answer."""
        stop = policy.get("stop", False)
        rate = policy.get("rate_limit")
        next_update = policy.get("next_update", 3600)
        return cls(
            next_update=format_number(next_update).replace(",", "")
            if isinstance(next_update, (int, float))
            else str(next_update),
            disabled_keys="\n".join(str(k) for k in policy.get("disabled_keys") or []),
            enabled_keys="\n".join(str(k) for k in policy.get("enabled_keys") or []),
            stop="all" if stop is True else ("some" if isinstance(stop, list) and stop else "none"),
            stop_ids="\n".join(str(i) for i in stop) if isinstance(stop, list) else "",
            rate_limited=isinstance(rate, dict),
            rate_payloads=str(rate.get("payloads", "")) if isinstance(rate, dict) else "",
            rate_window=format_number(rate.get("window")).replace(",", "")
            if isinstance(rate, dict) and isinstance(rate.get("window"), (int, float))
            else "",
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> PolicyForm:
        return cls(
            next_update=fields.get("next_update", "").strip(),
            disabled_keys=fields.get("disabled_keys", ""),
            enabled_keys=fields.get("enabled_keys", ""),
            stop=fields.get("stop", "none"),
            stop_ids=fields.get("stop_ids", ""),
            rate_limited=fields.get("rate_limited") == "on",
            rate_payloads=fields.get("rate_payloads", "").strip(),
            rate_window=fields.get("rate_window", "").strip(),
        )

    def to_policy(self) -> Optional[Dict[str, Any]]:
        """The policy JSON these fields mean, or None with ``errors`` filled in."""
        self.errors = {}
        policy: Dict[str, Any] = {}
        policy["next_update"] = self._number("next_update", self.next_update, integer=False)
        policy["disabled_keys"] = _lines(self.disabled_keys)
        policy["enabled_keys"] = _lines(self.enabled_keys)
        if self.stop == "all":
            policy["stop"] = True
        elif self.stop == "some":
            policy["stop"] = _lines(self.stop_ids)
            if not policy["stop"]:
                self.errors["stop_ids"] = "List at least one instance id, one per line."
        elif self.stop == "none":
            policy["stop"] = False
        else:
            self.errors["stop"] = "Choose one of the three."
        if self.rate_limited:
            policy["rate_limit"] = {
                "payloads": self._number("rate_payloads", self.rate_payloads, integer=True),
                "window": self._number("rate_window", self.rate_window, integer=False),
            }
        else:
            policy["rate_limit"] = None
        return None if self.errors else policy

    def _number(self, name: str, text: str, *, integer: bool) -> Optional[float]:
        try:
            number = int(text) if integer or text.isdigit() else float(text)
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            kind = "a whole number" if integer else "a number"
            self.errors[name] = f"Enter {kind}, e.g. {'10' if integer else '3600'}."
            return None
        return number


def _lines(text: str) -> List[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _field_error(form: PolicyForm, name: str) -> Tuple[str, str]:
    """The error paragraph for a field, and the attributes that tie the field to it."""
    message = form.errors.get(name)
    if not message:
        return "", ""
    return (
        f'<p id="{name}-error" class="field-error">{escape(message)}</p>',
        f' aria-invalid="true" aria-describedby="{name}-error"',
    )


def _policy_view(policy: Mapping[str, Any]) -> str:
    rows = []
    for name in ("next_update", "disabled_keys", "enabled_keys", "stop", "rate_limit"):
        value = policy.get(name)
        rows.append(
            f"<div><dt><code>{escape(name)}</code></dt>"
            f"<dd>{escape(_short(value_label(value), 400))}</dd></div>"
        )
    return f'<dl class="policy">{"".join(rows)}</dl>'


def policy_page(
    frame: Frame,
    policy: Answer,
    history: Answer,
    form: Optional[PolicyForm],
    *,
    can_change: bool,
    needs_token: bool,
    saved: bool = False,
) -> str:
    """The policy in force, its history, and the form to change it."""
    parts: List[str] = []
    if saved:
        parts.append('<p class="saved" role="status">The policy was saved.</p>')
    if policy.ok:
        parts.append(
            '<section class="panel" aria-labelledby="current-h"><h2 id="current-h">In force</h2>'
            f"{_policy_view(policy.body)}{_sources(policy.query)}</section>"
        )
    else:
        parts.append(_problem(policy, "the policy"))
    if form is not None and can_change:
        parts.append(_policy_form(frame, form, needs_token=needs_token))
    elif not can_change:
        parts.append(
            '<p class="note">Changing the policy needs the admin token: start the server with '
            "<code>--admin-token</code>.</p>"
        )
    if history.ok:
        changes = [c for c in history.body.get("changes") or [] if isinstance(c, dict)]
        rows = (
            [
                f"<td><time>{escape(str(c.get('time', '')))}</time></td>",
                f"<td>{escape(str(c.get('source', '')))}</td>",
                f"<td>{escape(', '.join(str(n) for n in c.get('changed') or []))}</td>",
                f"<td><code>{escape(_short(value_label(c.get('policy')), 400))}</code></td>",
            ]
            for c in changes
        )
        table = _table(
            "Changes, newest first",
            ["Time (UTC)", "Source", "Changed", "Policy"],
            rows,
            numeric_from=99,
            empty="No change yet.",
        )
        parts.append(
            '<section class="panel" aria-labelledby="history-h"><h2 id="history-h">History</h2>'
            f'<div class="table-box wide" role="region" tabindex="0" aria-label="Policy history">'
            f"{table}</div>{_sources(history.query)}</section>"
        )
    else:
        parts.append(_problem(history, "the policy history"))
    return _page(frame, "".join(parts))


def _policy_form(frame: Frame, form: PolicyForm, *, needs_token: bool) -> str:
    general = form.errors.get("form")
    parts = [
        '<section class="panel" aria-labelledby="edit-h"><h2 id="edit-h">Change the policy</h2>',
        '<form class="policy-form" method="post" action="/policy" novalidate>',
    ]
    if general:
        parts.append(f'<p id="form-error" class="problem" role="alert">{escape(general)}</p>')
    elif form.errors:
        parts.append(
            '<p id="form-error" class="problem" role="alert">The policy was not saved: '
            "correct the fields marked below.</p>"
        )
    parts.append(f'<input type="hidden" name="csrf" value="{escape(frame.csrf)}">')
    parts.append(f'<input type="hidden" name="days" value="{frame.days}">')
    error, attrs = _field_error(form, "next_update")
    parts.append(
        '<div class="field"><label for="next_update">Seconds between check-ins '
        "(<code>next_update</code>)</label>"
        f'<input id="next_update" name="next_update" inputmode="decimal" '
        f'value="{escape(form.next_update)}"{attrs}>{error}</div>'
    )
    for name, label in (
        ("disabled_keys", "Disabled keys, one per line (<code>disabled_keys</code>)"),
        ("enabled_keys", "Re-enabled keys, one per line (<code>enabled_keys</code>)"),
    ):
        error, attrs = _field_error(form, name)
        parts.append(
            f'<div class="field"><label for="{name}">{label}</label>'
            f'<textarea id="{name}" name="{name}" rows="3"{attrs}>'
            f"{escape(getattr(form, name))}</textarea>{error}</div>"
        )
    error, attrs = _field_error(form, "stop")
    radios = "".join(
        f'<div><input type="radio" id="stop-{value}" name="stop" value="{value}"'
        + (" checked" if form.stop == value else "")
        + f'><label for="stop-{value}">{label}</label></div>'
        for value, label in (
            ("none", "No instance"),
            ("all", "Every instance"),
            ("some", "These instances:"),
        )
    )
    ids_error, ids_attrs = _field_error(form, "stop_ids")
    parts.append(
        f'<fieldset class="field"{attrs}><legend>Tell to stop sending (<code>stop</code>)</legend>'
        f"{radios}{error}"
        '<label for="stop_ids" class="visually-hidden">Instance ids to stop, one per line</label>'
        f'<textarea id="stop_ids" name="stop_ids" rows="2"{ids_attrs}>'
        f"{escape(form.stop_ids)}</textarea>{ids_error}</fieldset>"
    )
    p_error, p_attrs = _field_error(form, "rate_payloads")
    w_error, w_attrs = _field_error(form, "rate_window")
    parts.append(
        '<fieldset class="field"><legend>Rate limit per instance (<code>rate_limit</code>)'
        "</legend>"
        '<div><input type="checkbox" id="rate_limited" name="rate_limited"'
        + (" checked" if form.rate_limited else "")
        + '><label for="rate_limited">Limit each instance to</label></div>'
        '<div class="inline"><label for="rate_payloads">Payloads</label>'
        f'<input id="rate_payloads" name="rate_payloads" inputmode="numeric" '
        f'value="{escape(form.rate_payloads)}"{p_attrs}>{p_error}'
        '<label for="rate_window">per seconds</label>'
        f'<input id="rate_window" name="rate_window" inputmode="decimal" '
        f'value="{escape(form.rate_window)}"{w_attrs}>{w_error}</div></fieldset>'
    )
    if needs_token:
        error, attrs = _field_error(form, "admin_token")
        parts.append(
            '<div class="field"><label for="admin_token">Admin token</label>'
            '<input id="admin_token" name="admin_token" type="password" autocomplete="off" '
            f"required{attrs}>{error}</div>"
        )
    parts.append('<button type="submit">Save the policy</button></form></section>')
    return "".join(parts)
