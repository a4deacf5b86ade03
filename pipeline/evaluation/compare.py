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

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.builtin_task import TASK_FAMILIES, prompt_family
from data.formats import prompt_token_ids, prompts_from_rows
from data.gold_judge import gold_score
from data.loading import load_source, read_rows
from data.tokenizer import load_tokenizer
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import DatasetSource
from pipeline.evaluation.best_of_n import best_of_n_kl, expected_best_of_n
from pipeline.generation.sampling import sample_token_ids, sampling_config
from pipeline.generation.scoring import sequence_logprobs
from pipeline.run.checkpoints import policy_snapshots
from pipeline.run.manifests import read_manifest
from pipeline.run.stage_graph import compared_checkpoints
from pipeline.train.models import load_causal_lm
from reward_model.model import load_reward_model, require_same_vocabulary, reward_scores
from reward_model.normalization import RewardNormalization

POLICIES = ("pretrain", "sft", "ppo")


POOL = "sft-pool"  # the further SFT samples of the best-of-N pool


BEST_OF = (4, 16)


SNAPSHOT_SAMPLES_PER_PROMPT = 2


LOSSES_SHOWN = 3  # prompts per task family where PPO loses to SFT, side by side


# The reward stage's held-out figures (stages/reward.py held_out_accuracy) the report shows.
REWARD_MODEL_METRICS = ("eval_accuracy", "eval_pairs", "eval_calibration_error", "eval_calibration",
                        "eval_gold_accuracy", "eval_gold_pairs", "annotator_gold_agreement",
                        "eval_gold_calibration_error", "eval_gold_calibration")


@dataclass
class Sample:
    prompt_index: int
    policy: str  # a policy of POLICIES, POOL, or "ppo-step-<N>" (an intermediate PPO policy)
    response: str
    reward: float
    gold: float | None
    kl_to_sft: float | None
    length: int


@dataclass
class Comparison:
    prompts: list[str]
    samples: list[Sample]
    win_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    best_of_n: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(N) → see best_of_n_table
    over_optimisation: list[dict[str, Any]] = field(default_factory=list)  # see over_optimisation_points
    reward_model: dict[str, Any] = field(default_factory=dict)  # the reward stage's held-out figures
    by_family: dict[str, dict[str, Any]] = field(default_factory=dict)  # see family_figures

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "samples": [asdict(s) for s in self.samples], "win_rates": self.win_rates,
                "means": self.means, "settings": self.settings, "best_of_n": self.best_of_n,
                "over_optimisation": self.over_optimisation, "reward_model": self.reward_model,
                "by_family": self.by_family}


def evaluation_prompts(run_dir: Path, ppo_config: dict[str, Any]) -> tuple[list[str], bool]:
    """Held-out prompts (user message texts) and whether they come from the built-in task."""
    source = ppo_config.get("data.ppo")
    if source is None:
        path = run_dir / "data" / "eval_prompts.jsonl"
        conversations = prompts_from_rows(read_rows(path), str(path), "error")
        return [c[-1]["content"] for c in conversations], True
    _, held_out = load_source(DatasetSource(**source), "data.ppo", ppo_config.get("run.seed", 0))
    conversations = prompts_from_rows(held_out, f"data.ppo ({source['path']}) held-out", "skip")
    return [c[-1]["content"] for c in conversations], False


@torch.no_grad()
def sample_policy(model, tokenizer, prompt_ids: list[list[int]], samples_per_prompt: int, temperature: float,
                  max_new_tokens: int, seed: int, batch_size: int = 64, description: str | None = None
                  ) -> list[tuple[int, list[int]]]:
    """(prompt index, response token ids) for every sample, drawn as PPO draws its rollouts; the same seed for
    every policy."""
    torch.manual_seed(seed)
    jobs = [i for i in range(len(prompt_ids)) for _ in range(samples_per_prompt)]
    config = sampling_config(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature)
    responses = sample_token_ids(model, [prompt_ids[i] for i in jobs], config, batch_size, description)
    return list(zip(jobs, responses))


