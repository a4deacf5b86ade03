"""Alignment against scale: the whole pipeline (pretrain → SFT → reward → PPO → report) for several pretraining sizes
and budgets, everything after pretraining as the config says, and the alignment figures against pretraining compute.

    python bench/alignment_scale.py [--config configs/default.yaml] [--seeds 1] [--output-dir runs/alignment-scale] \\
        [--scale NAME=key=value,key=value ...]

Each scale is `rlhf run` with its overrides (bench/alignment.py's run_seed; finished runs are reused) in
OUTPUT_DIR/<NAME>-seed-<seed>. Pretraining compute is C = 6 N D, N the model's non-embedding parameters and D the
tokens pretraining read (max_steps × batch × seq_length), the x axis of the sweep's page (`rlhf sweep`). Writes
OUTPUT_DIR/alignment_scale.json, .md and .html (reward-model accuracy against gold, PPO's gold win rate over SFT and
against best-of-16, against compute: Gao et al. 2022 plot reward-model size the same way), dated, machine named.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from alignment import REPO, run_seed, seed_figures, summarise  # bench/ scripts import each other
from side_by_side import machine_description

sys.path.insert(0, str(REPO))

from pipeline.config.loading import load_config
from pipeline.evaluation.charts import ChartSeries, xy_chart
from pipeline.scaling.grid import ModelSize, tokens_per_step

# Three pretraining sizes on the default run's 400 steps (D ≈ 0.8M tokens): 2 × 64 (C ≈ 5e11), 3 × 96 and the
# default 4 × 128 (C ≈ 4e12), an 8× spread of compute that runs in about 25 minutes on 2 cores. At about 400 steps
# the sweep measured held-out loss 0.76 for 2 × 64 and 0.66 for 4 × 128 (bench/results/2026-12-06-sweep-default.json).
DEFAULT_SCALES = {
    "2x64-400": ["model.num_hidden_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
                 "model.intermediate_size=176"],
    "3x96-400": ["model.num_hidden_layers=3", "model.hidden_size=96", "model.num_attention_heads=3",
                 "model.intermediate_size=264"],
    "4x128-400": [],
}

FIGURES = (("reward_accuracy_vs_gold", "reward model accuracy (gold)"),
           ("ppo_gold_win_rate", "PPO gold win rate over SFT"),
           ("ppo_gold_vs_best_of_16_win_rate", "PPO gold win rate over best-of-16"))


def pretraining_compute(config_path: Path, overrides: list[str]) -> dict[str, float]:
    config = load_config(config_path, overrides)
    size = ModelSize(config.model.num_hidden_layers, config.model.hidden_size, config.model.num_attention_heads,
                     config.model.intermediate_size)
    tokens = config.pretrain.max_steps * tokens_per_step(config)
    return {"non_embedding_parameters": size.non_embedding_parameters(), "tokens": tokens,
            "compute": 6.0 * size.non_embedding_parameters() * tokens}


def parse_scales(entries: list[str] | None) -> dict[str, list[str]]:
    if not entries:
        return DEFAULT_SCALES
    scales = {}
    for entry in entries:
        name, _, overrides = entry.partition("=")
        scales[name] = [o for o in overrides.split(",") if o]
    return scales


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "alignment-scale")
    parser.add_argument("--scale", action="append", metavar="NAME=key=value,...",
                        help="a scale and its overrides (repeatable; default: three around the default run)")
    arguments = parser.parse_args(argv)
    output_dir = arguments.output_dir.resolve()
    began = time.time()
    scales = {}
    for name, overrides in parse_scales(arguments.scale).items():
        per_seed = {seed: seed_figures(run_seed(arguments.config, output_dir, seed, tuple(overrides), f"{name}-"))
                    for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds)}
        scales[name] = {"overrides": overrides, **pretraining_compute(arguments.config, overrides),
                        "per_seed": per_seed, "summary": summarise(per_seed)}
    machine = machine_description()
    header = (f"# Alignment against pretraining scale, {arguments.seeds} seed(s) of {arguments.config.name}\n\n"
              f"{machine['date']}, {machine['nproc']} cores of {machine['cpu']}, torch {machine['torch']}; "
              f"gathered in {time.time() - began:.0f} s")
    keys = ["non_embedding_parameters", "tokens", "compute"] + [k for k, _ in FIGURES] + [
        "best_of_16_mean_gold", "ppo_mean_gold", "sft_mean_gold", "ppo_kl_to_sft", "rlhf_run_wall_s"]
    lines = [header, "", "| scale | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, scale in scales.items():
        cells = []
        for key in keys:
            value = scale[key] if key in scale else scale["summary"].get(key, {}).get("mean")
            cells.append("—" if value is None else f"{value:.3g}" if isinstance(value, float) else f"{value:,}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    series = [ChartSeries(label, [(math.log10(s["compute"]), s["summary"][key]["mean"]) for s in scales.values()
                                  if key in s["summary"]], colour, labels=[n for n, s in scales.items()
                                                                          if key in s["summary"]])
              for (key, label), colour in zip(FIGURES, ("#ff7f0e", "#d62728", "#9467bd"))]
    chart = xy_chart("Alignment against pretraining compute", series, "log10 pretraining compute (FLOPs)",
                     "share", y_range=(0.0, 1.0), width=640, height=360)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "alignment_scale.json").write_text(json.dumps({"machine": machine, "config": str(arguments.config),
                                                                 "scales": scales}, indent=1))
    (output_dir / "alignment_scale.md").write_text(table)
    (output_dir / "alignment_scale.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Alignment against scale</title></head><body>"
        f"<pre>{table}</pre>{chart}</body></html>")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
