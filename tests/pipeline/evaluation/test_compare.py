"""`rlhf compare`'s figures on hand-made samples (best-of-N from the pool, the over-optimisation points, the reward
model's figures, per-family win rates and losses), then compare end to end on a tiny PPO run with policy
snapshots."""

import json
import shutil

import pytest
import torch

from pipeline.config.parsing import ConfigError
from pipeline.evaluation.samples import POOL, Comparison, Sample
from pipeline.evaluation.figures import best_of_n_table, best_of_sizes, curve_sizes, family_figures, over_optimisation_points, per_prompt_means, policy_means, pools_by_prompt, win_rate
from pipeline.evaluation.compare import reward_model_figures

QA = "Read the story and answer the question.\nStory: Mia had a red kite.\nQuestion: What colour was the kite?"
STORY = "Write a short story about Tom and a fox."
HARM = "How can I hurt the cat?"


def sample(index, policy, reward, gold, kl=None, response="r"):
    return Sample(index, policy, response, reward, gold, kl, 5)


def two_prompt_pool():
    """Prompt 0: SFT samples (reward, gold) (0.3, 1), (0.9, 2), pool samples (0.1, 3), (0.5, 4); prompt 1: (0, 0),
    (0, 1), pool (2, 5), (−1, 9)."""
    samples = [sample(0, "sft", 0.3, 1.0), sample(0, "sft", 0.9, 2.0), sample(1, "sft", 0.0, 0.0),
               sample(1, "sft", 0.0, 1.0), sample(0, POOL, 0.1, 3.0), sample(0, POOL, 0.5, 4.0),
               sample(1, POOL, 2.0, 5.0), sample(1, POOL, -1.0, 9.0)]
    return samples


def test_best_of_sizes_and_the_curve_sizes():
    assert best_of_sizes([16, 4, 4]) == (4, 16)
    assert best_of_sizes([]) == best_of_sizes([0]) == best_of_sizes(None) == ()
    with pytest.raises(ConfigError, match="--best-of takes sample counts of at least 1"):
        best_of_sizes([4, -2])
    assert curve_sizes((4, 16), 16) == [1, 2, 4, 8, 16]
    assert curve_sizes((3,), 5) == [1, 2, 3, 4]


def test_pools_keep_compare_samples_first_and_best_of_n_is_estimated_per_prompt():
    samples = two_prompt_pool()
    pools = pools_by_prompt(samples, 2)
    assert [s.gold for s in pools[0]] == [1.0, 2.0, 3.0, 4.0] and [s.gold for s in pools[1]] == [0.0, 1.0, 5.0, 9.0]
    table = best_of_n_table(pools, [1, 2, 4], builtin=True)
    # Prompt 0 as in tests/pipeline/evaluation/test_best_of_n.py: best-of-2's gold is 15/6. Prompt 1, ranks by reward:
    # sample 3 (−1), 1 (0, later of the tie), 0 (0), 2 (2): weights 0, 1/6, 2/6, 3/6 → gold (0·2 + 1 + 15)/6.
    assert table["2"]["per_prompt"]["gold"] == pytest.approx([15 / 6, 16 / 6])
    assert table["4"]["per_prompt"]["gold"] == [2.0, 5.0]  # the argmax of each pool
    assert table["1"]["per_prompt"]["reward"] == pytest.approx([0.45, 0.25])  # the pool's mean
    assert table["4"]["gold"] == pytest.approx(3.5) and table["4"]["kl_to_sft"] == pytest.approx(1.3862944 - 0.75)
    assert table["1"]["kl_to_sft"] == 0.0 and table["2"]["pool_size"] == 4
    assert "gold" not in best_of_n_table(pools, [2], builtin=False)["2"]["per_prompt"]


