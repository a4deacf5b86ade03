"""PPO's four models and the forwards through them: the policy (full or LoRA), its frozen reference, the critic
(a value head in the units of PPO's rewards) and the reward model behind one scoring module.

stages/ppo.py builds them from the SFT and reward checkpoints, bench/ppo_step.py from random weights; both set
them up for training with `prepare_ppo_models`, so that what the bench times is what the stage runs: policy and
critic as one prepared PolicyAndValue (pipeline/train/engines.py) with one AdamW, reference and reward model placed as
frozen models. The scoring forwards run in one autocast context and in equal chunks on every process; why, is
written beside them.
"""

from __future__ import annotations

from pipeline.train.engines import engine_of
from pipeline.train.sharding import fsdp2_unsharded

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
import torch
from accelerate import Accelerator

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification
from trl.trainer.utils import disable_dropout_in_model

from pipeline.config.schema import PipelineConfig, PPOSection
from pipeline.generation.padding import position_ids_of
from pipeline.generation.scoring import predicting_positions, response_logits
from pipeline.rl.logprobs import logprobs_and_entropy, logprobs_of_tokens
from pipeline.train.engines import configure_deepspeed
from pipeline.train.sharding import gathered_if_partitioned, place_frozen_model
from pipeline.train.models import weight_decay_groups, attention_for_precision, load_causal_lm, with_lora_adapter
from reward_model.model import score_token_ids
from reward_model.normalization import RewardNormalization


# ---------------------------------------------------------------- the models
class ValueModel(torch.nn.Module):
    """Per-token values from a sequence-classification model: its scalar head applied at every position, in the
    units of PPO's rewards. A critic read from the reward model gets the reward normalisation folded into its head
    (weight/σ, bias −μ/σ): raw scores would leak a constant offset into every advantage near the EOS."""

    def __init__(self, classifier: torch.nn.Module, normalization: RewardNormalization | None = None):
        super().__init__()
        classifier.score = head_in_reward_units(classifier.score, normalization or RewardNormalization())
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, position_ids):
        backbone = getattr(self.classifier, self.classifier.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.classifier.score(hidden).squeeze(-1).float()


def head_in_reward_units(head: torch.nn.Linear, normalization: RewardNormalization) -> torch.nn.Linear:
    """A scalar head with a bias whose output is normalization.apply(head(h)). The Llama classifier's head has no
    bias, and the critic needs one to carry −μ/σ; the bias trains with the rest (saved in every checkpoint)."""
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device,
                             dtype=head.weight.dtype)
    with torch.no_grad(), gathered_if_partitioned(list(head.parameters())):
        bias = head.bias if head.bias is not None else torch.zeros_like(biased.bias)
        biased.weight.copy_(head.weight / normalization.std)
        biased.bias.copy_((bias - normalization.mean) / normalization.std)
    return biased


class RewardScorer(torch.nn.Module):
    """The reward model as one module whose forward scores token ids (`score_token_ids`): under FSDP2 a model's
    weights are gathered by its own forward, not by calls into its backbone and head."""

    def __init__(self, reward_model: torch.nn.Module):
        super().__init__()
        self.reward_model = reward_model
        self.config = reward_model.config  # TRL's prepare_deepspeed sizes ZeRO-3 buckets from it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return score_token_ids(self.reward_model, input_ids, attention_mask)


# ---------------------------------------------------------------- building them from the stage's inputs
def build_policy(config: PipelineConfig, policy_path: str, tokenizer):
    """(policy, reference) from the SFT checkpoint; the reference is None for a LoRA policy."""
    policy = load_causal_lm(policy_path, tokenizer, config.model.trust_remote_code)
    if config.ppo.peft is not None:
        return with_lora_adapter(policy, config.ppo.peft), None  # the reference is the same model with the adapter disabled: no second copy
    reference = load_causal_lm(policy_path, tokenizer, config.model.trust_remote_code)
    return policy, reference


