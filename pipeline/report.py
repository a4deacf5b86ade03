"""The comparison report: one self-contained HTML page (inline SVG, no network), the numbers as JSON, a
Markdown summary, and a short table in the terminal."""

from __future__ import annotations

import html
import json
from pathlib import Path

from pipeline.checkpoints import MetricsLog, atomic_directory

COLOURS = {"pretrain": "#999999", "sft": "#1f77b4", "ppo": "#d62728"}
PPO_CURVES = (("objective/scores", "reward-model score"), ("objective/gold_score", "gold judge score"),
              ("objective/kl", "KL to the SFT policy (nats)"), ("val/response_length", "response length (tokens)"))


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
    return (f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{(width - right) / 2}" y="14" text-anchor="middle" class="title">{html.escape(title)}</text>'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{(width - right) / 2}" y="{height - 4}" text-anchor="middle">{html.escape(x_label)}</text>'
            f'<text x="{left}" y="{height - bottom + 14}">{x_low:.2g}</text>'
            f'<text x="{width - right}" y="{height - bottom + 14}" text-anchor="end">{x_high:.2g}</text>'
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y_high:.2g}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{y_low:.2g}</text>'
            f'<text transform="translate(12,{(height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
            f'{html.escape(y_label)}</text>{"".join(body)}</svg>')


def headline(comparison) -> str:
    metric = "gold" if "gold" in comparison.win_rates else "reward"
    rate = comparison.win_rates[metric]
    judge = "the hidden gold judge" if metric == "gold" else "the reward model"
    return (f"PPO beats SFT on {judge} in {rate['win_rate']:.0%} of {rate['prompts']} held-out prompts "
            f"(95% CI {rate['low']:.0%}–{rate['high']:.0%}) at a mean KL of "
            f"{comparison.means['ppo'].get('kl_to_sft', float('nan')):.2f} nats")


def means_table_rows(comparison) -> list[list[str]]:
    columns = ["reward", "gold", "kl_to_sft", "length"]
    rows = [["policy"] + [c for c in columns if any(c in m for m in comparison.means.values())]]
    for name, means in comparison.means.items():
        rows.append([name] + [f"{means[c]:.3f}" if c in means else "–" for c in rows[0][1:]])
    return rows


def provenance_rows(comparison) -> list[list[str]]:
    """The exact checkpoints compared: role, path, and the SHA-256 of the directory's contents."""
    checkpoints = comparison.settings.get("checkpoints") or {}
    return [["checkpoint", "path", "sha256"]] + [[name, str(c["path"]), str(c.get("digest") or "not hashed (hub id)")]
                                                 for name, c in checkpoints.items()]


def write_report(run_dir: Path, comparison) -> Path:
    """Write report/index.html, report/report.json and report/summary.md, atomically as one directory."""
    history = MetricsLog(Path(run_dir) / "ppo" / "metrics.jsonl", resume_step=-1, enabled=False).read()
    charts = []
    for key, title in PPO_CURVES:
        rows = [m for m in history if key in m]
        charts.append(line_chart(title, [m["step"] for m in rows], [m[key] for m in rows]))
    if comparison.settings.get("builtin_task"):
        groups = {name: [(s.reward, s.gold) for s in comparison.samples if s.policy == name] for name in comparison.means}
        charts.append(scatter_chart("reward model vs gold judge, per sample", groups, "reward-model score (normalised)",
                                    "gold score"))
    report_dir = Path(run_dir) / "report"
    with atomic_directory(report_dir) as staging:
        (staging / "index.html").write_text(render_html(comparison, charts), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(comparison.to_dict(), indent=1), encoding="utf-8")
        (staging / "summary.md").write_text(render_markdown(comparison), encoding="utf-8")
    return report_dir


def render_html(comparison, charts: list[str]) -> str:
    table = means_table_rows(comparison)
    means_html = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
                                          for c in row) + "</tr>" for i, row in enumerate(table))
    win_html = "".join(f"<li><b>{metric}</b>: PPO wins {r['win_rate']:.0%} of prompts (95% CI {r['low']:.0%}–"
                       f"{r['high']:.0%}; {r['ties']} ties count half)</li>" for metric, r in comparison.win_rates.items())
    provenance_html = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}><code>{html.escape(c)}</code>"
                                               f"</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
                              for i, row in enumerate(provenance_rows(comparison)))
    gold = comparison.settings.get("builtin_task")
    side_by_side = []
    for index, prompt in enumerate(comparison.prompts):
        first = {name: next(s for s in comparison.samples if s.policy == name and s.prompt_index == index)
                 for name in ("sft", "ppo")}
        cells = []
        for name in ("sft", "ppo"):
            s = first[name]
            score = f"reward {s.reward:+.2f}" + (f" · gold {s.gold:+.2f}" if gold else "")
            cells.append(f'<td class="{name}"><div>{html.escape(s.response)}</div><small>{score}</small></td>')
        side_by_side.append(f"<tr><td>{html.escape(prompt).replace(chr(10), '<br>')}</td>{''.join(cells)}</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RLHF comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.4em; }} .headline {{ font-size: 1.25em; background: #f4f4f4; padding: .8em; border-left: 6px solid {COLOURS['ppo']}; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: .4em .6em; vertical-align: top; text-align: left; }}
td.sft {{ background: #eef4fb; }} td.ppo {{ background: #fbeeee; }} small {{ color: #555; }}
.chart {{ margin: .5em; font-size: 11px; }} .chart .title {{ font-weight: bold; font-size: 12px; }} .axis {{ stroke: #444; }}
</style></head><body>
<h1>What RLHF changed: SFT policy vs PPO policy</h1>
<p class="headline" id="headline">{html.escape(headline(comparison))}</p>
<h2>Win rates</h2><ul id="win-rates">{win_html}</ul>
<h2>Means over all samples</h2><table id="means">{means_html}</table>
<h2>The PPO run</h2><div id="plots">{''.join(charts)}</div>
<h2>Side by side</h2>
<p>The first of {comparison.settings['samples_per_prompt']} samples per prompt, same seed for both policies, temperature {comparison.settings['temperature']}.</p>
<table id="side-by-side"><tr><th>prompt</th><th>SFT</th><th>PPO</th></tr>{''.join(side_by_side)}</table>
<h2>Checkpoints compared</h2><table id="checkpoints">{provenance_html}</table>
</body></html>
"""


def render_markdown(comparison) -> str:
    rows = means_table_rows(comparison)
    lines = ["# RLHF comparison", "", headline(comparison), "", "| " + " | ".join(rows[0]) + " |",
             "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    lines += [""] + [f"- {metric} win rate: {r['win_rate']:.1%} (95% CI {r['low']:.1%}–{r['high']:.1%}, "
                     f"{r['prompts']} prompts)" for metric, r in comparison.win_rates.items()]
    provenance = provenance_rows(comparison)
    if len(provenance) > 1:
        lines += ["", "## Checkpoints compared", "", "| " + " | ".join(provenance[0]) + " |", "|---|---|---|"]
        lines += [f"| {name} | `{path}` | `{digest}` |" for name, path, digest in provenance[1:]]
    return "\n".join(lines) + "\n"


def print_summary(comparison) -> None:
    print()
    for row in means_table_rows(comparison):
        print("  ".join(cell.ljust(10) for cell in row))
    print(headline(comparison))
