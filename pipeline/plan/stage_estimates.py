"""The peak memory per device of each stage (pretrain, SFT, reward, PPO): which models it holds, which phase of the
stage peaks, and what it holds there, by kind (weights, gradients, optimizer states, activations, KV cache,
runtime). The bytes come from model_state_memory and activation_memory; this module knows the stages."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config.schema import PipelineConfig
from pipeline.plan.activation_memory import (
    generation_transient_bytes, kv_cache_bytes, no_grad_forward_bytes, training_activation_bytes)
from pipeline.plan.hardware import MIB, Hardware
from pipeline.plan.model_shape import (
    ModelShape, causal_lm_parameters, lora_parameters, model_shape, reward_model_parameters)
from pipeline.plan.model_state_memory import (
    autocast_copies, frozen_model_bytes, gathered_weight_bytes, model_dtype_bytes, trainable_model_bytes)

# Resident size of a stage process on CPU apart from what the plan counts: Python, torch, transformers (and
# TRL for the trainer stages), tokenizer, datasets, oneDNN and allocator first-use buffers. Measured as the
# peak RSS of the smoke preset's stages (`/usr/bin/time -v python -m stages.<stage>`, 2 cores, torch 2.x CPU)
# less the plan's own figure for them; importing the stage module alone takes 0.38 GiB (pretrain) and 0.47 GiB.
CPU_RUNTIME_BYTES = {"pretrain": 428 * MIB, "sft": 534 * MIB, "reward": 524 * MIB, "ppo": 514 * MIB}


BUILTIN_TOKENS_PER_STORY, CORPUS_BYTES_PER_TOKEN = 55, 200


@dataclass
class StageEstimate:
    """The peak memory of one stage per device (per process on CPU), in bytes, by what holds it."""

    stage: str
    phase: str  # where the peak falls: "training", "normalisation", "rollout", "scoring", "update", "evaluation"
    models: str  # which models the stage holds, trainable parameters first
    weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    kv_cache: int = 0
    runtime: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.kv_cache + self.runtime


def stage_estimate(config: PipelineConfig, stage: str, hardware: Hardware, shape: ModelShape | None = None) -> StageEstimate:
    """The peak memory per device of one stage of `config` on `hardware` (`shape`: the run's, if already read)."""
    return STAGE_ESTIMATES[stage](config, shape or model_shape(config), hardware)


# ---------------------------------------------------------------- the stages' rules for the planned device
def stage_uses_bf16(requested: bool | None, hardware: Hardware) -> bool:
    """The stages' rule (pipeline.train.precision.bf16_enabled) for the planned device: on by default on a GPU, which the
    plan assumes supports bf16 (Ampere or newer), off on CPU."""
    return requested if requested is not None else hardware.kind == "cuda"


def attention_runs_eagerly(bf16: bool, hardware: Hardware) -> bool:
    """bf16 on CPU runs attention eagerly, which saves the attention matrix; elsewhere SDPA's fused kernels run."""
    return bf16 and hardware.kind == "cpu"


def runtime_bytes(stage: str, hardware: Hardware, config: PipelineConfig) -> int:
    """On CPU, the stage process's resident size besides the model's bytes; on a GPU that is host memory."""
    if hardware.kind != "cpu":
        return 0
    if stage == "pretrain" and config.data.pretrain is None:
        return CPU_RUNTIME_BYTES[stage] + builtin_corpus_bytes(config)
    return CPU_RUNTIME_BYTES[stage]


def builtin_corpus_bytes(config: PipelineConfig) -> int:
    """The built-in pretraining corpus tokenized in memory (Python lists of ints before they become one tensor):
    measured 200 bytes per token at 1.1M tokens; the allocator keeps most of it through training."""
    return config.data.builtin.pretrain_stories * BUILTIN_TOKENS_PER_STORY * CORPUS_BYTES_PER_TOKEN


# ---------------------------------------------------------------- stages that train one model
def trained_model_base(config: PipelineConfig, stage: str, name: str, parameters: int, adapters: int | None,
                       shape: ModelShape, hardware: Hardware, bf16: bool) -> StageEstimate:
    """What a stage training one model holds besides activations: the model whole, or (`adapters` not None)
    its frozen base with the LoRA adapters that train; plus what zero3/fsdp2 gather and autocast caches."""
    trainable = parameters if adapters is None else adapters
    state = trainable_model_bytes(parameters + (adapters or 0), trainable, hardware, bf16)
    return StageEstimate(
        stage, "training", describe_trained(name, parameters, trainable),
        weights=state.weights + gathered_weight_bytes(shape, hardware, bf16)
        + autocast_copies(trainable, hardware, bf16), gradients=state.gradients, optimizer_states=state.optimizer_states,
        runtime=runtime_bytes(stage, hardware, config))


def trainer_micro_batch(config: PipelineConfig, stage: str, shape: ModelShape) -> tuple[int, int]:
    """(sequences, length) of one SFT or reward micro-batch; a reward batch counts prompts, each with K responses."""
    section = getattr(config, stage)
    length = section.get("max_length") or shape.max_position_embeddings
    sequences = section.get("per_device_train_batch_size") or 8
    if stage == "reward":
        sequences *= config.data.builtin.completions_per_prompt if config.data.reward is None else 2
    return sequences, length


def pretrain_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """Our pretraining loop: the whole LM trains; the evaluation batch (no gradients) can be the larger peak."""
    settings = config.pretrain
    bf16 = stage_uses_bf16(settings.bf16, hardware)
    base = trained_model_base(config, "pretrain", "LM", causal_lm_parameters(shape), None, shape, hardware, bf16)
    training = replace(base, activations=training_activation_bytes(
        shape, settings.per_device_train_batch_size, settings.seq_length, bf16, attention_runs_eagerly(bf16, hardware),
        residual_bytes=model_dtype_bytes(hardware, bf16)))
    # No gradients at evaluation (set_to_none), and only the loss's log-softmax beside the logits.
    evaluation = replace(base, phase="evaluation", gradients=0, activations=no_grad_forward_bytes(
        shape, settings.per_device_eval_batch_size, settings.seq_length, bf16, logit_copies=2))
    return max((training, evaluation), key=lambda e: e.total)


def sft_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """TRL's SFTTrainer: the LM or its LoRA adapters train; the trainer keeps the logits for its accuracy and
    entropy metrics, one more copy than the loss alone."""
    section = config.sft
    bf16 = stage_uses_bf16(section.get("bf16"), hardware)
    adapters = lora_parameters(shape, section["peft"]) if section.get("peft") else None
    base = trained_model_base(config, "sft", "LM", causal_lm_parameters(shape), adapters, shape, hardware, bf16)
    sequences, length = trainer_micro_batch(config, "sft", shape)
    return replace(base, activations=training_activation_bytes(
        shape, sequences, length, bf16, attention_runs_eagerly(bf16, hardware),
        bool(section.get("gradient_checkpointing")), logit_copies=4, residual_bytes=model_dtype_bytes(hardware, bf16)))


def reward_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """TRL's RewardTrainer on prompt groups (K responses each, scored once); after training, the saved model
    is reloaded and the SFT policy sampled to normalise the scores, while the trainer's states are still held."""
    section = config.reward
    bf16 = stage_uses_bf16(section.get("bf16"), hardware)
    parameters = reward_model_parameters(shape)
    # SEQ_CLS LoRA trains (and keeps a copy of) the new score head besides the adapters.
    adapters = lora_parameters(shape, section["peft"]) + shape.hidden_size if section.get("peft") else None
    base = trained_model_base(config, "reward", "reward model", parameters, adapters, shape, hardware, bf16)
    sequences, length = trainer_micro_batch(config, "reward", shape)
    training = replace(base, activations=training_activation_bytes(
        shape, sequences, length, bf16, attention_runs_eagerly(bf16, hardware),
        bool(section.get("gradient_checkpointing")), logit_tokens=0, residual_bytes=model_dtype_bytes(hardware, bf16)))
    # The normalisation pass runs on the main process outside the trainer, in fp32, 64 prompts at a time.
    samples = min(64, section["normalization_samples"])
    sample_length = min(length + config.ppo.response_length, shape.max_position_embeddings)
    normalisation = replace(
        base, phase="normalisation", gradients=0,
        weights=base.weights + 4 * (parameters + causal_lm_parameters(shape)),
        kv_cache=kv_cache_bytes(shape, samples, sample_length, bf16=False),
        activations=generation_transient_bytes(shape, samples, sample_length, False, False))
    return max((training, normalisation), key=lambda e: e.total)


# ---------------------------------------------------------------- PPO
def ppo_sequence_lengths(config: PipelineConfig, shape: ModelShape) -> tuple[int, int]:
    """(prompt, response) length bounds: prompts fit the context less the response (encode_prompts checks it)
    and were the reward model's inputs, so at most reward.max_length."""
    response = config.ppo.response_length
    prompt = shape.max_position_embeddings - response
    if config.reward.get("max_length"):
        prompt = min(prompt, config.reward["max_length"])
    return max(prompt, 1), response


def ppo_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """Our PPO: the policy (or its adapters) and the critic train; reference (none under LoRA) and reward model
    only score. The peak is the worst of rollout (KV cache), scoring (chunked no-grad forwards) and update."""
    settings = config.ppo
    bf16 = stage_uses_bf16(settings.bf16, hardware)
    eager = attention_runs_eagerly(bf16, hardware)
    lm, classifier = causal_lm_parameters(shape), reward_model_parameters(shape)
    adapters = lora_parameters(shape, settings.peft) if settings.peft is not None else 0
    policy = trainable_model_bytes(lm + adapters, adapters or lm, hardware, bf16)
    critic = trainable_model_bytes(classifier, classifier, hardware, bf16)
    frozen = frozen_model_bytes(classifier, hardware, bf16) + (0 if adapters else frozen_model_bytes(lm, hardware, bf16))
    models = (describe_trained("policy", lm, adapters or lm) + f" + critic {format_count(classifier)} trainable"
              + ("" if adapters else f" + reference {format_count(lm)}") + f" + reward {format_count(classifier)}")
    prompt, response = ppo_sequence_lengths(config, shape)
    length, chunk = prompt + response, settings.local_rollout_forward_batch_size
    rollout_size = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * settings.num_mini_batches
    # The rollout buffer: ids, masks, logprobs, values, advantages, returns of the whole rollout batch.
    buffer = rollout_size * (length * 8 * 2 + response * 4 * 6)
    base = StageEstimate(
        "ppo", "update", models, weights=policy.weights + critic.weights + frozen + gathered_weight_bytes(shape, hardware, bf16),
        gradients=0, optimizer_states=policy.optimizer_states + critic.optimizer_states,
        runtime=runtime_bytes("ppo", hardware, config))
    # zero3/fsdp2 gather the whole policy to generate (unwrap_model_for_generation).
    gathered_policy = (lm + adapters) * (2 if bf16 else 4) if hardware.shards_weights else 0
    generation_chunk = min(chunk, rollout_size)
    rollout = replace(base, phase="rollout", weights=base.weights + gathered_policy,
                      kv_cache=kv_cache_bytes(shape, generation_chunk, length, bf16),
                      activations=generation_transient_bytes(shape, generation_chunk, length, bf16, eager))
    # logits of the response, their tempered fp32 copy and log-sum-exp, then the entropy's log-softmax and exp
    scoring = replace(base, phase="scoring", activations=buffer + no_grad_forward_bytes(
        shape, generation_chunk, length, bf16, logit_copies=5, logit_tokens=generation_chunk * (response + 1)))
    micro = settings.per_device_train_batch_size
    residual = model_dtype_bytes(hardware, bf16)
    update = replace(
        base, weights=base.weights + autocast_copies((adapters or lm) + classifier, hardware, bf16),
        gradients=policy.gradients + critic.gradients,
        activations=buffer + training_activation_bytes(shape, micro, length, bf16, eager, logit_tokens=micro * (response + 1),
                                                       logit_copies=4, residual_bytes=residual)
        + training_activation_bytes(shape, micro, length, bf16, eager, logit_tokens=0, residual_bytes=residual))
    return max((rollout, scoring, update), key=lambda e: e.total)


STAGE_ESTIMATES = {"pretrain": pretrain_estimate, "sft": sft_estimate, "reward": reward_estimate, "ppo": ppo_estimate}


# ---------------------------------------------------------------- which models
def describe_trained(name: str, parameters: int, trainable: int) -> str:
    if trainable == parameters:
        return f"{name} {format_count(parameters)} trainable"
    return f"{name} {format_count(parameters)} + LoRA {format_count(trainable)} trainable"


def format_count(value: int) -> str:
    """A parameter count as the plan prints it: 133k, 1.2B."""
    for unit, size in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if value >= size:
            return f"{value / size:.{1 if value < 100 * size else 0}f}{unit}"
    return str(value)