def build_critic(config: PipelineConfig, policy_path: str, reward_path: Path, tokenizer) -> ValueModel:
    """The critic, initialised from the reward model or from the policy (ppo.critic_init)."""
    from_reward = config.ppo.critic_init == "reward"
    classifier = AutoModelForSequenceClassification.from_pretrained(
        str(reward_path) if from_reward else policy_path, num_labels=1, use_safetensors=True, dtype=torch.float32,
        trust_remote_code=config.model.trust_remote_code)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    # A critic read from the reward model starts at the normalised score PPO is rewarded with.
    normalization = RewardNormalization.load(reward_path) if from_reward and config.ppo.normalize_reward else None
    return ValueModel(classifier, normalization)


def policy_context_length(policy_path: str, config: PipelineConfig) -> int:
    """The policy's context length, read from its config without loading weights."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=config.model.trust_remote_code)
    return getattr(model_config, "max_position_embeddings", None) or 2048


# ---------------------------------------------------------------- set up for training
def build_optimizer(model: PolicyAndValue, settings: PPOSection) -> torch.optim.AdamW:
    """One AdamW for policy and critic (the engines prepare one optimizer), eps 1e-5 (N+ details): the policy's
    parameters at ppo.learning_rate, the critic's at ppo.value_learning_rate (each group's `peak_lr`, scaled per
    step by the stage's `learning_rate_scale`), ppo.weight_decay on weight matrices only: biases and norm gains
    keep their scale, as TRL leaves them out of decay."""
    groups = []
    for part, peak in ((model.policy, settings.learning_rate), (model.value_model, settings.value_learning_rate)):
        groups += weight_decay_groups((p for p in part.parameters() if p.requires_grad), settings.weight_decay)
        for group in groups[-2:]:
            group.update(lr=peak, peak_lr=peak)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.learning_rate, eps=1e-5)


def prepare_ppo_models(policy: torch.nn.Module, reference: torch.nn.Module | None, critic: ValueModel,
                       reward_model: torch.nn.Module, settings: PPOSection, accelerator: Accelerator
                       ) -> tuple[PolicyAndValue, torch.optim.Optimizer, torch.nn.Module | None, RewardScorer]:
    """(prepared PolicyAndValue, its prepared optimizer, placed reference or None, placed RewardScorer): dropout
    off in every model (TRL's disable_dropout_in_model), CPU bf16 attention as plain matmuls, policy and critic
    prepared as one model with one optimizer, then the frozen models placed (after `prepare`, whose DeepSpeed
    config their placement copies)."""
    for model in (policy, reference, critic, reward_model):
        if model is not None:
            disable_dropout_in_model(model)
            attention_for_precision(model, accelerator.mixed_precision == "bf16", accelerator.device)
    model = PolicyAndValue(policy, critic)
    optimizer = build_optimizer(model, settings)
    configure_deepspeed(accelerator, settings.per_device_train_batch_size, settings.gradient_accumulation_steps,
                        settings.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    reward_scorer = place_frozen_model(RewardScorer(reward_model), accelerator)
    reference = place_frozen_model(reference, accelerator) if reference is not None else None
    return model, optimizer, reference, reward_scorer


# ---------------------------------------------------------------- forwards
def response_logits_and_values(model: PolicyAndValue, sequences, attention_mask, context_length: int,
                               values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_logits` of the policy and the values at the same positions (each response token's value is read at
    the token before it), from one forward through the prepared PolicyAndValue; `values=False` skips the critic."""
    logits, per_token_values = model(sequences, attention_mask, position_ids_of(attention_mask),
                                     logits_to_keep=predicting_positions(sequences, context_length), values=values)
    return logits, per_token_values[:, context_length - 1: -1] if values else None


@dataclass
class ScoringForwards:
    """What the four models say about a batch of rollouts, per response token [B, T] (scores per sequence [B])."""

    logprobs: torch.Tensor
    reference_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor  # the reward model's, float32, before normalisation or penalties
    entropy: torch.Tensor


@torch.no_grad()
def scoring_forwards(model: PolicyAndValue, reference, reward_scorer: RewardScorer, sequences: torch.Tensor,
                     attention_mask: torch.Tensor, responses: torch.Tensor, temperature: float, chunk: int,
                     accelerator: Accelerator) -> ScoringForwards:
    """Logprobs, reference logprobs, values, entropies and reward-model scores of prompt + response `sequences`,
    by no-grad forwards through the training code path (not `generate`'s scores, which differ under bf16
    autocast). `reference` is None for a LoRA policy: the policy with its adapter off. Every process runs the
    same number of forwards (chunks of `chunk` rollouts), as sharded engines need."""
    context_length = sequences.shape[1] - responses.shape[1]
    logprobs, ref_logprobs, values, scores, entropies = [], [], [], [], []
    for i in range(0, len(sequences), chunk):
        part, part_mask = sequences[i: i + chunk], attention_mask[i: i + chunk]
        part_responses = responses[i: i + chunk]
        # Under DDP `prepare` wraps the PolicyAndValue's forward in autocast, not the frozen models'; under FSDP2
        # nothing does (its mixed-precision policy casts the weights). Every forward runs in the same context, or
        # under bf16 the KL at step 0 measures precision, not policy (micro_batch_loss does the same).
        with accelerator.autocast():
            logits, part_values = response_logits_and_values(model, part, part_mask, context_length)
            if reference is None:
                with accelerator.unwrap_model(model).policy.disable_adapter():
                    ref_logits, _ = response_logits_and_values(model, part, part_mask, context_length, values=False)
            else:
                ref_logits = response_logits(reference, part, part_mask, context_length)
            scores.append(reward_scorer(part, part_mask))
        part_logprobs, part_entropy = logprobs_and_entropy(logits, part_responses, temperature)
        logprobs.append(part_logprobs)
        entropies.append(part_entropy)
        ref_logprobs.append(logprobs_of_tokens(ref_logits, part_responses, temperature))
        values.append(part_values)
    return ScoringForwards(torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values),
                           torch.cat(scores).float(), torch.cat(entropies))


