import json
from pathlib import Path

import pytest

import alignment  # bench/, put on the path by conftest.py


def fake_run(root: Path, gold: float, accuracy: float) -> Path:
    for stage in alignment.STAGES:
        (root / stage).mkdir(parents=True)
        metrics = {"eval_accuracy": accuracy, "eval_gold_accuracy": accuracy + 0.1, "annotator_gold_agreement": 0.86}
        (root / stage / "manifest.json").write_text(json.dumps({"wall_time_s": 10, "metrics": metrics}))
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text(json.dumps({
        "win_rates": {"gold": {"win_rate": gold}, "reward": {"win_rate": 0.9},
                      "gold_vs_best_of_16": {"win_rate": gold - 0.2}},
        "means": {"ppo": {"kl_to_sft": 1.5}}}))
    return root


def test_figures_of_each_seed_and_their_spread(tmp_path):
    per_seed = {1: alignment.seed_figures(fake_run(tmp_path / "a", 0.8, 0.7)),
                2: alignment.seed_figures(fake_run(tmp_path / "b", 0.9, 0.8))}
    assert per_seed[1]["wall_time_s"] == 40 and per_seed[1]["ppo_gold_vs_best_of_16_win_rate"] == pytest.approx(0.6)
    summary = alignment.summarise(per_seed)
    assert summary["ppo_gold_win_rate"] == pytest.approx({"mean": 0.85, "min": 0.8, "max": 0.9})
    assert summary["reward_accuracy_vs_gold"]["mean"] == pytest.approx(0.85)
    assert "reward_calibration_error" not in summary  # not recorded by these runs: left out, not invented
    table = alignment.markdown_table(summary, per_seed, "# header")
    assert "| ppo_gold_win_rate | 0.850 | 0.800–0.900 | 0.800 | 0.900 |" in table
