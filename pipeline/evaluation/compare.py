"""`rlhf compare`: what RLHF changed. Sample the SFT and PPO policies on the same held-out prompts with the same
seeds, score every sample with the reward model (and the gold judge on the built-in task), and measure each
PPO sample's KL to the SFT policy. The report (pipeline/evaluation/report.py) shows it to a person at a glance.

Beside the two policies, what a reader of the RLHF literature expects to see:
- best-of-N from the SFT policy on the same prompts and judge (pipeline/evaluation/best_of_n.py), from a pool of SFT
  samples per prompt: compare's own SFT samples plus more drawn with another seed, so the SFT-vs-PPO figures
  are the ones compare gives without it;
- the over-optimisation curve (Gao et al. 2022): gold and proxy (normalised reward-model) score against KL to
  the SFT policy, for PPO's intermediate policies (ppo/policy-step-<N>/, ppo.policy_snapshot_steps) and for
  best-of-N;
- the reward model's held-out accuracy and calibration, as its stage recorded them;
- on the built-in task, the win rates per task family and the prompts where PPO still loses to SFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.tokenizer import load_tokenizer
from pipeline.config.parsing import ConfigError
from pipeline.evaluation.figures import (
    best_of_n_table, best_of_sizes, curve_sizes, family_figures, over_optimisation_points, per_prompt_means,
    policy_means, pools_by_prompt, win_rate)
from pipeline.evaluation.samples import POOL, Comparison, HeldOutScoring, evaluation_prompts
from pipeline.run.checkpoints import policy_snapshots
from pipeline.run.manifests import read_manifest
from pipeline.run.stage_graph import compared_checkpoints
from pipeline.train.models import load_causal_lm
from reward_model.model import load_reward_model, require_same_vocabulary
from reward_model.normalization import RewardNormalization

POLICIES = ("pretrain", "sft", "ppo")
BEST_OF = (4, 16)
SNAPSHOT_SAMPLES_PER_PROMPT = 2


# The reward stage's held-out figures (stages/reward.py held_out_accuracy) the report shows.
REWARD_MODEL_METRICS = ("eval_accuracy", "eval_pairs", "eval_calibration_error", "eval_calibration",
                        "eval_gold_accuracy", "eval_gold_pairs", "annotator_gold_agreement",
                        "eval_gold_calibration_error", "eval_gold_calibration", "eval_gold_accuracy_by_kind")


def compare_run(run_dir: Path, prompts: int | None = None, samples_per_prompt: int = 4,
                include_pretrained: bool = False, seed: int = 1234, best_of: tuple[int, ...] | list[int] = BEST_OF,
                snapshot_samples_per_prompt: int = SNAPSHOT_SAMPLES_PER_PROMPT) -> Comparison:
    """Sample, score and compare the run's policies, with best-of-N baselines from a pool of max(`best_of`) SFT
    samples per prompt (none: no baselines) and the over-optimisation curve over PPO's policy snapshots
    (`snapshot_samples_per_prompt` samples per prompt each; 0: none); write RUN_DIR/report/ and print a table."""
    run_dir = Path(run_dir)
    best_of = best_of_sizes(best_of)
    if samples_per_prompt < 1 or snapshot_samples_per_prompt < 0:
        raise ConfigError(f"rlhf compare: --samples-per-prompt must be positive and --snapshot-samples-per-prompt "
                          f"not negative, got {samples_per_prompt} and {snapshot_samples_per_prompt}")
    checkpoints = compared_checkpoints(run_dir)
    ppo_manifest = read_manifest(run_dir / "ppo")
    ppo_config = ppo_manifest["config"]
    temperature, max_new_tokens = ppo_config["ppo"]["temperature"], ppo_config["ppo"]["response_length"]
    texts, builtin = evaluation_prompts(run_dir, ppo_config)
    texts = texts[:prompts] if prompts else texts
    if not texts:
        raise ConfigError(f"{run_dir}: no held-out prompts to compare on")

    if include_pretrained and "pretrain" not in checkpoints:
        raise ConfigError(f"{run_dir}: --include-pretrained, but there is no pretrain/final in this run")
    policies = {name: Path(checkpoints[name]["path"]) for name in POLICIES if name != "pretrain" or include_pretrained}
    reward_dir = Path(checkpoints["reward"]["path"])
    reward_model, reward_tokenizer = load_reward_model(str(reward_dir))
    normalization = RewardNormalization.load(reward_dir)
    tokenizer = load_tokenizer(policies["sft"])
    require_same_vocabulary(tokenizer, reward_tokenizer, str(run_dir))
    models = {name: load_causal_lm(path, tokenizer).eval() for name, path in policies.items()}
    scoring = HeldOutScoring(tokenizer, reward_model, normalization, models["sft"], texts, temperature,
                             max_new_tokens, builtin)

    samples = [s for name, model in models.items() for s in scoring.samples(name, model, samples_per_prompt, seed)]
    metrics = ("reward", "gold") if builtin else ("reward",)
    comparison = Comparison(texts, samples, settings={
        "samples_per_prompt": samples_per_prompt, "temperature": temperature, "max_new_tokens": max_new_tokens,
        "seed": seed, "builtin_task": builtin, "policies": {k: str(v) for k, v in policies.items()},
        "checkpoints": {k: v for k, v in checkpoints.items() if k in policies or k == "reward"},
        "engines": stage_engines(run_dir)})
    for name in models:
        comparison.means[name] = policy_means(samples, name, builtin)
    for metric in metrics:
        comparison.win_rates[metric] = win_rate(per_prompt_means(samples, "ppo", metric, len(texts)),
                                                per_prompt_means(samples, "sft", metric, len(texts)))

    if best_of:
        add_best_of_n(comparison, scoring, best_of, seed + 1)
    final_step = ppo_manifest.get("steps") or ppo_config["ppo"]["max_steps"]
    snapshots = [(step, path) for step, path in policy_snapshots(run_dir / "ppo") if step < final_step]
    snapshot_means = {}
    if snapshot_samples_per_prompt and snapshots:
        snapshot_means = add_snapshot_samples(comparison, scoring, snapshots, snapshot_samples_per_prompt, seed)
    comparison.over_optimisation = over_optimisation_points(comparison.means, snapshot_means, final_step,
                                                            comparison.best_of_n, samples_per_prompt,
                                                            snapshot_samples_per_prompt)
    comparison.reward_model = reward_model_figures(read_manifest(run_dir / "reward"))
    if builtin:
        comparison.by_family = family_figures(comparison)

    from pipeline.evaluation.report import print_summary, write_report

    write_report(run_dir, comparison)
    print_summary(comparison)
    return comparison


def add_best_of_n(comparison: Comparison, scoring: HeldOutScoring, best_of: tuple[int, ...], pool_seed: int) -> None:
    """Best-of-N from a pool of max(`best_of`) SFT samples per prompt: compare's own SFT samples first, then the
    rest drawn with `pool_seed` (so the SFT-vs-PPO figures are those without it), added as POOL samples; its
    table (with the powers of two for the over-optimisation curve) and PPO's win rates against each N asked for."""
    prompts = len(comparison.prompts)
    own = comparison.settings["samples_per_prompt"]
    pool_size = max(max(best_of), own)
    if pool_size > own:
        comparison.samples += scoring.samples(POOL, scoring.sft_model, pool_size - own, pool_seed)
    metrics = ("reward", "gold") if scoring.builtin else ("reward",)
    comparison.best_of_n = best_of_n_table(pools_by_prompt(comparison.samples, prompts),
                                           curve_sizes(best_of, pool_size), scoring.builtin)
    comparison.settings.update(best_of=list(best_of), best_of_pool_size=pool_size, best_of_pool_seed=pool_seed)
    for n in best_of:
        for metric in metrics:
            comparison.win_rates[f"{metric}_vs_best_of_{n}"] = win_rate(
                per_prompt_means(comparison.samples, "ppo", metric, prompts),
                comparison.best_of_n[str(n)]["per_prompt"][metric])


