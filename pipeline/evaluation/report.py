"""The comparison report: one self-contained HTML page (inline SVG, no network), the numbers as JSON, a
Markdown summary, and a short table in the terminal.

The page reads top to bottom: the headline (PPO vs SFT on the gold judge), win rates, means, PPO against
best-of-N from the SFT policy (and what each costs at inference), the over-optimisation curve, the reward
model's accuracy and calibration, the PPO run's curves, win rates and losses per task family, the side-by-side
samples, and the exact checkpoints compared."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from pipeline.evaluation.charts import COLOURS, line_chart, over_optimisation_chart, reliability_chart, scatter_chart
from pipeline.run.files import atomic_directory
from pipeline.run.manifests import MetricsLog

PPO_CURVES = (("objective/scores", "reward-model score"), ("objective/gold_score", "gold judge score"),
              ("objective/kl", "KL to the SFT policy (nats)"), ("val/response_length", "response length (tokens)"))


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


def win_rate_label(name: str) -> str:
    """What a `comparison.win_rates` key measures, in words: "gold_vs_best_of_16" → "gold judge: PPO vs
    best-of-16"."""
    metric, _, baseline = name.partition("_vs_")
    judge = {"gold": "gold judge", "reward": "reward model"}.get(metric, metric)
    return f"{judge}: PPO vs {'SFT' if baseline in ('', 'sft') else baseline.replace('best_of_', 'best-of-')}"


def judged_metric(comparison) -> str:
    return "gold" if comparison.settings.get("builtin_task") else "reward"


def best_of_n_verdicts(comparison) -> list[str]:
    """One plain sentence per best-of-N asked for: does PPO match it on the gold judge (the reward model without
    one), and at what inference cost."""
    metric = judged_metric(comparison)
    judge = "the gold judge" if metric == "gold" else "the reward model (which best-of-N itself picks by)"
    sentences = []
    for n in comparison.settings.get("best_of", []):
        rate = comparison.win_rates.get(f"{metric}_vs_best_of_{n}")
        row = comparison.best_of_n.get(str(n))
        if rate is None or row is None:
            continue
        p, low, high = rate["win_rate"], rate["low"], rate["high"]
        ppo_mean, best_mean = comparison.means["ppo"][metric], row[metric]
        figures = (f"PPO wins {p:.0%} of {rate['prompts']} prompts against it (95% CI {low:.0%}–{high:.0%}), mean "
                   f"{metric} {ppo_mean:.2f} vs {best_mean:.2f}")
        if high < 0.5:
            verdict = f"PPO loses to best-of-{n} on {judge}: {figures}"
        elif low > 0.5:
            verdict = f"PPO beats best-of-{n} on {judge}: {figures}"
        else:
            verdict = f"PPO and best-of-{n} are level on {judge} within noise: {figures}"
        # A per-prompt win rate and a mean can disagree: one side wins more prompts, the other wins by more.
        if p > 0.5 and ppo_mean < best_mean:
            verdict += f"; best-of-{n} wins fewer prompts but by more, and is ahead on the mean"
        elif p < 0.5 and ppo_mean > best_mean:
            verdict += f"; PPO wins fewer prompts but by more, and is ahead on the mean"
        sentences.append(f"{verdict}. At inference PPO draws 1 sample per prompt; best-of-{n} draws {n} and scores "
                         f"each with the reward model.")
    return sentences


def best_of_n_rows(comparison) -> list[list[str]]:
    """SFT, each best-of-N and PPO: inference cost, mean scores, KL to SFT, and PPO's win rate against each."""
    metric = judged_metric(comparison)
    scores = ("gold", "reward") if metric == "gold" else ("reward",)
    rows = [["policy", "samples per prompt at inference"]
            + ["mean gold" if m == "gold" else "mean reward (normalised)" for m in scores]
            + ["KL to SFT (nats)", f"PPO's {metric} win rate against it"]]

    def rate(name: str) -> str:
        r = comparison.win_rates.get(name)
        return f"{r['win_rate']:.0%} ({r['low']:.0%}–{r['high']:.0%})" if r else "–"

    def cells(means: dict[str, Any]) -> list[str]:
        return [f"{means[m]:.3f}" for m in scores]

    sft, ppo = comparison.means["sft"], comparison.means["ppo"]
    rows.append(["SFT", "1", *cells(sft), "0", rate(metric)])
    for row in sorted(comparison.best_of_n.values(), key=lambda row: row["n"]):
        n = row["n"]
        rows.append([f"best-of-{n}", f"{n} (+{n} RM scores)" if n > 1 else "1", *cells(row),
                     f"{row['kl_to_sft']:.3f} (analytic)", rate(f"{metric}_vs_best_of_{n}")])
    rows.append(["PPO", "1", *cells(ppo), f"{ppo['kl_to_sft']:.3f} (measured)", "–"])
    return rows