@dataclass
class HeldOutScoring:
    """What every policy is sampled and scored with: the held-out prompts, PPO's sampling settings, the reward
    model with its normalisation, and the SFT policy that KL is measured against."""

    tokenizer: Any
    reward_model: Any
    normalization: RewardNormalization
    sft_model: Any
    texts: list[str]
    temperature: float
    max_new_tokens: int
    builtin: bool

    def __post_init__(self):
        self.prompt_ids = [prompt_token_ids(self.tokenizer, text) for text in self.texts]

    def samples(self, name: str, model, samples_per_prompt: int, seed: int) -> list[Sample]:
        """One policy's samples, scored as PPO scores its rollouts (the token ids as sampled, EOS only where the
        policy produced it), with each sample's log-likelihood ratio to the SFT policy, a KL estimate, unless
        `model` is the SFT policy."""
        pad = self.tokenizer.pad_token_id
        drawn = sample_policy(model, self.tokenizer, self.prompt_ids, samples_per_prompt, self.temperature,
                              self.max_new_tokens, seed, description=f"[compare] sampling {name}")
        prompts, responses = [self.prompt_ids[i] for i, _ in drawn], [ids for _, ids in drawn]
        rewards = self.normalization.apply(reward_scores(self.reward_model, prompts, responses, pad,
                                                         description=f"[compare] scoring {name}")).tolist()
        kls: list[float | None] = [None] * len(drawn)
        if model is not self.sft_model:
            own = sequence_logprobs(model, prompts, responses, self.temperature, pad,
                                    description=f"[compare] log-likelihoods of {name} samples under {name}")
            sft = sequence_logprobs(self.sft_model, prompts, responses, self.temperature, pad,
                                    description=f"[compare] log-likelihoods of {name} samples under sft")
            kls = [a - b for a, b in zip(own, sft)]
        texts_out = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return [Sample(index, name, response, reward, gold_score(self.texts[index], response) if self.builtin else None,
                       kl, len(ids))
                for (index, ids), response, reward, kl in zip(drawn, texts_out, rewards, kls)]


def win_rate(first: list[float], second: list[float]) -> dict[str, float]:
    """Share of prompts where `first` beats `second` (ties count half), with a 95% Wilson interval."""
    n = len(first)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(first, second))
    p = wins / n if n else float("nan")
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n) if n else float("nan")
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n) if n else float("nan")
    ties = sum(a == b for a, b in zip(first, second))
    return {"win_rate": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "prompts": n, "ties": ties}


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


def best_of_sizes(best_of) -> tuple[int, ...]:
    """The best-of-N sizes asked for, ascending: none, or 0 alone, turns the baselines off."""
    sizes = sorted(set(int(n) for n in best_of or ()) - {0})
    if any(n < 1 for n in sizes):
        raise ConfigError(f"rlhf compare: --best-of takes sample counts of at least 1 (0 alone: off), got "
                          f"{' '.join(str(n) for n in best_of)}")
    return tuple(sizes)


def curve_sizes(best_of: tuple[int, ...], pool_size: int) -> list[int]:
    """The best-of-N sizes to estimate: those asked for, and the powers of two up to the pool size for the
    over-optimisation curve."""
    powers = [2 ** k for k in range(pool_size.bit_length()) if 2 ** k <= pool_size]
    return sorted(set(powers) | set(best_of))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def policy_means(samples: list[Sample], policy: str, builtin: bool) -> dict[str, float]:
    """Mean reward (normalised), length, gold score (built-in task) and KL to SFT (non-SFT) of a policy's samples."""
    mine = [s for s in samples if s.policy == policy]
    means = {"reward": mean(s.reward for s in mine), "length": mean(s.length for s in mine)}
    if builtin:
        means["gold"] = mean(s.gold for s in mine)
    if mine and mine[0].kl_to_sft is not None:
        means["kl_to_sft"] = mean(s.kl_to_sft for s in mine)
    return means


def per_prompt_means(samples: list[Sample], policy: str, metric: str, prompts: int) -> list[float]:
    """A policy's mean `metric` ("reward", "gold") over its samples of each prompt, in prompt order."""
    totals, counts = [0.0] * prompts, [0] * prompts
    for s in samples:
        if s.policy == policy:
            totals[s.prompt_index] += getattr(s, metric)
            counts[s.prompt_index] += 1
    return [total / count if count else float("nan") for total, count in zip(totals, counts)]


def pools_by_prompt(samples: list[Sample], prompts: int) -> list[list[Sample]]:
    """Each prompt's best-of-N pool: its SFT samples, then its POOL samples, in the order drawn."""
    pools: list[list[Sample]] = [[] for _ in range(prompts)]
    for policy in ("sft", POOL):
        for s in samples:
            if s.policy == policy:
                pools[s.prompt_index].append(s)
    return pools