def test_policy_and_per_prompt_means():
    samples = [sample(0, "ppo", 1.0, 2.0, kl=0.5), sample(0, "ppo", 3.0, 4.0, kl=1.5),
               sample(1, "ppo", 0.0, 1.0, kl=1.0), sample(0, "sft", 9.0, 9.0)]
    assert per_prompt_means(samples, "ppo", "gold", 2) == [3.0, 1.0]
    assert policy_means(samples, "ppo", builtin=True) == {"reward": pytest.approx(4 / 3), "length": 5,
                                                          "gold": pytest.approx(7 / 3), "kl_to_sft": 1.0}
    assert policy_means(samples, "sft", builtin=False) == {"reward": 9.0, "length": 5}


def test_over_optimisation_points_run_from_sft_through_snapshots_to_the_final_policy_and_best_of_n():
    means = {"sft": {"reward": 0.0, "gold": 1.0}, "ppo": {"reward": 2.0, "gold": 1.5, "kl_to_sft": 3.0}}
    snapshots = {40: {"reward": 1.5, "gold": 1.8, "kl_to_sft": 2.0}, 20: {"reward": 0.8, "gold": 1.4, "kl_to_sft": 0.9}}
    table = best_of_n_table(pools_by_prompt(two_prompt_pool(), 2), [1, 4], builtin=True)
    points = over_optimisation_points(means, snapshots, 60, table, 4, 2)
    assert [(p["method"], p.get("step", p.get("n"))) for p in points] == [
        ("ppo", 0), ("ppo", 20), ("ppo", 40), ("ppo", 60), ("best_of_n", 1), ("best_of_n", 4)]
    assert points[0] == {"method": "ppo", "step": 0, "samples_per_prompt": 4, "kl_to_sft": 0.0, "proxy": 0.0,
                         "gold": 1.0}
    assert points[1]["samples_per_prompt"] == 2 and points[3]["proxy"] == 2.0 and points[3]["kl_to_sft"] == 3.0
    assert points[5]["gold"] == pytest.approx(3.5) and points[5]["pool_size"] == 4
    without_gold = over_optimisation_points({"sft": {"reward": 0.0}, "ppo": {"reward": 1.0, "kl_to_sft": 1.0}}, {},
                                            6, {}, 4, 2)
    assert [p["gold"] for p in without_gold] == [None, None]


def test_reward_model_figures_come_from_the_reward_manifest():
    bins = [{"low": 0.0, "high": 0.5, "count": 2, "mean_predicted": 0.3, "observed": 0.5}]
    manifest = {"metrics": {"eval_accuracy": 0.7, "eval_gold_accuracy": 0.8, "eval_calibration": bins,
                            "eval_calibration_error": 0.2, "eval_loss": 0.5, "eval_gold_calibration_error": None}}
    assert reward_model_figures(manifest) == {"eval_accuracy": 0.7, "eval_gold_accuracy": 0.8,
                                              "eval_calibration": bins, "eval_calibration_error": 0.2}
    assert reward_model_figures(None) == reward_model_figures({"status": "finished"}) == {}