def over_optimisation_rows(comparison) -> list[list[str]]:
    rows = [["method", "step / N", "KL to SFT (nats)", "gold", "proxy (normalised RM)", "samples per prompt"]]
    for p in comparison.over_optimisation:
        rows.append(["PPO" if p["method"] == "ppo" else "best-of-N",
                     f"step {p['step']}" if p["method"] == "ppo" else f"N = {p['n']}", f"{p['kl_to_sft']:.3f}",
                     "–" if p.get("gold") is None else f"{p['gold']:.3f}", f"{p['proxy']:.3f}",
                     str(p["samples_per_prompt"]) if p["method"] == "ppo" else f"pool of {p['pool_size']}"])
    return rows


def reward_model_sentences(reward_model: dict[str, Any]) -> list[str]:
    """The reward model's held-out accuracy and calibration error against the annotator and the gold judge."""
    sentences = []
    if "eval_accuracy" in reward_model:
        pairs = f" ({reward_model['eval_pairs']} pairs)" if "eval_pairs" in reward_model else ""
        sentences.append(f"Held-out pairwise accuracy against the annotator's labels: "
                         f"{reward_model['eval_accuracy']:.3f}{pairs}.")
    if "eval_gold_accuracy" in reward_model:
        pairs = (f" ({reward_model['eval_gold_pairs']} pairs the judge does not score equal)"
                 if "eval_gold_pairs" in reward_model else "")
        agreement = (f"; the annotator itself agrees with the judge on {reward_model['annotator_gold_agreement']:.3f}"
                     if "annotator_gold_agreement" in reward_model else "")
        sentences.append(f"Against the gold judge's ordering: {reward_model['eval_gold_accuracy']:.3f}{pairs}"
                         f"{agreement}.")
    if reward_model.get("eval_gold_accuracy_by_kind"):
        kinds = "; ".join(f"{kind} {figures['accuracy']:.3f} ({figures['pairs']} pairs)"
                          for kind, figures in reward_model["eval_gold_accuracy_by_kind"].items())
        sentences.append(f"By kind of pair: {kinds}.")
    errors = [f"{reward_model[key]:.3f} against the {who}" for key, who in
              (("eval_calibration_error", "annotator"), ("eval_gold_calibration_error", "gold judge"))
              if key in reward_model]
    if errors:
        sentences.append(f"Expected calibration error of σ(r_a − r_b): {' and '.join(errors)}.")
    return sentences


def family_rows(comparison) -> list[list[str]]:
    keys = [k for k in next(iter(comparison.by_family.values()))["win_rates"]] if comparison.by_family else []
    rows = [["task family", "prompts", "PPO mean gold", "SFT mean gold"] + [win_rate_label(k) for k in keys]
            + ["prompts PPO loses to SFT"]]
    for family, figures in comparison.by_family.items():
        rates = figures["win_rates"]
        rows.append([family, str(figures["prompts"]), f"{figures['ppo_mean_gold']:.3f}",
                     f"{figures['sft_mean_gold']:.3f}"]
                    + [f"{rates[k]['win_rate']:.0%} ({rates[k]['low']:.0%}–{rates[k]['high']:.0%})" for k in keys]
                    + [str(figures["losses_to_sft"])])
    return rows


def provenance_rows(comparison) -> list[list[str]]:
    """The exact checkpoints compared: role, path, the SHA-256 of the directory's contents, the engine it trained on."""
    checkpoints = comparison.settings.get("checkpoints") or {}
    engines = comparison.settings.get("engines") or {}
    return [["checkpoint", "path", "sha256", "trained on"]] + [
        [name, str(c["path"]), str(c.get("digest") or "not hashed (hub id)"), engine_label(engines.get(name))]
        for name, c in checkpoints.items()]


def engine_label(engine: dict[str, Any] | None) -> str:
    """"zero3 × 2 processes, mixed precision no"; "not recorded" for a stage trained before engines were recorded."""
    if not engine:
        return "not recorded"
    return f"{engine['engine']} × {engine['processes']} process(es), mixed precision {engine['mixed_precision']}"


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


