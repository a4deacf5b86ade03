"""`rlhf compare`: what RLHF changed. Sample the SFT and PPO policies on the same held-out prompts with the same
seeds, score every sample with the reward model (and the gold judge on the built-in task), and measure each
PPO sample's KL to the SFT policy. The report (pipeline/report.py) shows it to a person at a glance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.formats import prompt_token_ids, prompts_from_rows
from data.gold_judge import gold_score
from data.loading import load_source, read_rows
from data.tokenizer import load_tokenizer
from pipeline.checkpoints import read_manifest
from pipeline.config import ConfigError, DatasetSource
from pipeline.models import load_causal_lm
from pipeline.rollout import reward_scores, sample_token_ids, sampling_config, sequence_logprobs
from pipeline.stage_graph import compared_checkpoints
from reward_model import RewardNormalization, load_reward_model, require_same_vocabulary

POLICIES = ("pretrain", "sft", "ppo")


@dataclass
class Sample:
    prompt_index: int
    policy: str
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

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "samples": [asdict(s) for s in self.samples], "win_rates": self.win_rates,
                "means": self.means, "settings": self.settings}


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


def policy_samples(models: dict[str, Any], tokenizer, reward_model, normalization: RewardNormalization,
                   texts: list[str], samples_per_prompt: int, temperature: float, max_new_tokens: int, seed: int,
                   builtin: bool) -> list[Sample]:
    """Every policy's samples, scored as PPO scores its rollouts (the token ids as sampled, EOS only where the
    policy produced it), with each non-SFT sample's log-likelihood ratio to the SFT policy: a KL estimate."""
    prompt_ids = [prompt_token_ids(tokenizer, text) for text in texts]
    pad = tokenizer.pad_token_id
    samples: list[Sample] = []
    for name, model in models.items():
        drawn = sample_policy(model, tokenizer, prompt_ids, samples_per_prompt, temperature, max_new_tokens, seed,
                              description=f"[compare] sampling {name}")
        prompts, responses = [prompt_ids[i] for i, _ in drawn], [ids for _, ids in drawn]
        rewards = normalization.apply(reward_scores(reward_model, prompts, responses, pad,
                                                    description=f"[compare] scoring {name}")).tolist()
        kls: list[float | None] = [None] * len(drawn)
        if name != "sft":
            own = sequence_logprobs(model, prompts, responses, temperature, pad,
                                    description=f"[compare] log-likelihoods of {name} samples under {name}")
            sft = sequence_logprobs(models["sft"], prompts, responses, temperature, pad,
                                    description=f"[compare] log-likelihoods of {name} samples under sft")
            kls = [a - b for a, b in zip(own, sft)]
        texts_out = tokenizer.batch_decode(responses, skip_special_tokens=True)
        for (index, ids), response, reward, kl in zip(drawn, texts_out, rewards, kls):
            gold = gold_score(texts[index], response) if builtin else None
            samples.append(Sample(index, name, response, reward, gold, kl, len(ids)))
    return samples


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


def compare_run(run_dir: Path, prompts: int | None = None, samples_per_prompt: int = 4, include_pretrained: bool = False,
                seed: int = 1234) -> Comparison:
    """Sample, score and compare the run's policies; write RUN_DIR/report/ and print a short table."""
    run_dir = Path(run_dir)
    checkpoints = compared_checkpoints(run_dir)
    ppo_config = read_manifest(run_dir / "ppo")["config"]
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

    samples = policy_samples(models, tokenizer, reward_model, normalization, texts, samples_per_prompt, temperature,
                             max_new_tokens, seed, builtin)

    comparison = Comparison(texts, samples, settings={
        "samples_per_prompt": samples_per_prompt, "temperature": temperature, "max_new_tokens": max_new_tokens,
        "seed": seed, "builtin_task": builtin, "policies": {k: str(v) for k, v in policies.items()},
        "checkpoints": {k: v for k, v in checkpoints.items() if k in policies or k == "reward"}})
    for name in models:
        mine = [s for s in samples if s.policy == name]
        comparison.means[name] = {
            "reward": mean(s.reward for s in mine), "length": mean(s.length for s in mine),
            **({"gold": mean(s.gold for s in mine)} if builtin else {}),
            **({"kl_to_sft": mean(s.kl_to_sft for s in mine)} if name != "sft" else {})}
    for metric in ("reward", "gold") if builtin else ("reward",):
        per_prompt = {name: [mean(getattr(s, metric) for s in samples if s.policy == name and s.prompt_index == i)
                             for i in range(len(texts))] for name in models}
        comparison.win_rates[metric] = win_rate(per_prompt["ppo"], per_prompt["sft"])

    from pipeline.report import print_summary, write_report

    write_report(run_dir, comparison)
    print_summary(comparison)
    return comparison


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
