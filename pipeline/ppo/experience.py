"""PPO's experience: sample responses to a batch of prompts from the policy (the rollout), then score them with
the policy, the reference, the critic and the reward model, and turn the scores into per-token rewards and
whitened GAE advantages (the experience the updates of stages/ppo.py train on). The forwards live in
pipeline/ppo/models.py, the math in pipeline/rl/, the sampling loop in pipeline/generation/sampling.py."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from accelerate import Accelerator

from pipeline.config.schema import PPOSection
from pipeline.generation.sampling import sample_batch, sampling_config
from pipeline.ppo.models import PolicyAndValue, RewardScorer, scoring_forwards
from pipeline.rl.advantages import gae_advantages, per_token_rewards
from pipeline.rl.kl import kl_per_token
from pipeline.rl.masked import masked_sum, masked_mean, masked_whiten, response_mask
from pipeline.ppo.models import policy_for_generation


@dataclass
class Experience:
    sequences: torch.Tensor  # prompt + response ids [B, Lq + T]
    attention_mask: torch.Tensor
    mask: torch.Tensor  # valid response tokens [B, T]
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class Rollout:
    queries: torch.Tensor  # left-padded prompts [B, Lq]
    query_mask: torch.Tensor
    responses: torch.Tensor  # [B, T], padding after the first EOS
    mask: torch.Tensor  # valid response tokens, the EOS included
    last_index: torch.Tensor  # where each response's score goes
    contains_eos: torch.Tensor


@torch.no_grad()
def generate_rollout(model: PolicyAndValue, tokenizer, queries, query_mask, settings: PPOSection,
                     accelerator: Accelerator) -> Rollout:
    """Sample responses from the policy of the prepared PolicyAndValue with the KV cache, its weights gathered
    where the engine shards them; cut each at its first EOS."""
    # One autocast context around all decoding steps: the policy's bf16 weights are cast once, not once a token.
    with policy_for_generation(model, accelerator) as generator, accelerator.autocast():
        try:
            responses = sample_responses(generator, queries, query_mask, settings, tokenizer)
        except RuntimeError as error:
            if "inf" not in str(error) and "nan" not in str(error):
                raise
            raise FloatingPointError("ppo: the policy's probabilities became NaN/inf; the last good checkpoint is "
                                     "kept (lower ppo.learning_rate and resume)") from None
    mask, last_index, contains_eos = response_mask(responses, tokenizer.eos_token_id)
    return Rollout(queries, query_mask, responses, mask, last_index, contains_eos)


@torch.no_grad()
def score_rollout(rollout: Rollout, model: PolicyAndValue, reference, reward_scorer: RewardScorer, normalization,
                  kl_value: float, settings: PPOSection, accelerator: Accelerator
                  ) -> tuple[Experience, dict[str, torch.Tensor]]:
    """The experience of a rollout: old logprobs, reference logprobs, values and scores from the models
    (`scoring_forwards`: the training code path, in equal chunks on every process), then per-token rewards and
    whitened GAE advantages. `reference` is None for a LoRA policy: the policy with its adapter off."""
    mask = rollout.mask
    sequences = torch.cat([rollout.queries, rollout.responses], dim=1)
    attention_mask = torch.cat([rollout.query_mask, mask.long()], dim=1)
    forwards = scoring_forwards(model, reference, reward_scorer, sequences, attention_mask, rollout.responses,
                                settings.temperature, settings.local_rollout_forward_batch_size, accelerator)
    logprobs, ref_logprobs, raw_scores = forwards.logprobs, forwards.reference_logprobs, forwards.raw_scores

    scores = normalization.apply(raw_scores) if settings.normalize_reward else raw_scores.clone()
    if settings.missing_eos_penalty is not None:
        scores[~rollout.contains_eos] -= settings.missing_eos_penalty
    kl = kl_per_token(logprobs, ref_logprobs, settings.kl_estimator)
    rewards, non_score_rewards = per_token_rewards(scores, kl, mask, rollout.last_index, kl_value)
    # One all-reduce sum over every process's rollouts, or none: ppo.advantage_whitening.
    over_processes = (partial(accelerator.reduce, reduction="sum")
                      if settings.advantage_whitening == "global" and accelerator.num_processes > 1 else None)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, sum_over_processes=over_processes)
    values = forwards.values.masked_fill(~mask, 0.0)
    advantages, returns = gae_advantages(rewards, values, mask, settings.gamma, settings.lam)
    advantages = masked_whiten(advantages, mask, sum_over_processes=over_processes)

    k1 = masked_sum(logprobs - ref_logprobs, mask, dim=1)
    k3 = masked_sum(kl_per_token(logprobs, ref_logprobs, "k3"), mask, dim=1)
    statistics = {
        "objective/scores": scores.mean(), "objective/raw_scores": raw_scores.mean(),
        "objective/kl": k1.mean(), "objective/kl_k3": k3.mean(),
        "objective/non_score_reward": non_score_rewards.sum(1).mean(),
        "objective/rlhf_reward": scores.mean() + non_score_rewards.sum(1).mean(),
        "objective/entropy": masked_mean(forwards.entropy, mask),
        "val/response_length": mask.sum(1).float().mean(), "val/eos_share": rollout.contains_eos.float().mean(),
    }
    return Experience(sequences, attention_mask, mask, logprobs, values, advantages, returns), statistics


def sample_responses(generator, queries, query_mask, settings: PPOSection, tokenizer) -> torch.Tensor:
    """Sample from π itself: temperature only, no top-k / top-p and none of the checkpoint's generation_config,
    so the PPO ratio and KL are unbiased. Each response is cut at its first EOS (padding after it); the loop
    derives its mask from the EOS (response_mask), as it does for every rollout."""
    config = sampling_config(settings.response_length, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             settings.temperature)
    return sample_batch(generator, queries, query_mask, config, settings.local_rollout_forward_batch_size)[0]
