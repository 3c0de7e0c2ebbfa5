"""The console's inline SVG charts: marks, axes, escaping."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from server_stub._svg import Point, bar_chart, format_number, line_chart, nice_ticks, ranking_chart

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def marks(root: ET.Element, tag: str) -> list[ET.Element]:
    return [el for el in root.iter(f"{SVG}{tag}") if el.get("class") in ("bar", "point")]


def test_bar_chart_draws_one_bar_per_number_with_its_value() -> None:
    points = [Point(f"2026-11-{day:02}", value) for day, value in ((1, 3), (2, 0), (3, 12))]
    root = parse(bar_chart(points, title="Payloads per day"))
    bars = marks(root, "rect")
    assert [bar.get("data-value") for bar in bars] == ["3", "0", "12"]
    assert [bar.get("data-label") for bar in bars] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    heights = [float(bar.get("height", "nan")) for bar in bars]
    assert heights[1] == 0
    assert heights[2] == pytest.approx(heights[0] * 4)
    assert [t.text for t in bars[2].iter(f"{SVG}title")] == ["2026-11-03: 12"]


def test_bar_chart_skips_points_without_a_number_but_keeps_their_slot() -> None:
    root = parse(bar_chart([Point("a", 1), Point("b", None), Point("c", 1)], title="t"))
    bars = marks(root, "rect")
    assert len(bars) == 2
    xs = [float(bar.get("x", "nan")) for bar in bars]
    assert xs[1] - xs[0] > 1.5 * float(bars[0].get("width", "nan"))


def test_line_chart_has_a_point_per_number_and_breaks_at_none() -> None:
    root = parse(
        line_chart([Point(str(i), v) for i, v in enumerate([1, 2, None, 4, 5])], title="t")
    )
    assert len(marks(root, "circle")) == 4
    lines = list(root.iter(f"{SVG}polyline"))
    assert [len(line.get("points", "").split()) for line in lines] == [2, 2]


def test_ranking_chart_rows_follow_the_order_given() -> None:
    root = parse(ranking_chart([Point("b", 10), Point("a", 5)], title="Top"))
    bars = marks(root, "rect")
    assert [bar.get("data-label") for bar in bars] == ["b", "a"]
    assert float(bars[0].get("width", "0")) == pytest.approx(2 * float(bars[1].get("width", "0")))


def test_every_label_is_escaped() -> None:
    hostile = "<img src=x onerror=alert(1)>\"'&"
    for chart in (bar_chart, line_chart, ranking_chart):
        svg = chart([Point(hostile, 1)], title=hostile)
        assert "<img" not in svg
        root = parse(svg)  # well-formed: nothing broke out of an attribute or text
        assert root.find(f"{SVG}title") is not None
        assert root.find(f"{SVG}title").text == hostile  # type: ignore[union-attr]


def test_empty_charts_still_have_axes() -> None:
    for chart in (bar_chart, line_chart, ranking_chart):
        root = parse(chart([], title="Nothing"))
        assert marks(root, "rect") == [] and marks(root, "circle") == []


@pytest.mark.parametrize(
    ("highest", "ticks"),
    [
        (0, [0, 1]),
        (1, [0, 1]),
        (7, [0, 2, 4, 6, 8]),
        (100, [0, 50, 100]),
        (123, [0, 50, 100, 150]),
        (0.3, [0, 0.1, 0.2, 0.3]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_highest_value(
    highest: float, ticks: list[float]
) -> None:
    assert nice_ticks(highest) == ticks


def test_numbers_read_with_thousands_separators() -> None:
    assert format_number(1234567) == "1,234,567"
    assert format_number(2.5) == "2.5"
    assert format_number(3.0) == "3"
    assert format_number(None) == "\N{EN DASH}"
