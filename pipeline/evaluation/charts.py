"""The report's charts as inline SVG, so that the page needs no plotting library and no network: a line chart of
a training curve, a scatter of per-prompt scores, and an x-y chart of lines with markers (the over-optimisation
curve and the reward model's reliability diagram)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

COLOURS = {"pretrain": "#999999", "sft": "#1f77b4", "ppo": "#d62728"}


METRIC_COLOURS = {"gold": "#2ca02c", "proxy": "#ff7f0e", "annotator": "#1f77b4"}


def line_chart(title: str, steps: list[float], values: list[float], width: int = 320, height: int = 180) -> str:
    """An SVG line chart with axis labels; no plotting library needed to view it."""
    if not values:
        return ""
    left, bottom, top, right = 44, 24, 22, 10
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    x_of = lambda s: left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - left - right)
    y_of = lambda v: top + (high - v) / (high - low) * (height - top - bottom)
    points = " ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in zip(steps, values))
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{width / 2}" y="14" text-anchor="middle" class="title">{html.escape(title)}</text>'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{high:.3g}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{low:.3g}</text>'
            f'<text x="{left}" y="{height - 6}">step {steps[0]:.0f}</text>'
            f'<text x="{width - right}" y="{height - 6}" text-anchor="end">{steps[-1]:.0f}</text>'
            f'<polyline points="{points}" fill="none" stroke="{COLOURS["ppo"]}" stroke-width="2"/></svg>')


@dataclass
class ChartFrame:
    """A chart's size in pixels and the margins around its plotting area (the right one holds the legend)."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int


def framed_chart(frame: ChartFrame, title: str, x_label: str, y_label: str, x_range: tuple[float, float],
                 y_range: tuple[float, float], body: list[str]) -> str:
    """The SVG around a chart's drawn `body`: title, both axes with their labels and end values."""
    width, height, left, right, top, bottom = (frame.width, frame.height, frame.left, frame.right, frame.top,
                                               frame.bottom)
    (x_low, x_high), (y_low, y_high) = x_range, y_range
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{(width - right) / 2}" y="14" text-anchor="middle" class="title">{html.escape(title)}</text>'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{(width - right + left) / 2}" y="{height - 4}" text-anchor="middle">'
            f'{html.escape(x_label)}</text>'
            f'<text x="{left}" y="{height - bottom + 14}">{x_low:.2g}</text>'
            f'<text x="{width - right}" y="{height - bottom + 14}" text-anchor="end">{x_high:.2g}</text>'
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y_high:.2g}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{y_low:.2g}</text>'
            f'<text transform="translate(12,{(height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
            f'{html.escape(y_label)}</text>{"".join(body)}</svg>')


def scatter_chart(title: str, groups: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
                  width: int = 420, height: int = 300) -> str:
    """An SVG scatter plot, one colour per policy."""
    points = [p for group in groups.values() for p in group]
    if not points:
        return ""
    left, bottom, top, right = 48, 36, 22, 90
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_pad, y_pad = max(x_high - x_low, 1e-6) * 0.05, max(y_high - y_low, 1e-6) * 0.05  # keep points off the axes
    x_low, x_high, y_low, y_high = x_low - x_pad, x_high + x_pad, y_low - y_pad, y_high + y_pad
    x_of = lambda x: left + (x - x_low) / (x_high - x_low) * (width - left - right)
    y_of = lambda y: top + (y_high - y) / (y_high - y_low) * (height - top - bottom)
    body = []
    for index, (name, group) in enumerate(groups.items()):
        body += [f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="2.5" fill="{COLOURS.get(name, "#555")}" '
                 f'fill-opacity="0.5"/>' for x, y in group]
        body.append(f'<text x="{width - right + 8}" y="{top + 16 * (index + 1)}" fill="{COLOURS.get(name, "#555")}">'
                    f'● {name}</text>')
    return framed_chart(ChartFrame(width, height, left, right, top, bottom), title, x_label, y_label,
                        (x_low, x_high), (y_low, y_high), body)


@dataclass
class ChartSeries:
    """One series of an `xy_chart`: its legend name, its (x, y) points in drawing order, and how it is drawn."""

    name: str
    points: list[tuple[float, float]]
    colour: str
    dashed: bool = False
    square: bool = False  # square markers, else round ones
    labels: list[str] | None = None  # a short text beside each point


def padded_range(values: list[float]) -> tuple[float, float]:
    """(low, high) of the values, widened by 5% on each side so that no point sits on an axis."""
    low, high = min(values), max(values)
    pad = max(high - low, 1e-6) * 0.05
    return low - pad, high + pad


