"""SVG line charts for the compliance report, drawn here: no plotting library, nothing fetched.

A chart spans the report's period on its time axis (so gaps show), has one series per target, a y axis
with round ticks in a unit chosen for the values (seconds, minutes or hours; KB, MB or GB), the unit in
the axis title, and the objective as a dashed line when it fits the scale (else a note says how far
above the scale it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

PALETTE = ("#1f4e79", "#c55a11", "#548235", "#7030a0", "#bf9000", "#2e75b6", "#843c0c", "#375623")


@dataclass(frozen=True)
class Scale:
    """How values of one quantity are shown: the divisor and its unit name."""

    divisor: float
    unit: str


def duration_scale(largest_seconds: float) -> Scale:
    if largest_seconds >= 2 * 3600:
        return Scale(3600, "hours")
    if largest_seconds >= 120:
        return Scale(60, "minutes")
    return Scale(1, "seconds")


def size_scale(largest_bytes: float) -> Scale:
    for divisor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if largest_bytes >= divisor:
            return Scale(divisor, unit)
    return Scale(1, "bytes")


def nice_ticks(top: float, most: int = 5) -> list[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to at least `top`, at most `most` + 1 ticks."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / most
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    count = math.ceil(top / step - 1e-9)
    return [i * step for i in range(count + 1)]


def tick_label(value: float, step: float) -> str:
    """A tick value as people write it: no exponent, as many decimals as the step needs."""
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f}"


def time_ticks(start: datetime, end: datetime, most: int = 6) -> list[tuple[datetime, str]]:
    """Evenly spaced times across the axis, labelled as precisely as the span needs."""
    span = (end - start).total_seconds()
    fmt = (
        "%H:%M:%S"
        if span <= 600
        else "%H:%M"
        if span <= 86400
        else "%m-%d %H:%M"
        if span <= 4 * 86400
        else "%Y-%m-%d"
    )
    moments = [start + timedelta(seconds=span * i / (most - 1)) for i in range(most)]
    return [(moment, moment.strftime(fmt)) for moment in moments]


def line_chart(
    series: dict[str, list[tuple[datetime, float]]],
    title: str,
    scale_of: str,
    start: datetime,
    end: datetime,
    *,
    target: float | None = None,
    target_label: str = "objective",
    width: int = 640,
    height: int = 200,
) -> str:
    """`series`: name -> (time, value in seconds or bytes); `scale_of`: "duration" or "size"."""
    points = [v for values in series.values() for _, v in values]
    if not points:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40" viewBox="0 0 {width} 40">'
            f'<text x="0" y="14" font-size="11" font-weight="bold">{escape(title)}</text>'
            f'<text x="0" y="32" font-size="10">No data in the period.</text></svg>'
        )
    largest = max(points)
    target_fits = target is not None and target <= 4 * max(largest, 1e-9)
    scale = (duration_scale if scale_of == "duration" else size_scale)(
        max(largest, target if target_fits and target is not None else 0)
    )
    ticks = nice_ticks(max(largest, target if target_fits and target is not None else 0) / scale.divisor)
    top = ticks[-1]
    legend = (
        [("#c00000", f"{target_label} {human_seconds(target) if scale_of == 'duration' else target}", True)]
        if target is not None and target_fits
        else []
    )
    legend += [(PALETTE[i % len(PALETTE)], name, False) for i, name in enumerate(sorted(series))]
    pad_l, pad_r, pad_t, pad_b = 58, 12, 38, 34
    column = int(min(width - pad_l, max(len(label) for _, label, _ in legend) * 5.2 + 26))
    per_row = max(1, (width - pad_l) // column)
    legend_h = 13 * math.ceil(len(legend) / per_row)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    height += legend_h
    t0, t1 = start.timestamp(), max(end.timestamp(), start.timestamp() + 1)

    def sx(when: datetime) -> float:
        return pad_l + (min(max(when.timestamp(), t0), t1) - t0) / (t1 - t0) * plot_w

    def sy(value: float) -> float:
        return pad_t + plot_h - value / scale.divisor / top * plot_h

    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans">'
        ),
        f'<text x="0" y="12" font-size="11" font-weight="bold">{escape(title)}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t - 8}" font-size="9" text-anchor="end">{escape(scale.unit)}</text>',
    ]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    for value in ticks:
        y = pad_t + plot_h - value / top * plot_h
        parts.append(
            f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{pad_l - 4}" y="{y + 3:.1f}" font-size="9" text-anchor="end">'
            f"{tick_label(value, step)}</text>"
        )
    for when, label in time_ticks(start, end):
        x = sx(when)
        anchor = "start" if x <= pad_l + 1 else "end" if x >= width - pad_r - 1 else "middle"
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t + plot_h}" y2="{pad_t + plot_h + 3}" stroke="#888"/>'
            f'<text x="{x:.1f}" y="{pad_t + plot_h + 13}" font-size="9" text-anchor="{anchor}">'
            f"{escape(label)}</text>"
        )
    parts.append(
        f'<text x="{pad_l + plot_w / 2:.1f}" y="{pad_t + plot_h + 26}" font-size="9" '
        f'text-anchor="middle">time (UTC)</text>'
    )
    parts.append(
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - pad_r}" y2="{pad_t + plot_h}" stroke="#888"/>'
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="#888"/>'
    )
    if target is not None and target_fits:
        y = sy(target)
        parts.append(
            f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c00000" '
            f'stroke-dasharray="4 3"/>'
        )
    for index, (_, values) in enumerate(sorted(series.items())):
        color = PALETTE[index % len(PALETTE)]
        ordered = sorted(values)
        if len(ordered) > 1:
            path = " ".join(
                f"{'M' if i == 0 else 'L'}{sx(t):.1f},{sy(v):.1f}" for i, (t, v) in enumerate(ordered)
            )
            parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.2"/>')
        parts += [f'<circle cx="{sx(t):.1f}" cy="{sy(v):.1f}" r="2" fill="{color}"/>' for t, v in ordered]
    for index, (color, label, dashed) in enumerate(legend):
        x = pad_l + (index % per_row) * column
        y = pad_t + plot_h + 40 + 13 * (index // per_row)
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        parts.append(
            f'<line x1="{x}" x2="{x + 16}" y1="{y - 3}" y2="{y - 3}" stroke="{color}" '
            f'stroke-width="2"{dash}/>'
            f'<text x="{x + 20}" y="{y}" font-size="8.5">{escape(label)}</text>'
        )
    if target is not None and not target_fits:
        parts.append(
            f'<text x="{width - pad_r}" y="{pad_t + 10}" font-size="9" text-anchor="end" fill="#c00000">'
            f"{escape(target_label)} "
            f"{escape(human_seconds(target) if scale_of == 'duration' else str(target))} "
            f"is far above this scale</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def human_seconds(seconds: float | None) -> str:
    """A duration as people write it: 45 s, 6.9 s, 12 min, 1 h 30 min, 2 d 4 h."""
    if seconds is None:
        return "n/a"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{days} d" + (f" {hours} h" if hours else "")