def add_snapshot_samples(comparison: Comparison, scoring: HeldOutScoring, snapshots: list[tuple[int, Path]],
                         samples_per_prompt: int, seed: int) -> dict[int, dict[str, float]]:
    """Sample and score each PPO policy snapshot (as "ppo-step-<N>", with the policies' seed); their means by step."""
    means = {}
    for step, path in snapshots:
        name = f"ppo-step-{step}"
        snapshot = load_causal_lm(path, scoring.tokenizer).eval()
        comparison.samples += scoring.samples(name, snapshot, samples_per_prompt, seed)
        means[step] = policy_means(comparison.samples, name, scoring.builtin)
    comparison.settings["snapshot_samples_per_prompt"] = samples_per_prompt
    return means


def stage_engines(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What each finished stage of the run trained on (engine, processes, mixed precision), from its manifest."""
    from pipeline.config.schema import STAGES

    manifests = {stage: read_manifest(run_dir / stage) or {} for stage in STAGES}
    return {stage: manifest["engine"] for stage, manifest in manifests.items() if manifest.get("engine")}


def reward_model_figures(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The reward stage's held-out accuracy against the annotator and the gold judge, and its calibration (bins
    of predicted preference probability against observed frequency, and the expected calibration error), from
    its manifest's metrics; {} when it recorded none."""
    metrics = (manifest or {}).get("metrics") or {}
    return {key: metrics[key] for key in REWARD_MODEL_METRICS if metrics.get(key) is not None}