def xy_chart(title: str, series: list[ChartSeries], x_label: str, y_label: str,
             x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
             diagonal: bool = False, zero_line: bool = False, width: int = 480, height: int = 320) -> str:
    """An SVG chart of lines with markers, a legend on the right; `diagonal` draws y = x (a reliability
    diagram's perfect calibration), `zero_line` y = 0. Empty when no series has a point."""
    points = [p for one in series for p in one.points]
    if not points:
        return ""
    left, bottom, top, right = 48, 36, 22, 150
    x_low, x_high = x_range or padded_range([x for x, _ in points])
    y_low, y_high = y_range or padded_range([y for _, y in points])
    x_of = lambda x: left + (x - x_low) / (x_high - x_low) * (width - left - right)
    y_of = lambda y: top + (y_high - y) / (y_high - y_low) * (height - top - bottom)
    body = []
    if diagonal:
        low, high = max(x_low, y_low), min(x_high, y_high)
        body.append(f'<line x1="{x_of(low):.1f}" y1="{y_of(low):.1f}" x2="{x_of(high):.1f}" y2="{y_of(high):.1f}" '
                    f'stroke="#999" stroke-dasharray="2,3"/>')
    if zero_line and y_low < 0 < y_high:
        body.append(f'<line x1="{left}" y1="{y_of(0):.1f}" x2="{width - right}" y2="{y_of(0):.1f}" stroke="#bbb"/>')
    for index, one in enumerate(series):
        dash = ' stroke-dasharray="6,3"' if one.dashed else ""
        if len(one.points) > 1:
            line = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in one.points)
            body.append(f'<polyline points="{line}" fill="none" stroke="{one.colour}" stroke-width="1.5"{dash}/>')
        for k, (x, y) in enumerate(one.points):
            body.append(marker(x_of(x), y_of(y), one.colour, one.square))
            if one.labels:
                body.append(f'<text x="{x_of(x) + 4:.1f}" y="{y_of(y) + (12 if one.square else -4):.1f}" class="point" '
                            f'fill="{one.colour}">'
                            f'{html.escape(one.labels[k])}</text>')
        legend_y = top + 16 * (index + 1)
        body.append(f'<line x1="{width - right + 8}" y1="{legend_y - 4}" x2="{width - right + 26}" y2="{legend_y - 4}" '
                    f'stroke="{one.colour}" stroke-width="1.5"{dash}/>'
                    f'{marker(width - right + 17, legend_y - 4, one.colour, one.square)}'
                    f'<text x="{width - right + 30}" y="{legend_y}" fill="{one.colour}">{html.escape(one.name)}</text>')
    return framed_chart(ChartFrame(width, height, left, right, top, bottom), title, x_label, y_label,
                        (x_low, x_high), (y_low, y_high), body)


def marker(x: float, y: float, colour: str, square: bool) -> str:
    if square:
        return f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="{colour}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'


def over_optimisation_chart(points: list[dict[str, Any]]) -> str:
    """Gold and proxy score against KL to SFT (Gao et al. 2022), each as its gain over the SFT policy (the PPO
    point at step 0) so that both start at 0 and a gap opening between them shows: PPO's policies as solid lines
    with round markers labelled by step, best-of-N as dashed lines with square markers labelled by N."""
    start = next((p for p in points if p["method"] == "ppo" and p.get("step") == 0), None)
    if start is None:
        return ""
    labelled = "gold" if start.get("gold") is not None else "proxy"
    series = []
    for metric, name in (("gold", "gold"), ("proxy", "proxy (RM)")):
        if start.get(metric) is None:
            continue
        for method, label, dashed in (("ppo", "PPO", False), ("best_of_n", "best-of-N", True)):
            mine = [p for p in points if p["method"] == method]
            labels = [f"{p['step']}" if method == "ppo" else f"N={p['n']}" for p in mine]
            if mine:
                gains = [(p["kl_to_sft"], p[metric] - start[metric]) for p in mine]
                series.append(ChartSeries(f"{name}, {label}", gains, METRIC_COLOURS[metric], dashed=dashed,
                                          square=dashed, labels=labels if metric == labelled else None))
    kls = [p["kl_to_sft"] for p in points]
    return xy_chart("gain over SFT vs KL to the SFT policy", series, "KL to the SFT policy (nats)",
                    "score − SFT's (gold; proxy: normalised RM)",
                    x_range=(min(0.0, min(kls)), max(kls) * 1.05 if max(kls) > 0 else 1.0), zero_line=True)


def reliability_chart(reward_model: dict[str, Any]) -> str:
    """The reward model's reliability diagram: mean predicted preference probability σ(r_a − r_b) per bin against
    how often the first response was preferred, by the annotator and by the gold judge; y = x is calibrated."""
    series = []
    for key, name, colour in (("eval_calibration", "vs annotator", METRIC_COLOURS["annotator"]),
                              ("eval_gold_calibration", "vs gold judge", METRIC_COLOURS["gold"])):
        bins = [b for b in reward_model.get(key) or [] if b.get("count")]
        if bins:
            series.append(ChartSeries(name, [(b["mean_predicted"], b["observed"]) for b in bins], colour,
                                      square=key == "eval_gold_calibration"))
    return xy_chart("reward model reliability (held-out pairs)", series, "predicted preference probability",
                    "observed frequency", x_range=(0.0, 1.0), y_range=(0.0, 1.0), diagonal=True)
