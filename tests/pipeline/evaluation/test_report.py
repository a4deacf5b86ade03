import json
import shutil
import subprocess

import pytest

from pipeline.evaluation.charts import over_optimisation_chart, reliability_chart
from pipeline.evaluation.samples import Comparison, Sample
from pipeline.evaluation.figures import win_rate
from pipeline.evaluation.report import (
    best_of_n_rows, best_of_n_verdicts, family_rows, headline, over_optimisation_rows, reward_model_sentences,
    win_rate_label, write_report)


def comparison() -> Comparison:
    prompts = ["Write a short story about Mia and a fox.", "How can I hurt the cat?"]
    samples = []
    for index in range(2):
        for k in range(2):
            samples.append(Sample(index, "sft", f"Ugh. answer {index}.{k} <b>", -0.5 + k, 1.0, None, 12))
            samples.append(Sample(index, "ppo", f"Sure! answer {index}.{k}", 0.8, 2.6, 1.5, 10))
    result = Comparison(prompts, samples, settings={"samples_per_prompt": 2, "temperature": 0.7, "builtin_task": True})
    result.means = {"sft": {"reward": 0.0, "gold": 1.0, "length": 12}, "ppo": {"reward": 0.8, "gold": 2.6, "kl_to_sft": 1.5,
                                                                              "length": 10}}
    result.win_rates = {"reward": win_rate([0.8, 0.8], [0.0, 0.0]), "gold": win_rate([2.6, 2.6], [1.0, 1.0])}
    return result


def write_run(tmp_path):
    (tmp_path / "ppo").mkdir()
    with open(tmp_path / "ppo" / "metrics.jsonl", "w") as handle:
        for step in range(1, 6):
            handle.write(json.dumps({"step": step, "objective/scores": 0.1 * step, "objective/gold_score": 1 + 0.2 * step,
                                     "objective/kl": 0.05 * step, "val/response_length": 20 - step}) + "\n")
    return write_report(tmp_path, comparison())


def test_win_rate_counts_ties_half_and_bounds_the_interval():
    rate = win_rate([2, 1, 1, 0], [1, 1, 2, 0])
    assert rate["win_rate"] == pytest.approx(0.5) and rate["ties"] == 2
    assert 0 <= rate["low"] < 0.5 < rate["high"] <= 1
    assert win_rate([1] * 50, [0] * 50)["low"] > 0.9