def html_table(rows: list[list[str]], table_id: str) -> str:
    """An HTML table of plain-text cells (escaped), the first row as its header."""
    cells = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
                                     for c in row) + "</tr>" for i, row in enumerate(rows))
    return f'<table id="{table_id}">{cells}</table>'


def response_cell(policy: str, response: str, score: str) -> str:
    return f'<td class="{policy}"><div>{html.escape(response)}</div><small>{html.escape(score)}</small></td>'


def prompt_cell(prompt: str) -> str:
    return f"<td>{html.escape(prompt).replace(chr(10), '<br>')}</td>"


def best_of_n_html(comparison) -> str:
    if not comparison.best_of_n:
        return ""
    settings = comparison.settings
    verdicts = "".join(f"<p class=\"verdict\">{html.escape(v)}</p>" for v in best_of_n_verdicts(comparison))
    return (f'<h2>PPO vs best-of-N from the SFT policy</h2>{verdicts}'
            f'<p>Best-of-N: draw N SFT samples, keep the one the reward model scores highest. Its expected scores are '
            f'estimated without bias from a pool of {settings.get("best_of_pool_size")} SFT samples per prompt (the '
            f'{settings["samples_per_prompt"]} above and more with seed {settings.get("best_of_pool_seed")}) over all '
            f'N-subsets; its KL to SFT is the analytic log N − (N−1)/N. Win rates are per prompt: PPO\'s mean over '
            f'its samples against best-of-N\'s expectation.</p>{html_table(best_of_n_rows(comparison), "best-of-n")}')


def over_optimisation_html(comparison) -> str:
    points = comparison.over_optimisation
    if not points:
        return ""
    snapshots = comparison.settings.get("snapshot_samples_per_prompt")
    note = (f"PPO's intermediate policies (ppo/policy-step-N/) are sampled {snapshots} times per prompt, its first "
            f"(step 0, the SFT policy) and final ones {comparison.settings['samples_per_prompt']} times"
            if snapshots else "PPO: the SFT policy (step 0) and the final policy only (no ppo/policy-step-N/ "
                              "snapshots: set ppo.policy_snapshot_steps)")
    return (f'<h2>Over-optimisation: score against KL to SFT</h2><p>Gold and proxy (normalised reward-model) score '
            f'against KL to the SFT policy (Gao et al. 2022), drawn as the gain over the SFT policy; the table has the '
            f'scores themselves. A proxy that keeps rising while gold flattens or falls is the reward model being '
            f'over-optimised. {html.escape(note)}; best-of-N is at its analytic KL.</p>'
            f'<div id="over-optimisation-chart">{over_optimisation_chart(points)}</div>'
            f'{html_table(over_optimisation_rows(comparison), "over-optimisation")}')


def reward_model_html(comparison) -> str:
    if not comparison.reward_model:
        return ""
    sentences = "".join(f"<p>{html.escape(s)}</p>" for s in reward_model_sentences(comparison.reward_model))
    return (f'<h2>The reward model</h2><div id="reward-model">{sentences}'
            f'{reliability_chart(comparison.reward_model)}</div>')


def family_html(comparison) -> str:
    if not comparison.by_family:
        return ""
    losses = []
    for family, figures in comparison.by_family.items():
        if not figures["losses"]:
            continue
        rows = "".join(f"<tr>{prompt_cell(loss['prompt'])}" + "".join(
            response_cell(policy, loss[f"{policy}_response"],
                          f"gold {loss[f'{policy}_gold']:+.2f} (mean {loss[f'{policy}_mean_gold']:+.2f})")
            for policy in ("sft", "ppo")) + "</tr>" for loss in figures["losses"])
        losses.append(f'<h3>{html.escape(family)}: where PPO loses to SFT</h3><table class="losses">'
                      f'<tr><th>prompt</th><th>SFT (its best sample)</th><th>PPO (its worst sample)</th></tr>{rows}</table>')
    return (f'<h2>By task family</h2>{html_table(family_rows(comparison), "by-family")}'
            f'<p>Below, per family, the prompts where PPO\'s mean gold over its samples falls furthest below SFT\'s, '
            f'with PPO\'s lowest-gold sample beside SFT\'s highest-gold one.</p>{"".join(losses)}')