# ---------------------------------------------------------------- PPO's trainable model
class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, so that `accelerator.prepare` sees one model and one optimizer.
    Its forward returns the policy's logits at `logits_to_keep` (the last N positions, 0 for all, or a 1-D tensor of
    positions, as transformers takes it) and the per-token values; `values=False` skips the value model (the LoRA
    reference forward). Under FSDP2 only a forward through this root gathers the weights the root holds, so PPO
    calls nothing else while training or scoring."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # accelerate sizes DeepSpeed's "auto" ZeRO buckets from model.config.hidden_size.
        self.config = policy.config
        # FSDP2's transformer auto-wrap shards each decoder layer on its own when the root names their classes.
        self._no_split_modules = sorted({name for module in (policy, value_model) for part in module.modules()
                                         for name in (getattr(part, "_no_split_modules", None) or [])})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int | torch.Tensor = 0, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=logits_to_keep).logits
        return logits, self.value_model(input_ids, attention_mask, position_ids) if values else None

    @property
    def is_gradient_checkpointing(self) -> bool:
        # TRL's unwrap_model_for_generation turns gradient checkpointing off around generation and reads this.
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def tie_weights(self) -> None:
        """Re-tie each part's shared weights (accelerate calls this after moving an FSDP2 model to the meta device)."""
        for module in self.modules():
            if module is not self and hasattr(module, "tie_weights"):
                module.tie_weights()


# ---------------------------------------------------------------- generation
@contextlib.contextmanager
def policy_for_generation(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[torch.nn.Module]:
    """The policy of a prepared PolicyAndValue with whole weights, for as long as the block decodes. ZeRO-3 gathers
    the policy's parameters only (the critic does not decode; gathering it too would double what generation holds)
    and lifts DeepSpeed's fetch hooks meanwhile, as TRL's unwrap_model_for_generation does for a whole model; FSDP2
    unshards the root and the policy's units (`fsdp2_unsharded`); elsewhere the weights are whole."""
    unwrapped = accelerator.unwrap_model(model)
    engine = engine_of(accelerator)
    checkpointing = unwrapped.is_gradient_checkpointing
    if checkpointing:
        unwrapped.gradient_checkpointing_disable()
    try:
        if engine.zero_stage == 3:
            import deepspeed
            from trl.models.utils import add_hooks, remove_hooks

            with deepspeed.zero.GatheredParameters(list(unwrapped.policy.parameters())):
                remove_hooks(model)
                try:
                    yield unwrapped.policy
                finally:
                    add_hooks(model)
        elif engine.fsdp2:
            with fsdp2_unsharded(unwrapped, within=unwrapped.policy):
                yield unwrapped.policy
        else:
            yield unwrapped.policy
    finally:
        if checkpointing:
            unwrapped.gradient_checkpointing_enable()
