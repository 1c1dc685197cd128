"""The site's line charts: axes that hold every point with a margin (exact ranges on hand-made data),
pixel positions inside the plot, and a style per series that stays distinct for 23 languages."""

from __future__ import annotations

import re

import pytest

from fedem_flwr.site import render
from fedem_flwr.site.charts import DASHES, PALETTE, Axis, axis, line_chart, style

LANGUAGES = ("as", "bn", "de", "en", "es", "fr", "gu", "hi", "it", "ja", "kn", "ko", "ml", "mr", "ne", "or", "pa",
             "pt", "ru", "sa", "ta", "te", "ur")  # 23, as the hub relays today


@pytest.mark.parametrize(("values", "kwargs", "expected"), [
    # span 0.6: 0.03 free at each end; round labels inside the range only
    ([3.9, 4.5], {}, Axis(3.87, 4.53, (4.0, 4.2, 4.4))),
    # a step of 1 leaves two labels (4, 5) inside [3.18, 5.82]: the finer step of 0.5 is taken
    ([3.3, 5.7, 4.1], {}, Axis(3.18, 5.82, (3.5, 4.0, 4.5, 5.0, 5.5))),
    # one value: 5% of its size free at each end, itself the only label
    ([4.0, 4.0], {}, Axis(3.8, 4.2, (4.0,))),
    ([0.0], {}, Axis(-0.05, 0.05, (0.0,))),
    # base versions: every whole number
    ([0, 1, 2], {"count": 6, "integer": True}, Axis(-0.1, 2.1, (0.0, 1.0, 2.0))),
    # ten minutes of epoch seconds: 30 s free at each end, labels 200 s apart
    ([1.7e9, 1.7e9 + 600], {"count": 6}, Axis(1.7e9 - 30, 1.7e9 + 630, (1.7e9, 1.7e9 + 200, 1.7e9 + 400,
                                                                       1.7e9 + 600))),
    # one time: labelled once (not five labels a year apart that show the same clock time)
    ([1.7e9], {"count": 6}, Axis(1.615e9, 1.785e9, (1.7e9,))),
])
def test_an_axis_holds_every_value_with_a_margin(values, kwargs, expected):
    got = axis(values, **kwargs)

    assert got == expected
    assert got.low < min(values) and max(values) < got.high
    assert all(got.low <= t <= got.high for t in got.ticks)


def test_every_point_is_drawn_inside_the_axes():
    # Prepare: values 3.9 to 4.5 over versions 0 to 2; the plot box is x 64..570, y 16..272
    series = {"hi": [(0, 3.9), (1, 4.5)], "te": [(2, 4.2)]}

    # Execute
    chart = line_chart("c", "t", "d", series, "base version", "held-out loss")

    # Assert: the extremes sit 5% of the range (23 px, 11.6 px) inside the box, never on or past it
    assert (chart.left, chart.right, chart.top, chart.bottom) == (64, 570, 16, 272)
    assert (chart.x, chart.y) == (Axis(-0.1, 2.1, (0.0, 1.0, 2.0)), Axis(3.87, 4.53, (4.0, 4.2, 4.4)))
    assert [line.points for line in chart.lines] == ["87.0,260.4 317.0,27.6", "547.0,144.0"]
    assert [(t.at, t.label) for t in chart.x_ticks] == [(87.0, "v0"), (317.0, "v1"), (547.0, "v2")]
    assert [(t.at, t.label) for t in chart.y_ticks] == [(221.6, "4"), (144.0, "4.2"), (66.4, "4.4")]


def test_a_long_steep_series_stays_inside():
    """Markers and polylines of a long, steep line: every coordinate within the plot box."""
    series = {"hi": [(1.7e9 + 60 * i, 6.0 - 0.05 * i) for i in range(50)], "ta": [(1.7e9, 9.5), (1.7e9 + 60, 0.2)]}

    chart = line_chart("c", "t", "d", series, "date", "loss", integer_x=False)

    coords = [tuple(map(float, p.split(","))) for line in chart.lines for p in line.points.split()]
    coords += [tuple(map(float, re.match(r"M([\d.]+),([\d.]+)", d).groups())) for line in chart.lines
               for d in line.marks]
    assert len(coords) == 2 * (50 + 2)
    assert all(chart.left < x < chart.right and chart.top < y < chart.bottom for x, y in coords)


def test_23_languages_get_23_distinct_styles():
    series = {lang: [(0, 4.0 + i / 10), (1, 3.9 + i / 10)] for i, lang in enumerate(LANGUAGES)}

    chart = line_chart("c", "t", "d", series, "base version", "held-out loss")

    looks = [(line.style.colour, line.style.dash) for line in chart.lines]
    assert len(chart.lines) == 23 and len(set(looks)) == 23
    assert len({colour for colour, _ in looks}) == 23  # 24 colours: no two languages share one
    assert all(a.marker != b.marker for a, b in zip([line.style for line in chart.lines],
                                                     [line.style for line in chart.lines][1:]))
    assert [line.name for line in chart.lines] == list(LANGUAGES)
    assert chart.height >= 16 + 14 + 18 * 22  # the legend has a row for each
    svg = render.svg(chart)
    assert svg.count("<polyline") == 23 and all(f">{lang}</text>" in svg for lang in LANGUAGES)


def test_styles_stay_distinct_past_the_palette():
    looks = [style(i) for i in range(len(PALETTE) * len(DASHES))]

    assert len({(s.colour, s.dash) for s in looks}) == 72
    assert [s.dash for s in looks[23:26]] == ["", "6 3", "6 3"] and looks[24].colour == looks[0].colour
    assert (style(72).colour, style(72).dash) == (looks[0].colour, looks[0].dash)  # markers still differ