def render_html(comparison, charts: list[str]) -> str:
    win_html = "".join(f"<li><code>{html.escape(name)}</code> ({html.escape(win_rate_label(name))}): PPO wins "
                       f"{r['win_rate']:.0%} of prompts (95% CI {r['low']:.0%}–{r['high']:.0%}; {r['ties']} ties count "
                       f"half)</li>" for name, r in comparison.win_rates.items())
    gold = comparison.settings.get("builtin_task")
    side_by_side = []
    for index, prompt in enumerate(comparison.prompts):
        first = {name: next(s for s in comparison.samples if s.policy == name and s.prompt_index == index)
                 for name in ("sft", "ppo")}
        cells = [response_cell(name, s.response, f"reward {s.reward:+.2f}" + (f" · gold {s.gold:+.2f}" if gold else ""))
                 for name, s in first.items()]
        side_by_side.append(f"<tr>{prompt_cell(prompt)}{''.join(cells)}</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RLHF comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.4em; }} .headline {{ font-size: 1.25em; background: #f4f4f4; padding: .8em; border-left: 6px solid {COLOURS['ppo']}; }}
.verdict {{ font-weight: 600; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: .4em .6em; vertical-align: top; text-align: left; }}
td.sft {{ background: #eef4fb; }} td.ppo {{ background: #fbeeee; }} small {{ color: #555; }}
.chart {{ margin: .5em; font-size: 11px; }} .chart .title {{ font-weight: bold; font-size: 12px; }} .chart .point {{ font-size: 9px; }} .axis {{ stroke: #444; }}
</style></head><body>
<h1>What RLHF changed: SFT policy vs PPO policy</h1>
<p class="headline" id="headline">{html.escape(headline(comparison))}</p>
<h2>Win rates</h2><ul id="win-rates">{win_html}</ul>
<h2>Means over all samples</h2>{html_table(means_table_rows(comparison), "means")}
{best_of_n_html(comparison)}
{over_optimisation_html(comparison)}
{reward_model_html(comparison)}
<h2>The PPO run</h2><div id="plots">{''.join(charts)}</div>
{family_html(comparison)}
<h2>Side by side</h2>
<p>The first of {comparison.settings['samples_per_prompt']} samples per prompt, same seed for both policies, temperature {comparison.settings['temperature']}.</p>
<table id="side-by-side"><tr><th>prompt</th><th>SFT</th><th>PPO</th></tr>{''.join(side_by_side)}</table>
<h2>Checkpoints compared</h2>{provenance_html(comparison)}
</body></html>
"""


def provenance_html(comparison) -> str:
    cells = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}><code>{html.escape(c)}</code></{'th' if i == 0 else 'td'}>"
                                     for c in row) + "</tr>" for i, row in enumerate(provenance_rows(comparison)))
    return f'<table id="checkpoints">{cells}</table>'


def markdown_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]


def render_markdown(comparison) -> str:
    lines = ["# RLHF comparison", "", headline(comparison), ""] + markdown_table(means_table_rows(comparison))
    lines += [""] + [f"- {name} win rate ({win_rate_label(name)}): {r['win_rate']:.1%} (95% CI {r['low']:.1%}–"
                     f"{r['high']:.1%}, {r['prompts']} prompts)" for name, r in comparison.win_rates.items()]
    if comparison.best_of_n:
        lines += ["", "## PPO vs best-of-N from the SFT policy", ""] + best_of_n_verdicts(comparison)
        lines += [""] + markdown_table(best_of_n_rows(comparison))
    if comparison.over_optimisation:
        snapshots = comparison.settings.get("snapshot_samples_per_prompt")
        lines += ["", "## Over-optimisation: score against KL to SFT", "",
                  f"Intermediate PPO policies sampled {snapshots} times per prompt." if snapshots else
                  "No intermediate PPO policies (set ppo.policy_snapshot_steps).", ""]
        lines += markdown_table(over_optimisation_rows(comparison))
    if comparison.reward_model:
        lines += ["", "## The reward model", ""] + reward_model_sentences(comparison.reward_model)
    if comparison.by_family:
        lines += ["", "## By task family", ""] + markdown_table(family_rows(comparison))
    provenance = provenance_rows(comparison)
    if len(provenance) > 1:
        lines += ["", "## Checkpoints compared", "", "| " + " | ".join(provenance[0]) + " |", "|---|---|---|---|"]
        lines += [f"| {name} | `{path}` | `{digest}` | {engine} |" for name, path, digest, engine in provenance[1:]]
    return "\n".join(lines) + "\n"


def print_summary(comparison) -> None:
    print()
    for row in means_table_rows(comparison):
        print("  ".join(cell.ljust(10) for cell in row))
    print(headline(comparison))
    for verdict in best_of_n_verdicts(comparison):
        print(verdict)
