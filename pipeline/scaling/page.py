"""The sweep's page: scaling.html, self-contained (inline SVG, as the report), from results.json alone."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from data.builtin_datasets import write_atomically
from pipeline.evaluation.charts import ChartSeries, xy_chart
from pipeline.evaluation.report import html_table

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


# What the exponents are compared with. Kaplan et al. 2020 fit L(N) and L(D) separately (α_N = 0.076,
# α_D = 0.095) and found N* ∝ C^0.73; Hoffmann et al. 2022, approach 3: E = 1.69, A = 406.4, α = 0.34, B = 410.7,
# β = 0.28, N* ∝ C^0.46 (approach 2: C^0.49). Their losses are in nats per token of other tokenizers and corpora:
# only the exponents compare.
PUBLISHED = [
    ["source", "α (parameters)", "β (tokens)", "E", "N* ∝ C^a"],
    ["Kaplan et al. 2020 (separate fits of L(N), L(D))", "0.076", "0.095", "—", "0.73"],
    ["Hoffmann et al. 2022, approach 3", "0.34", "0.28", "1.69", "0.46"],
    ["Hoffmann et al. 2022, approach 2", "—", "—", "—", "0.49"],
]


def scientific(value: float) -> str:
    return f"{value:.2e}".replace("e+0", "e").replace("e+", "e")


def interval(law: dict[str, Any], name: str, digits: int = 3) -> str:
    low, high = (law.get("intervals_90") or {}).get(name, (math.nan, math.nan))
    return f"{law[name]:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]"


def law_rows(results: dict[str, Any]) -> list[list[str]]:
    law, isoflop = results["law"], results["isoflop"]
    frontier = isoflop.get("parameters_exponent")
    return [PUBLISHED[0],
            [f"this sweep ({law['runs']} runs; 90% bootstrap intervals)", interval(law, "alpha"),
             interval(law, "beta"), interval(law, "E"),
             f"{law['optimal_parameters_exponent']:.2f} (approach 3)"
             + (f", {frontier:.2f} (approach 2)" if frontier is not None else "")],
            *PUBLISHED[1:]]


def runs_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = [["point", "non-embedding params", "tokens", "compute (FLOPs)", "steps", "epochs", "held-out loss",
             "train s", "reading probe"]]
    for run in results["runs"]:
        probe = run.get("reading_probe")
        rows.append([run["name"], f"{run['non_embedding_parameters']:,}", f"{run['tokens']:,}",
                     scientific(run["compute"]), str(run["steps"]), f"{run['epochs']:.2f}",
                     f"{run['eval_loss']:.4f}", f"{run['wall_time_s'] or 0:.0f}",
                     f"{probe['accuracy']:.0%} of {probe['questions']}" if probe else "—"])
    return rows


def sizes_of(results: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    by_size: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(results["runs"], key=lambda r: (r["non_embedding_parameters"], r["compute"])):
        by_size.setdefault(f"{run['layers']}x{run['hidden']}", []).append(run)
    return list(by_size.items())


def loss_chart(results: dict[str, Any]) -> str:
    series = []
    law = results.get("law")
    for index, (name, runs) in enumerate(sizes_of(results)):
        colour = PALETTE[index % len(PALETTE)]
        series.append(ChartSeries(name, [(math.log10(r["compute"]), r["eval_loss"]) for r in runs], colour))
        if law:
            fitted = [(math.log10(r["compute"]), law["E"] + law["A"] / r["non_embedding_parameters"] ** law["alpha"]
                       + law["B"] / r["tokens"] ** law["beta"]) for r in runs]
            series.append(ChartSeries(f"{name} fit", fitted, colour, dashed=True, square=True))
    return xy_chart("Held-out loss against compute (dashed: the fitted law)", series, "log10 compute C = 6ND (FLOPs)",
                    "held-out loss (nats/token)", width=620, height=360)


def isoflop_chart(results: dict[str, Any]) -> str:
    series = []
    for index, profile in enumerate(results["isoflop"]["profiles"]):
        colour = PALETTE[index % len(PALETTE)]
        series.append(ChartSeries(f"C = {scientific(profile['compute'])}",
                                  [(math.log10(n), loss) for n, loss in profile["points"]], colour))
    minima = [(math.log10(p["optimal_parameters"]), min(loss for _, loss in p["points"]))
              for p in results["isoflop"]["profiles"] if p["optimal_parameters"]]
    if minima:
        series.append(ChartSeries("parabola minimum (N*)", minima, "#000000", square=True))
    return xy_chart("IsoFLOP profiles (approach 2)", series, "log10 non-embedding parameters N",
                    "held-out loss", width=620, height=360)


def frontier_chart(results: dict[str, Any]) -> str:
    series = []
    minima = [(math.log10(p["compute"]), math.log10(p["optimal_parameters"]))
              for p in results["isoflop"]["profiles"] if p["optimal_parameters"]]
    if minima:
        series.append(ChartSeries("approach 2: IsoFLOP minima", minima, PALETTE[0], square=True))
    if results.get("compute_optimal"):
        series.append(ChartSeries("approach 3: fitted law", [(math.log10(c["compute"]),
                                                             math.log10(c["non_embedding_parameters"]))
                                                            for c in results["compute_optimal"]], PALETTE[1]))
    sizes = sorted({r["non_embedding_parameters"] for r in results["runs"]})
    run = results["config_run"]
    series.append(ChartSeries("this config's run", [(math.log10(run["compute"]),
                                                    math.log10(run["non_embedding_parameters"]))], PALETTE[3]))
    if len(sizes) > 1:
        low, high = math.log10(sizes[0]), math.log10(sizes[-1])
        span = [math.log10(min(r["compute"] for r in results["runs"])), math.log10(max(r["compute"] for r in results["runs"]))]
        series.append(ChartSeries("sizes trained (span)", [(span[0], low), (span[0], high)], "#999999", dashed=True))
    return xy_chart("Compute-optimal model size", series, "log10 compute (FLOPs)", "log10 N*", width=620, height=320)


def holdout_chart(results: dict[str, Any]) -> str:
    holdout = results.get("holdout")
    if not holdout:
        return ""
    law = holdout["law"]
    seen = [(r["eval_loss"], law["E"] + law["A"] / r["non_embedding_parameters"] ** law["alpha"]
             + law["B"] / r["tokens"] ** law["beta"]) for r in results["runs"] if r["compute"] < holdout["fitted_below_compute"]]
    unseen = [(p["eval_loss"], p["predicted"]) for p in holdout["predictions"]]
    return xy_chart("Predicted against observed loss", [ChartSeries("runs fitted", seen, PALETTE[0]),
                                                       ChartSeries("runs held out", unseen, PALETTE[3], square=True)],
                    "observed held-out loss", "predicted by the fit", diagonal=True, width=520, height=340)


def probe_chart(results: dict[str, Any]) -> str:
    series = []
    for index, (name, runs) in enumerate(sizes_of(results)):
        points = [(math.log10(r["compute"]), r["reading_probe"]["accuracy"]) for r in runs if r.get("reading_probe")]
        if points:
            series.append(ChartSeries(name, points, PALETTE[index % len(PALETTE)]))
    if not series:
        return ""
    run = results["config_run"]
    series.append(ChartSeries("this config's run", [(math.log10(run["compute"]), 0.0), (math.log10(run["compute"]), 1.0)],
                              "#000000", dashed=True))
    return xy_chart("Reading probe: story questions answered right after a fixed fine-tune", series,
                    "log10 pretraining compute (FLOPs)", "share right (gold judge)", y_range=(-0.05, 1.05),
                    width=620, height=340)


def summary_sentences(results: dict[str, Any]) -> list[str]:
    law, run = results.get("law"), results["config_run"]
    left_out = results.get("left_out_of_fit") or []
    note = ([f"{len(left_out)} runs of fewer than {results['grid']['fit_min_steps']} steps are drawn but left out of "
             f"the fits: {', '.join(left_out)}."] if left_out else [])
    if not law:
        return [results.get("law_reason", "no law fitted"), *note]
    sentences = [(f"L(N, D) = {law['E']:.3f} + {law['A']:.4g} / N^{law['alpha']:.3f} + {law['B']:.4g} / "
                  f"D^{law['beta']:.3f} (N non-embedding parameters, D tokens, loss in nats per token).")]
    holdout = results.get("holdout")
    if holdout:
        sentences.append(f"Fitted on the {holdout['fitted_runs']} runs below C = {scientific(holdout['fitted_below_compute'])}, "
                         f"the law predicts the {len(holdout['predictions'])} held-out runs with a mean error of "
                         f"{holdout['mean_relative_error']:.1%} (largest {holdout['max_relative_error']:.1%}).")
    sentences += note
    optimal = next((c for c in results["compute_optimal"] if c["compute"] == run["compute"]), None)
    if optimal:
        sentences.append(f"{run['name']}: C = {scientific(run['compute'])}, N = {run['non_embedding_parameters']:,}, "
                         f"D = {run['tokens']:,}; predicted loss {run['predicted_loss']:.3f}. The compute-optimal split "
                         f"of that budget is N ≈ {optimal['non_embedding_parameters']:,.0f}, D ≈ {optimal['tokens']:,.0f} "
                         f"(predicted loss {optimal['predicted_loss']:.3f}).")
    return sentences


def render_page(results: dict[str, Any]) -> str:
    charts = [loss_chart(results), isoflop_chart(results), frontier_chart(results), holdout_chart(results),
              probe_chart(results)]
    law_html = html_table(law_rows(results), "law") if results.get("law") else ""
    optimal_html = html_table([["compute (FLOPs)", "N*", "D*", "tokens per parameter", "predicted loss"]] + [
        [scientific(c["compute"]), f"{c['non_embedding_parameters']:,.0f}", f"{c['tokens']:,.0f}",
         f"{c['tokens'] / c['non_embedding_parameters']:.1f}", f"{c['predicted_loss']:.3f}"]
        for c in results.get("compute_optimal", [])], "compute-optimal") if results.get("compute_optimal") else ""
    too_short = "".join(f"<li>{html.escape(p['name'])}: {p['steps']} steps</li>" for p in results["too_short"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Scaling sweep</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }} h1 {{ font-size: 1.4em; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; }}
.chart {{ margin: .5em; font-size: 11px; }} .chart .title {{ font-weight: bold; font-size: 12px; }} .chart .point {{ font-size: 9px; }} .axis {{ stroke: #444; }}
</style></head><body>
<h1>Scaling sweep: {len(results['runs'])} pretraining runs</h1>
<p>{html.escape(results['date'])} · {html.escape(results['machine'])} · {results['seconds']} s ·
{'built-in stories' if results['corpus']['builtin'] else html.escape(str(results['config']))}</p>
<div id="summary">{''.join(f'<p>{html.escape(s)}</p>' for s in summary_sentences(results))}</div>
<h2>Fitted exponents beside published ones</h2>{law_html}
<p>Tiny models, a synthetic corpus and a CPU budget: the exponents describe this product's regime, not large models.</p>
<h2>Compute-optimal splits (approach 3)</h2>{optimal_html}
<div id="plots">{''.join(charts)}</div>
<h2>Every run</h2>{html_table(runs_rows(results), "runs")}
{f'<p>Left out for fewer than {results["grid"]["min_steps"]} steps:</p><ul>{too_short}</ul>' if too_short else ''}
</body></html>
"""


def write_page(directory: Path, results: dict[str, Any]) -> Path:
    path = directory / "scaling.html"
    write_atomically(path, render_page(results))
    return path