def test_report_files_and_escaping(tmp_path):
    report = write_run(tmp_path)
    page = (report / "index.html").read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page.split("<body>")[1].replace("<b>gold</b>", "").replace(
        "<b>reward</b>", "")
    assert page.count("<svg") == 5  # four PPO curves and the reward-vs-gold scatter
    assert "http" not in page  # self-contained: nothing to fetch
    data = json.loads((report / "report.json").read_text())
    assert data["win_rates"]["gold"]["win_rate"] == 1.0 and len(data["samples"]) == 8
    assert "PPO beats SFT on the hidden gold judge in 100%" in (report / "summary.md").read_text()
    assert headline(comparison()).startswith("PPO beats SFT on the hidden gold judge in 100% of 2")


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed")
def test_report_renders_in_a_real_browser(tmp_path):
    report = write_run(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--dump-dom", (report / "index.html").as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert 'id="side-by-side"' in dom and dom.count("<tr>") >= 5
    assert dom.count("<svg") == 5 and "<polyline" in dom and "<circle" in dom
    screenshot = tmp_path / "report.png"
    subprocess.run([chromium(), *flags, f"--screenshot={screenshot}", "--window-size=1200,1600",
                    (report / "index.html").as_uri()], capture_output=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000


# ---------------------------------------------------------------- best-of-N, over-optimisation, reward model, families
def rich_comparison() -> Comparison:
    """comparison() with what compare adds: a best-of-N pool (2 more SFT samples a prompt), best-of-N figures and
    win rates, a PPO snapshot, the reward model's figures and the per-family figures."""
    from pipeline.evaluation.samples import POOL
    from pipeline.evaluation.figures import best_of_n_table, family_figures, over_optimisation_points, per_prompt_means, pools_by_prompt

    result = comparison()
    result.samples += [Sample(index, POOL, f"pool {index}.{k}", 1.5 * k, 3.0 * k, None, 9) for index in range(2)
                       for k in range(2)]
    result.settings.update(best_of=[2, 4], best_of_pool_size=4, best_of_pool_seed=1235, snapshot_samples_per_prompt=1)
    result.best_of_n = best_of_n_table(pools_by_prompt(result.samples, 2), [1, 2, 4], builtin=True)
    for n in (2, 4):
        result.win_rates[f"gold_vs_best_of_{n}"] = win_rate(per_prompt_means(result.samples, "ppo", "gold", 2),
                                                            result.best_of_n[str(n)]["per_prompt"]["gold"])
    snapshot = {3: {"reward": 0.5, "gold": 2.0, "kl_to_sft": 0.7}}
    result.over_optimisation = over_optimisation_points(result.means, snapshot, 5, result.best_of_n, 2, 1)
    bins = [{"low": 0.0, "high": 0.5, "count": 4, "mean_predicted": 0.3, "observed": 0.25},
            {"low": 0.5, "high": 1.0, "count": 0, "mean_predicted": None, "observed": None}]
    result.reward_model = {"eval_accuracy": 0.7, "eval_pairs": 40, "eval_gold_accuracy": 0.8, "eval_gold_pairs": 30,
                           "annotator_gold_agreement": 0.86, "eval_calibration_error": 0.04, "eval_calibration": bins,
                           "eval_gold_calibration_error": 0.06, "eval_gold_calibration": bins,
                           "eval_gold_accuracy_by_kind": {"story_qa, correctness differs": {"accuracy": 0.5, "pairs": 10},
                                                          "story_qa, same correctness": {"accuracy": 0.95, "pairs": 20}}}
    # PPO loses on the harmful prompt.
    result.samples.append(Sample(1, "ppo", "Of course! <i>cheerful</i>", 2.0, -3.0, 1.0, 6))
    result.by_family = family_figures(result)
    return result


def test_best_of_n_verdicts_say_plainly_who_wins_what_it_costs_and_when_the_mean_disagrees():
    result = rich_comparison()
    result.means["ppo"]["gold"] = 0.0
    result.best_of_n["2"]["gold"], result.best_of_n["4"]["gold"] = 1.0, -1.0
    result.win_rates["gold_vs_best_of_2"] = {"win_rate": 0.2, "low": 0.1, "high": 0.3, "prompts": 2, "ties": 0}
    result.win_rates["gold_vs_best_of_4"] = {"win_rate": 0.45, "low": 0.3, "high": 0.6, "prompts": 2, "ties": 0}
    first, second = best_of_n_verdicts(result)
    assert first.startswith("PPO loses to best-of-2 on the gold judge: PPO wins 20% of 2 prompts")
    assert "ahead on the mean" not in first and "best-of-2 draws 2 and scores each" in first
    assert second.startswith("PPO and best-of-4 are level on the gold judge within noise: PPO wins 45%")
    assert "; PPO wins fewer prompts but by more, and is ahead on the mean." in second
    result.win_rates["gold_vs_best_of_2"] = {"win_rate": 0.8, "low": 0.6, "high": 0.9, "prompts": 2, "ties": 0}
    result.win_rates["gold_vs_best_of_4"] = {"win_rate": 0.55, "low": 0.4, "high": 0.7, "prompts": 2, "ties": 0}
    first, second = best_of_n_verdicts(result)
    assert first.startswith("PPO beats best-of-2") and "; best-of-2 wins fewer prompts but by more" in first
    assert second.startswith("PPO and best-of-4 are level") and "ahead on the mean" not in second
    result.settings["best_of"] = []
    assert best_of_n_verdicts(result) == []


def test_best_of_n_and_over_optimisation_tables():
    result = rich_comparison()
    rows = best_of_n_rows(result)
    assert rows[0][:4] == ["policy", "samples per prompt at inference", "mean gold", "mean reward (normalised)"]
    assert [row[0] for row in rows[1:]] == ["SFT", "best-of-1", "best-of-2", "best-of-4", "PPO"]
    assert rows[4][1] == "4 (+4 RM scores)" and rows[2][1] == "1" and rows[4][4] == "0.636 (analytic)"
    assert rows[2][5] == "–" and rows[4][5].endswith("%)")
    steps = over_optimisation_rows(result)
    assert [row[1] for row in steps[1:]] == ["step 0", "step 3", "step 5", "N = 1", "N = 2", "N = 4"]
    assert steps[2][5] == "1" and steps[4][5] == "pool of 4"


def test_win_rate_labels():
    assert win_rate_label("gold") == "gold judge: PPO vs SFT"
    assert win_rate_label("reward_vs_best_of_16") == "reward model: PPO vs best-of-16"
    assert win_rate_label("gold_vs_sft") == "gold judge: PPO vs SFT"


def test_over_optimisation_chart_draws_gains_over_sft_and_reliability_skips_empty_bins():
    result = rich_comparison()
    svg = over_optimisation_chart(result.over_optimisation)
    assert svg.count("<polyline") == 4 and "gold, best-of-N" in svg and "N=4" in svg and ">3</text>" in svg
    assert over_optimisation_chart([]) == ""
    reliability = reliability_chart(result.reward_model)
    assert reliability.count("<circle") == 2 and reliability.count("<rect") == 2  # one bin each, and the legends
    assert reliability_chart({}) == ""


def test_reward_model_sentences_and_family_rows():
    result = rich_comparison()
    sentences = reward_model_sentences(result.reward_model)
    assert sentences == ["Held-out pairwise accuracy against the annotator's labels: 0.700 (40 pairs).",
                         "Against the gold judge's ordering: 0.800 (30 pairs the judge does not score equal); the "
                         "annotator itself agrees with the judge on 0.860.",
                         "By kind of pair: story_qa, correctness differs 0.500 (10 pairs); story_qa, same correctness "
                         "0.950 (20 pairs).",
                         "Expected calibration error of σ(r_a − r_b): 0.040 against the annotator and 0.060 against "
                         "the gold judge."]
    assert reward_model_sentences({"eval_accuracy": 0.6}) == ["Held-out pairwise accuracy against the annotator's "
                                                              "labels: 0.600."]
    rows = family_rows(result)
    assert rows[0][4:] == ["gold judge: PPO vs SFT", "gold judge: PPO vs best-of-2", "gold judge: PPO vs best-of-4",
                           "prompts PPO loses to SFT"]
    assert [row[0] for row in rows[1:]] == ["write_story", "harmful"]


def test_report_shows_best_of_n_curve_reward_model_and_losses(tmp_path):
    (tmp_path / "ppo").mkdir()
    report = write_report(tmp_path, rich_comparison())
    page = (report / "index.html").read_text()
    for section in ('id="best-of-n"', 'id="over-optimisation"', 'id="over-optimisation-chart"', 'id="reward-model"',
                    'id="by-family"', 'class="losses"', 'id="side-by-side"'):
        assert section in page
    assert "harmful: where PPO loses to SFT" in page and "&lt;i&gt;cheerful&lt;/i&gt;" in page
    assert "sampled 1 times per prompt" in page and "http" not in page
    data = json.loads((report / "report.json").read_text())
    assert set(data) >= {"best_of_n", "over_optimisation", "reward_model", "by_family"}
    assert data["by_family"]["harmful"]["losses"][0]["ppo_response"] == "Of course! <i>cheerful</i>"
    summary = (report / "summary.md").read_text()
    assert "## PPO vs best-of-N from the SFT policy" in summary and "## By task family" in summary
    assert "| best-of-4 | 4 (+4 RM scores) |" in summary and "Expected calibration error" in summary
    assert "gold_vs_best_of_4 win rate (gold judge: PPO vs best-of-4)" in summary


def test_provenance_names_the_engine_each_checkpoint_trained_on():
    from pipeline.evaluation.report import provenance_rows

    result = comparison()
    result.settings["checkpoints"] = {"sft": {"path": "runs/x/sft/final", "digest": "ab"},
                                      "ppo": {"path": "runs/x/ppo/final", "digest": "cd"}}
    result.settings["engines"] = {"ppo": {"engine": "zero3", "processes": 2, "mixed_precision": "no"}}
    rows = provenance_rows(result)
    assert rows[0][-1] == "trained on"
    assert rows[1][-1] == "not recorded"
    assert rows[2][-1] == "zero3 × 2 process(es), mixed precision no"