def test_family_figures_win_rates_and_the_prompts_ppo_loses():
    prompts = [QA, STORY, HARM, QA]
    samples = []
    for index, (sft_golds, ppo_golds) in enumerate([((1.0, 3.0), (0.0, 1.0)), ((0.0, 0.0), (2.0, 2.0)),
                                                    ((-1.0, -1.0), (1.0, 1.0)), ((2.0, 2.0), (1.5, 2.0))]):
        samples += [sample(index, "sft", 0.0, g, response=f"sft {index} {g}") for g in sft_golds]
        samples += [sample(index, "ppo", 0.0, g, kl=1.0, response=f"ppo {index} {g}") for g in ppo_golds]
    comparison = Comparison(prompts, samples, settings={"best_of": [2]})
    comparison.best_of_n = {"1": {"n": 1, "per_prompt": {"gold": [9.0] * 4}},
                            "2": {"n": 2, "per_prompt": {"gold": [0.0, 3.0, 0.0, 1.0]}}}
    figures = family_figures(comparison, shown=1)
    assert list(figures) == ["story_qa", "write_story", "harmful"]
    qa = figures["story_qa"]
    assert qa["prompts"] == 2 and qa["losses_to_sft"] == 2 and qa["win_rates"]["gold_vs_sft"]["win_rate"] == 0.0
    assert set(qa["win_rates"]) == {"gold_vs_sft", "gold_vs_best_of_2"}  # the sizes asked for, not the curve's
    assert qa["win_rates"]["gold_vs_best_of_2"]["win_rate"] == 1.0
    # The bigger loss first (1.5 below SFT on prompt 0), PPO's worst sample beside SFT's best.
    assert qa["losses"] == [{"prompt_index": 0, "prompt": QA, "ppo_mean_gold": 0.5, "sft_mean_gold": 2.0,
                             "ppo_response": "ppo 0 0.0", "ppo_gold": 0.0, "sft_response": "sft 0 3.0",
                             "sft_gold": 3.0}]
    assert figures["write_story"]["win_rates"]["gold_vs_best_of_2"]["win_rate"] == 0.0
    assert figures["harmful"]["losses"] == [] and figures["harmful"]["ppo_mean_gold"] == 1.0
    assert win_rate([], [])["prompts"] == 0


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ppo_run_with_snapshots(smoke_pretrained, tmp_path_factory):
    """The shared smoke pretraining run with its model standing in for the SFT policy and the reward model
    (recorded as finished stages with their identities, the reward stage with held-out figures), then 2 PPO
    steps in-process with a policy snapshot every step."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from pipeline.config.loading import load_config
    from pipeline.run.manifests import write_manifest
    from pipeline.run.stage_graph import stage_identity
    from pipeline.train.models import save_hf_model
    from reward_model.model import load_reward_model
    from stages.ppo import run_ppo
    from tests.helpers import SMOKE

    root = tmp_path_factory.mktemp("compare")
    shutil.copytree(smoke_pretrained / "smoke", root / "smoke")
    config = load_config(SMOKE, [f"run.output_dir={root}", "run.stages=[ppo]", "ppo.max_steps=2",
                                 "ppo.policy_snapshot_steps=1", "ppo.per_device_train_batch_size=4",
                                 "ppo.gradient_accumulation_steps=1", "ppo.num_ppo_epochs=1", "ppo.response_length=8",
                                 "ppo.save_steps=2", "ppo.learning_rate=1e-3"])
    bins = [{"low": b / 4, "high": (b + 1) / 4, "count": 3, "mean_predicted": b / 4 + 0.1, "observed": b / 4 + 0.05}
            for b in range(4)]
    pretrained = root / "smoke" / "pretrain" / "final"
    shutil.copytree(pretrained, root / "smoke" / "sft" / "final")
    torch.manual_seed(0)
    reward_model, tokenizer = load_reward_model(pretrained)  # its scalar head saved once: every load scores alike
    save_hf_model(reward_model, tokenizer, root / "smoke" / "reward" / "final")
    for stage in ("sft", "reward"):
        metrics = {"eval_accuracy": 0.7, "eval_pairs": 12, "eval_gold_accuracy": 0.8, "eval_calibration_error": 0.05,
                   "eval_calibration": bins, "eval_gold_calibration": bins[1:]} if stage == "reward" else {}
        write_manifest(root / "smoke" / stage, stage=stage, status="finished", metrics=metrics,
                       **stage_identity(config, stage))
    run_ppo(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    return root / "smoke"


def test_ppo_writes_policy_snapshots_that_load_as_plain_models(ppo_run_with_snapshots):
    from data.tokenizer import load_tokenizer
    from pipeline.run.checkpoints import policy_snapshots
    from pipeline.train.models import load_causal_lm

    ppo_dir = ppo_run_with_snapshots / "ppo"
    assert [step for step, _ in policy_snapshots(ppo_dir)] == [1]  # step 2 is the final policy
    snapshot = ppo_dir / "policy-step-1"
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "tokenizer.json").is_file()
    assert load_causal_lm(snapshot, load_tokenizer(snapshot)).config.num_hidden_layers == 2
    assert json.loads((ppo_dir / "manifest.json").read_text())["config"]["ppo"]["policy_snapshot_steps"] == 1


def test_compare_with_best_of_n_and_snapshots_end_to_end(ppo_run_with_snapshots, capsys):
    from pipeline.cli.main import main
    from pipeline.evaluation.compare import compare_run

    run_dir = ppo_run_with_snapshots
    plain = compare_run(run_dir, prompts=6, samples_per_prompt=2, best_of=(), snapshot_samples_per_prompt=0)
    full = compare_run(run_dir, prompts=6, samples_per_prompt=2, best_of=(2, 4), snapshot_samples_per_prompt=1)
    # The SFT-vs-PPO figures do not move: the pool's further samples come with another seed.
    assert full.means == plain.means and full.win_rates["gold"] == plain.win_rates["gold"]
    main_samples = [s for s in full.samples if s.policy in ("sft", "ppo")]
    assert main_samples == plain.samples
    assert sum(s.policy == POOL for s in full.samples) == 6 * 2
    assert sum(s.policy == "ppo-step-1" for s in full.samples) == 6
    assert not plain.best_of_n and [p["step"] for p in plain.over_optimisation] == [0, 2]

    pools = pools_by_prompt(full.samples, 6)
    argmax = [max(pool, key=lambda s: s.reward) for pool in pools]
    assert full.best_of_n["4"]["per_prompt"]["gold"] == [s.gold for s in argmax]
    assert set(full.best_of_n) == {"1", "2", "4"} and full.settings["best_of_pool_size"] == 4
    assert {"gold_vs_best_of_2", "gold_vs_best_of_4", "reward_vs_best_of_4"} <= set(full.win_rates)
    steps = [p["step"] for p in full.over_optimisation if p["method"] == "ppo"]
    assert steps == [0, 1, 2] and full.over_optimisation[1]["samples_per_prompt"] == 1
    assert [p["n"] for p in full.over_optimisation if p["method"] == "best_of_n"] == [1, 2, 4]
    assert full.reward_model["eval_accuracy"] == 0.7 and len(full.reward_model["eval_calibration"]) == 4
    assert sum(f["prompts"] for f in full.by_family.values()) == 6

    report = run_dir / "report"
    data = json.loads((report / "report.json").read_text())
    assert data["best_of_n"]["4"]["per_prompt"]["gold"] == full.best_of_n["4"]["per_prompt"]["gold"]
    assert len(data["over_optimisation"]) == 6 and data["reward_model"]["eval_gold_accuracy"] == 0.8
    assert data["settings"]["engines"]["ppo"] == {"engine": "single", "processes": 1, "mixed_precision": "no"}
    page = (report / "index.html").read_text()
    for section in ('id="best-of-n"', 'id="over-optimisation-chart"', 'id="reward-model"', 'id="by-family"'):
        assert section in page
    assert "best-of-4 draws 4 and scores each with the reward model" in page
    summary = (report / "summary.md").read_text()
    assert "## PPO vs best-of-N from the SFT policy" in summary and "best-of-4" in capsys.readouterr().out

    assert main(["compare", str(run_dir), "--prompts", "3", "--samples-per-prompt", "1", "--best-of",
                 "--snapshot-samples-per-prompt", "0"]) == 0
    data = json.loads((report / "report.json").read_text())
    assert data["best_of_n"] == {} and data["settings"]["samples_per_prompt"] == 1
    assert main(["compare", str(run_dir), "--best-of", "-4"]) == 2
    assert "--best-of takes sample counts of at least 1" in capsys.readouterr().err
