"""Line charts as inline SVG: no plotting library, readable offline, described for screen readers."""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Sequence

WIDTH, HEIGHT = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 16, 48  # margins: the legend sits on the right
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#ff7f0e")


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


def integer_label(x: float) -> str:
    return f"v{int(x)}"


def time_labels(span_s: float) -> Callable[[float], str]:
    """Tick labels for epoch seconds (UTC), as precise as a range of ``span_s`` seconds needs."""
    pattern = "%H:%M:%S" if span_s < 3600 else "%m-%d %H:%M" if span_s < 7 * 86400 else "%Y-%m-%d"
    return lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime(pattern)


def line_chart(chart_id: str, title: str, description: str, series: dict[str, Sequence[tuple[float, float]]],
               x_label: str, y_label: str, x_format: Callable[[float], str] = integer_label,
               integer_x: bool = True) -> str:
    """One SVG with a line (and markers) per series; ``title`` and ``description`` name it for
    assistive technology (``role="img"``), the table beside it carries the numbers."""
    esc = html.escape
    height = max(HEIGHT, TOP + 24 + 18 * len(series))  # room for every legend entry
    head = (f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-labelledby="{chart_id}-title {chart_id}-desc" xmlns="http://www.w3.org/2000/svg">'
            f'<title id="{chart_id}-title">{esc(title)}</title><desc id="{chart_id}-desc">{esc(description)}</desc>')
    points = [p for line in series.values() for p in line]
    if not points:
        return (head + f'<text x="{WIDTH / 2}" y="{height / 2}" text-anchor="middle">nothing measured yet</text>'
                "</svg>")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = ([float(v) for v in range(int(min(xs)), int(max(xs)) + 1)] if integer_x and max(xs) - min(xs) <= 12
               else ticks(min(xs), max(xs), 6))
    y_ticks = ticks(min(ys), max(ys))
    x0, x1 = min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs))
    y0, y1 = min(y_ticks[0], min(ys)), max(y_ticks[-1], max(ys))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (plot_w / 2 if x1 == x0 else (x - x0) / (x1 - x0) * plot_w)

    def sy(y: float) -> float:
        return TOP + plot_h - (plot_h / 2 if y1 == y0 else (y - y0) / (y1 - y0) * plot_h)

    parts = [head, '<g class="axes" aria-hidden="true">']
    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
                     f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{sx(x):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{esc(x_format(x))}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>'
                 f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}"/>'
                 f'<text x="{LEFT + plot_w / 2}" y="{height - 8}" text-anchor="middle">{esc(x_label)}</text>'
                 f'<text transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'{esc(y_label)}</text></g>')
    for i, (name, line) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        marks = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"/>' for x, y in line) if len(line) <= 60 else ""
        legend_y = TOP + 14 + 18 * i
        parts.append(f'<g class="series" fill="{colour}" stroke="{colour}" aria-hidden="true">'
                     f'<polyline fill="none" stroke-width="2" points="{coords}"/>{marks}'
                     f'<line x1="{WIDTH - RIGHT + 12}" x2="{WIDTH - RIGHT + 32}" y1="{legend_y - 4}" '
                     f'y2="{legend_y - 4}" stroke-width="3"/>'
                     f'<text x="{WIDTH - RIGHT + 38}" y="{legend_y}" stroke="none" fill="#222">{esc(name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
