import json
from pathlib import Path

import alignment  # bench/, put on the path by conftest.py
import pytest


def fake_run(root: Path, gold: float, accuracy: float, best_of: bool = True) -> Path:
    """A finished run as bench/alignment.py reads it: stage manifests and the report's report.json."""
    for stage in alignment.STAGES:
        (root / stage).mkdir(parents=True)
        metrics = {"eval_accuracy": accuracy, "eval_gold_accuracy": accuracy + 0.1, "annotator_gold_agreement": 0.86,
                   "eval_calibration_error": accuracy / 10, "eval_gold_calibration_error": accuracy / 5}
        (root / stage / "manifest.json").write_text(json.dumps({"wall_time_s": 10, "metrics": metrics}))
    (root / "report").mkdir()
    report = {"win_rates": {"gold": {"win_rate": gold, "low": gold - 0.1, "high": gold + 0.05},
                            "reward": {"win_rate": 0.9}},
              "means": {"sft": {"gold": 1.0}, "ppo": {"kl_to_sft": 1.5, "gold": 2.0}}, "settings": {}}
    if best_of:
        report["win_rates"].update(gold_vs_best_of_4={"win_rate": gold - 0.1},
                                    gold_vs_best_of_16={"win_rate": gold - 0.2})
        report["settings"]["best_of"] = [4, 16]
        report["best_of_n"] = {"1": {"gold": 1.0}, "4": {"gold": 1.6}, "16": {"gold": 2.1}}
    (root / "report" / "report.json").write_text(json.dumps(report))
    return root


def test_figures_of_each_seed_and_their_spread(tmp_path):
    per_seed = {1: alignment.seed_figures(fake_run(tmp_path / "a", 0.8, 0.7)),
                2: alignment.seed_figures(fake_run(tmp_path / "b", 0.9, 0.8))}
    assert per_seed[1]["wall_time_s"] == 40 and per_seed[1]["ppo_gold_vs_best_of_16_win_rate"] == pytest.approx(0.6)
    summary = alignment.summarise(per_seed)
    assert summary["ppo_gold_win_rate"] == pytest.approx({"mean": 0.85, "min": 0.8, "max": 0.9})
    assert summary["reward_accuracy_vs_gold"]["mean"] == pytest.approx(0.85)
    assert summary["ppo_gold_win_rate_ci_low"]["min"] == pytest.approx(0.7)
    assert summary["reward_gold_calibration_error"]["mean"] == pytest.approx(0.15)
    assert summary["ppo_gold_vs_best_of_4_win_rate"]["mean"] == pytest.approx(0.75)
    assert summary["best_of_16_mean_gold"]["mean"] == 2.1 and "best_of_1_mean_gold" not in summary
    assert summary["ppo_mean_gold"]["mean"] == 2.0 and summary["sft_mean_gold"]["mean"] == 1.0
    assert list(summary)[-1] == "wall_time_s"
    table = alignment.markdown_table(summary, per_seed, "# header")
    assert "| ppo_gold_win_rate | 0.850 | 0.800–0.900 | 0.800 | 0.900 |" in table
    assert "| best_of_4_mean_gold | 1.600 |" in table


def test_runs_reported_before_best_of_n_still_gather(tmp_path):
    run = fake_run(tmp_path / "old", 0.8, 0.7, best_of=False)
    (run / "reward" / "manifest.json").write_text(json.dumps({"wall_time_s": 10, "metrics": {"eval_accuracy": 0.7}}))
    figures = alignment.seed_figures(run)
    assert not any("best_of" in key for key in figures) and figures["ppo_gold_win_rate_ci_high"] == pytest.approx(0.85)
    summary = alignment.summarise({1: figures})
    assert "reward_calibration_error" not in summary  # not recorded by this run: left out, not invented


def test_the_whole_run_time_is_read_where_the_run_started_from_empty(tmp_path):
    run = fake_run(tmp_path / "a", 0.8, 0.7)
    assert "rlhf_run_wall_s" not in alignment.seed_figures(run)  # reused runs: nothing to time
    (run / alignment.RUN_TIME_FILE).write_text(json.dumps({"rlhf_run_wall_s": 251.3}))
    assert alignment.seed_figures(run)["rlhf_run_wall_s"] == 251.3


def test_run_seed_times_only_a_run_that_starts_from_an_empty_directory(tmp_path, monkeypatch):
    calls = []

    def fake_rlhf_run(command, **kwargs):
        calls.append(command)
        (tmp_path / "seed-5").mkdir(exist_ok=True)

    monkeypatch.setattr(alignment.subprocess, "run", fake_rlhf_run)
    run_dir = alignment.run_seed(Path("configs/default.yaml"), tmp_path, 5)
    assert "run.seed=5" in calls[0] and (run_dir / alignment.RUN_TIME_FILE).is_file()
    (run_dir / alignment.RUN_TIME_FILE).unlink()
    alignment.run_seed(Path("configs/default.yaml"), tmp_path, 5)  # resumed or reused: not timed
    assert not (run_dir / alignment.RUN_TIME_FILE).exists()
