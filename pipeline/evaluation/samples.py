"""Held-out samples and the comparison they make up: the prompts, each policy's samples drawn and scored as PPO
scores its rollouts (reward model, gold judge, KL to the SFT policy), and the record the report is written from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
import torch
from data.formats import prompt_token_ids, prompts_from_rows
from data.gold_judge import gold_score
from data.loading import load_source, read_rows
from pipeline.config.schema import DatasetSource
from pipeline.generation.sampling import sample_token_ids, sampling_config
from pipeline.generation.scoring import sequence_logprobs
from reward_model.model import reward_scores
from reward_model.normalization import RewardNormalization


POOL = "sft-pool"  # the further SFT samples of the best-of-N pool


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