def best_of_n_table(pools: list[list[Sample]], sizes: list[int], builtin: bool) -> dict[str, dict[str, Any]]:
    """For each N: best-of-N's expected reward-model score (normalised) and gold score per prompt (the pool's
    unbiased estimate, pipeline/evaluation/best_of_n.py), their means over prompts, and its analytic KL to SFT."""
    table = {}
    for n in sizes:
        per_prompt = {"reward": [expected_best_of_n([s.reward for s in pool], [s.reward for s in pool], n)
                                 for pool in pools]}
        if builtin:
            per_prompt["gold"] = [expected_best_of_n([s.reward for s in pool], [s.gold for s in pool], n)
                                  for pool in pools]
        table[str(n)] = {"n": n, "pool_size": min(len(pool) for pool in pools), "kl_to_sft": best_of_n_kl(n),
                         **{metric: mean(values) for metric, values in per_prompt.items()}, "per_prompt": per_prompt}
    return table


def over_optimisation_points(means: dict[str, dict[str, float]], snapshot_means: dict[int, dict[str, float]],
                             final_step: int, best_of_n: dict[str, dict[str, Any]], samples_per_prompt: int,
                             snapshot_samples_per_prompt: int) -> list[dict[str, Any]]:
    """Gold and proxy (normalised reward-model) score against KL to SFT: PPO from step 0 (the SFT policy itself)
    through its snapshots to its final policy, and best-of-N at its analytic KL. Without a gold judge the points
    carry the proxy only."""
    def point(method: str, kl: float, scores: dict[str, Any], **where: Any) -> dict[str, Any]:
        return {"method": method, **where, "kl_to_sft": kl, "proxy": scores["reward"], "gold": scores.get("gold")}

    points = [point("ppo", 0.0, means["sft"], step=0, samples_per_prompt=samples_per_prompt)]
    points += [point("ppo", m["kl_to_sft"], m, step=step, samples_per_prompt=snapshot_samples_per_prompt)
               for step, m in sorted(snapshot_means.items())]
    points.append(point("ppo", means["ppo"]["kl_to_sft"], means["ppo"], step=final_step,
                        samples_per_prompt=samples_per_prompt))
    points += [point("best_of_n", row["kl_to_sft"], row, n=row["n"], pool_size=row["pool_size"])
               for row in sorted(best_of_n.values(), key=lambda row: row["n"])]
    return points


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


def family_figures(comparison: Comparison, shown: int = LOSSES_SHOWN) -> dict[str, dict[str, Any]]:
    """Per task family of the built-in task: PPO's gold win rate over SFT and over each best-of-N, and the
    `shown` prompts where PPO loses to SFT on gold by the most, each with PPO's lowest-gold sample beside SFT's
    highest-gold one."""
    prompts = len(comparison.prompts)
    ppo = per_prompt_means(comparison.samples, "ppo", "gold", prompts)
    sft = per_prompt_means(comparison.samples, "sft", "gold", prompts)
    families = [prompt_family(text) for text in comparison.prompts]
    figures = {}
    for family in TASK_FAMILIES:
        members = [i for i in range(prompts) if families[i] == family]
        if not members:
            continue
        rates = {"gold_vs_sft": win_rate([ppo[i] for i in members], [sft[i] for i in members])}
        for key, row in comparison.best_of_n.items():
            if int(key) in comparison.settings.get("best_of", ()):
                rates[f"gold_vs_best_of_{key}"] = win_rate([ppo[i] for i in members],
                                                           [row["per_prompt"]["gold"][i] for i in members])
        losing = sorted((i for i in members if ppo[i] < sft[i]), key=lambda i: ppo[i] - sft[i])[:shown]
        losses = []
        for i in losing:
            worst = min((s for s in comparison.samples if s.policy == "ppo" and s.prompt_index == i),
                        key=lambda s: s.gold)
            best = max((s for s in comparison.samples if s.policy == "sft" and s.prompt_index == i),
                       key=lambda s: s.gold)
            losses.append({"prompt_index": i, "prompt": comparison.prompts[i], "ppo_mean_gold": ppo[i],
                           "sft_mean_gold": sft[i], "ppo_response": worst.response, "ppo_gold": worst.gold,
                           "sft_response": best.response, "sft_gold": best.gold})
        figures[family] = {"prompts": len(members), "ppo_mean_gold": mean(ppo[i] for i in members),
                           "sft_mean_gold": mean(sft[i] for i in members), "win_rates": rates,
                           "losses_to_sft": sum(ppo[i] < sft[i] for i in members), "losses": losses}
    return figures
