"""Line charts as plain geometry (pixel coordinates, tick labels, line styles) that the ``chart.html``
template draws as inline SVG: no plotting library, readable offline, described for screen readers.

Both axes hold every point with a margin of ``MARGIN`` of the data's span on each side, so no line
or marker sits on (or beyond) an axis. Series are told apart by colour, then dash pattern, with a
marker shape each (see ``style``): 24 colours keep 23 languages distinct without repeating one.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH, HEIGHT = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 16, 48  # margins: the legend sits on the right
MARGIN = 0.05  # of the data's span, kept free at both ends of each axis
MARKED = 60  # a line of more points is drawn without markers (they would merge into a band)
# 24 colours picked greedily for the largest smallest CIEDE2000 difference between any two (Glasbey's
# method), among colours with at least 3:1 contrast against the white page (WCAG's non-text contrast).
PALETTE = ("#1f77b4", "#d62728", "#69a500", "#f03cff", "#1e4b2d", "#692d69", "#c3872d", "#5a3c1e", "#00a596",
           "#968796", "#001eff", "#78785a", "#ff4b87", "#004b5a", "#5a5a69", "#870f2d", "#8787ff", "#007800",
           "#96695a", "#ff5a00", "#c30f78", "#785ab4", "#4b7878", "#965a00")
DASHES = ("", "6 3", "2 3")  # SVG stroke-dasharray: solid, dashed, dotted
# Marker outlines as SVG path steps from the point, each about 6 px across.
MARKERS = {"circle": "m-3,0a3,3 0 1,0 6,0a3,3 0 1,0 -6,0z", "square": "m-2.7,-2.7h5.4v5.4h-5.4z",
           "triangle": "m0,-3.6l3.2,5.6h-6.4z", "diamond": "m0,-3.8l3.8,3.8l-3.8,3.8l-3.8,-3.8z",
           "triangle-down": "m0,3.6l3.2,-5.6h-6.4z"}


@dataclass(frozen=True)
class Style:
    """How one series is drawn: stroke colour, SVG dash pattern ("" is solid), marker shape."""

    colour: str
    dash: str
    marker: str


def style(index: int) -> Style:
    """The ``index``-th series' style: the first 24 differ in colour, the next 24 repeat the colours
    dashed, then dotted, so (colour, dash) stays unique for 72 series; markers cycle every 5, so even
    neighbours of similar colour differ in shape."""
    shapes = tuple(MARKERS)
    return Style(PALETTE[index % len(PALETTE)], DASHES[index // len(PALETTE) % len(DASHES)],
                 shapes[index % len(shapes)])


@dataclass(frozen=True)
class Axis:
    """A data range ``[low, high]`` and the values labelled on it, all within the range."""

    low: float
    high: float
    ticks: tuple[float, ...]


@dataclass(frozen=True)
class Tick:
    at: float  # pixel position along its axis
    label: str


@dataclass(frozen=True)
class Line:
    name: str
    style: Style
    points: str  # "x,y x,y ...": the polyline
    marks: tuple[str, ...]  # an SVG path per point (none past MARKED points)
    legend_y: float  # baseline of its legend entry
    legend_mark: str


@dataclass(frozen=True)
class Chart:
    """Everything ``chart.html`` draws; ``lines`` is empty when nothing was measured."""

    id: str
    title: str
    description: str
    width: int
    height: int
    lines: tuple[Line, ...] = ()
    x: Axis | None = None
    y: Axis | None = None
    left: float = LEFT
    right: float = WIDTH - RIGHT
    top: float = TOP
    bottom: float = HEIGHT - BOTTOM
    x_ticks: tuple[Tick, ...] = ()
    y_ticks: tuple[Tick, ...] = ()
    x_label: str = ""
    y_label: str = ""


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range [{low}, {high}] must be finite.")
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    out, value = [], first
    while value <= high + step * 1e-9:
        out.append(round(value, 12))
        value += step
    return out if out[-1] >= high - step * 1e-9 else out + [round(value, 12)]


def axis(values: Sequence[float], count: int = 5, integer: bool = False) -> Axis:
    """The range of ``values`` widened by ``MARGIN`` of their span at each end (a single value: of
    its size, or of 1 at zero), labelled with about ``count`` round values inside it (three at least);
    ``integer`` labels every whole number when there are at most 13. A single value is its only label,
    whatever its unit (a time, a version)."""
    low, high = min(values), max(values)
    pad = (high - low or abs(high) or 1.0) * MARGIN
    start, end = round(low - pad, 12), round(high + pad, 12)
    if high == low:
        marks = [low]
    elif integer and high - low <= 12:
        marks = [float(v) for v in range(math.ceil(low), math.floor(high) + 1)]
    else:
        marks = [t for t in ticks(start, end, count) if start <= t <= end]
        if len(marks) < 3:  # the round step came out coarse: the next finer one labels three or more
            marks = [t for t in ticks(start, end, 2 * count) if start <= t <= end]
    return Axis(start, end, tuple(marks))


def integer_label(x: float) -> str:
    return f"v{int(x)}"


def time_labels(span_s: float) -> Callable[[float], str]:
    """Tick labels for epoch seconds (UTC), as precise as a range of ``span_s`` seconds needs."""
    pattern = "%H:%M:%S" if span_s < 3600 else "%m-%d %H:%M" if span_s < 7 * 86400 else "%Y-%m-%d"
    return lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime(pattern)


def line_chart(chart_id: str, title: str, description: str, series: dict[str, Sequence[tuple[float, float]]],
               x_label: str, y_label: str, x_format: Callable[[float], str] = integer_label,
               integer_x: bool = True) -> Chart:
    """A line (and markers) per series; ``title`` and ``description`` name the figure for assistive
    technology (``role="img"``), the table beside it carries the numbers."""
    height = max(HEIGHT, TOP + 24 + 18 * len(series))  # room for every legend entry
    points = [p for line in series.values() for p in line]
    if not points:
        return Chart(chart_id, title, description, WIDTH, height)
    x = axis([p[0] for p in points], 6, integer=integer_x)
    y = axis([p[1] for p in points])
    right, bottom = WIDTH - RIGHT, height - BOTTOM

    def sx(v: float) -> float:
        return round(LEFT + (v - x.low) / (x.high - x.low) * (right - LEFT), 1)

    def sy(v: float) -> float:
        return round(bottom - (v - y.low) / (y.high - y.low) * (bottom - TOP), 1)

    lines = []
    for i, (name, line) in enumerate(series.items()):
        look = style(i)
        legend_y = TOP + 14 + 18 * i
        marks = tuple(f"M{sx(a)},{sy(b)}{MARKERS[look.marker]}" for a, b in line) if len(line) <= MARKED else ()
        lines.append(Line(name, look, " ".join(f"{sx(a)},{sy(b)}" for a, b in line), marks, legend_y,
                          f"M{right + 22},{legend_y - 4}{MARKERS[look.marker]}"))
    return Chart(chart_id, title, description, WIDTH, height, tuple(lines), x, y, LEFT, right, TOP, bottom,
                 tuple(Tick(sx(v), x_format(v)) for v in x.ticks), tuple(Tick(sy(v), f"{v:g}") for v in y.ticks),
                 x_label, y_label)
