"""Alignment figures anyone can reproduce: the default preset once per seed, then one table.

    python bench/alignment.py --seeds 3 [--config configs/default.yaml] [--output-dir runs/alignment]

Each seed is a whole `rlhf run` (run.seed = 42, 43, ...) in OUTPUT_DIR/seed-<seed>; finished runs are reused
(the stage graph skips a stage only when its config and inputs are unchanged), so a second call only gathers.
Per seed it reads the reward stage's manifest (held-out pairwise accuracy against the annotator and the gold
judge, calibration error when recorded) and the report's report.json (PPO's gold win rate over SFT with its 95%
interval, its reward-model win rate, its win rates against best-of-N and best-of-N's mean gold where the report
has them, mean gold of SFT and PPO, PPO's mean KL to SFT), then writes OUTPUT_DIR/alignment.json and
OUTPUT_DIR/alignment.md: every figure as the mean over seeds with its spread (min–max), dated, with the
machine named. A single run on another machine can land anywhere in that spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from side_by_side import machine_description  # bench/ scripts import each other, run as `python bench/x.py`

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "reward", "ppo")


RUN_TIME_FILE = "alignment_run_time.json"  # in a run directory: how long its `rlhf run` took from empty


def run_seed(config: Path, output_dir: Path, seed: int, overrides: tuple[str, ...] = (), name: str = "") -> Path:
    """`rlhf run` for one seed (reusing whatever already finished), with `overrides`, in OUTPUT_DIR/<name>seed-<seed>;
    the run directory. A run that starts from an empty directory records its whole wall time (process starts and
    the report included) in RUN_TIME_FILE."""
    run_dir = output_dir / f"{name}seed-{seed}"
    from_empty = not run_dir.exists()
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), f"run.seed={seed}",
               f"run.name={run_dir.name}", f"run.output_dir={output_dir}", *overrides]
    print(f"[alignment] seed {seed}: {' '.join(command[2:])}", flush=True)
    began = time.time()
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if from_empty:
        (run_dir / RUN_TIME_FILE).write_text(json.dumps({"rlhf_run_wall_s": round(time.time() - began, 1)}))
    return run_dir


def seed_figures(run_dir: Path) -> dict[str, Any]:
    """The figures of one finished run: reward-model accuracies, win rates, KL, wall time."""
    manifests = {stage: json.loads((run_dir / stage / "manifest.json").read_text()) for stage in STAGES}
    report = json.loads((run_dir / "report" / "report.json").read_text())
    reward = manifests["reward"].get("metrics") or {}
    gold = report["win_rates"].get("gold", {})
    means = report["means"]
    figures: dict[str, Any] = {
        "reward_accuracy_vs_annotator": reward.get("eval_accuracy"),
        "reward_accuracy_vs_gold": reward.get("eval_gold_accuracy"),
        "annotator_gold_agreement": reward.get("annotator_gold_agreement"),
        "reward_calibration_error": reward.get("eval_calibration_error"),
        "reward_gold_calibration_error": reward.get("eval_gold_calibration_error"),
        "ppo_gold_win_rate": gold.get("win_rate"),
        "ppo_gold_win_rate_ci_low": gold.get("low"),
        "ppo_gold_win_rate_ci_high": gold.get("high"),
        "ppo_reward_win_rate": report["win_rates"].get("reward", {}).get("win_rate"),
        "sft_mean_gold": means.get("sft", {}).get("gold"),
        "ppo_mean_gold": means.get("ppo", {}).get("gold"),
        "ppo_kl_to_sft": means.get("ppo", {}).get("kl_to_sft"),
    }
    for name, rate in report["win_rates"].items():  # e.g. "gold_vs_best_of_16" when the report has best-of-N
        if name not in ("gold", "reward"):
            figures[f"ppo_{name}_win_rate"] = rate.get("win_rate")
    for n in report.get("settings", {}).get("best_of", []):
        figures[f"best_of_{n}_mean_gold"] = report.get("best_of_n", {}).get(str(n), {}).get("gold")
    figures["wall_time_s"] = sum(m.get("wall_time_s") or 0 for m in manifests.values())
    if (run_dir / RUN_TIME_FILE).is_file():  # the whole `rlhf run`, from an empty directory to the report
        figures["rlhf_run_wall_s"] = json.loads((run_dir / RUN_TIME_FILE).read_text())["rlhf_run_wall_s"]
    return figures


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over seeds of every figure that every seed has."""
    keys = [k for k in next(iter(per_seed.values())) if all(per_seed[s].get(k) is not None for s in per_seed)]
    summary = {}
    for key in keys:
        values = [float(per_seed[s][key]) for s in per_seed]
        summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return summary


def markdown_table(summary: dict[str, dict[str, float]], per_seed: dict[int, dict[str, Any]], header: str) -> str:
    seeds = list(per_seed)
    lines = [header, "", "| figure | mean | min–max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for key, stats in summary.items():
        cells = " | ".join(f"{per_seed[s][key]:.3f}" for s in seeds)
        lines.append(f"| {key} | {stats['mean']:.3f} | {stats['min']:.3f}–{stats['max']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, from --first-seed on")
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "alignment")
    arguments = parser.parse_args(argv)
    began = time.time()
    per_seed = {}
    for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
        per_seed[seed] = seed_figures(run_seed(arguments.config, arguments.output_dir.resolve(), seed))
    summary = summarise(per_seed)
    machine = machine_description()
    header = (f"# Alignment figures, {arguments.seeds} seeds of {arguments.config.name}\n\n"
              f"{machine['date']}, {machine['nproc']} cores of {machine['cpu']} (load {machine['load_average_1min']}), "
              f"torch {machine['torch']}; gathered in {time.time() - began:.0f} s")
    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    (arguments.output_dir / "alignment.json").write_text(json.dumps(
        {"machine": machine, "config": str(arguments.config),
         "per_seed": per_seed, "summary": summary}, indent=1))
    table = markdown_table(summary, per_seed, header)
    (arguments.output_dir / "alignment.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
