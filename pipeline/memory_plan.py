"""Will it fit? The memory each stage of a run needs per device, worked out from the config before anything runs.

    rlhf plan configs/gpu.yaml --gpus 4 --gpu-memory 24 --engine zero3

For every stage, at its peak (the training step; for PPO the worst of rollout, scoring and update; for the
reward stage also the normalisation pass after training) the plan counts, per device:
- weights of every model the stage holds (PPO: trainable policy and critic, frozen reference — none with LoRA,
  where the reference is the policy with its adapter off — and frozen reward model);
- gradients and AdamW states of what trains (only the adapters under LoRA), as the engines keep them:
  ddp and fsdp2 keep fp32 weights (bf16 only through autocast), so 4 + 4 + 8 bytes per parameter; DeepSpeed
  keeps bf16 weights and gradients under mixed precision plus an fp32 master copy with the optimizer, 2 + 2 + 12;
  zero2 shards gradients and optimizer states over the GPUs, zero3 and fsdp2 the weights too (frozen models
  included), and gather a layer or two at a time to compute (and the whole policy to generate);
- activations saved for backward at the configured micro-batch and length (a Llama-style decoder layer,
  per token: two RMSNorms, q/k/v, RoPE, attention output, SwiGLU; the attention matrix too where attention runs
  eagerly, i.e. bf16 on CPU; only the layer inputs under gradient checkpointing), and the vocabulary logits
  with their fp32 log-softmax and gradients;
- PPO's generation KV cache: local_rollout_forward_batch_size × (prompt + response_length) × layers × 2 ×
  kv_heads × head_dim × bytes;
- the runtime: on CPU the measured resident size of a stage process before its model grows (Python, torch,
  transformers, TRL, tokenizers, first-use allocations); on a GPU nothing, the CUDA context is in the headroom.

Lengths are upper bounds: sequences are padded to the longest in a batch, which is at most the configured
max_length (PPO: prompts at most reward.max_length, or the context less response_length), so the plan is what
the worst batch needs. Checked on CPU against the peak RSS of each stage (`/usr/bin/time -v python -m
stages.<stage>`, 2 cores, 2026-11-26): the runtime constants come from the smoke preset; on the default preset,
at the longest sequences the run actually had, the plan is within 6% of the measured peak per stage (pretrain
+6%, SFT +5%, reward −1%, PPO −6%), and at the configured length bounds above it (+6%, +35%, +57%, +20%), as an
upper bound should be. The saved-activation count of a decoder layer matches autograd's saved tensors of a
4×128 Llama within 3%. On GPU it has not been checked yet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (
    STAGES, ConfigError, PeftSection, PipelineConfig, apply_override, dataclass_from_dict, trainer_section)

MIB, GIB = 1024 ** 2, 1024 ** 3
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
SHARDS_WEIGHTS = ("fsdp2", "zero3")
SHARDS_OPTIMIZER = ("fsdp2", "zero2", "zero3")

# Headroom on a GPU: the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation live
# outside what the plan counts.
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION_SHARE = 0.10
# On CPU, `rlhf run` itself and `accelerate launch` stay resident beside each stage process (measured: 0.39
# and 0.27 GiB RSS), and the same 10% is kept free for the allocator and the page cache.
CPU_LAUNCHER_BYTES = 680 * MIB
# Resident size of a stage process on CPU apart from what the plan counts: Python, torch, transformers (and
# TRL for the trainer stages), tokenizer, datasets, oneDNN and allocator first-use buffers. Measured as the
# peak RSS of the smoke preset's stages (`/usr/bin/time -v python -m stages.<stage>`, 2 cores, torch 2.x CPU)
# less the plan's own figure for them; importing the stage module alone takes 0.38 GiB (pretrain) and 0.47 GiB.
CPU_RUNTIME_BYTES = {"pretrain": 428 * MIB, "sft": 534 * MIB, "reward": 524 * MIB, "ppo": 514 * MIB}
BUILTIN_TOKENS_PER_STORY, CORPUS_BYTES_PER_TOKEN = 55, 200
LORA_RANK_SUGGESTED = 16
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a Llama-style decoder."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False


def model_shape(config: PipelineConfig) -> ModelShape:
    """The shape of the run's model: the `model` section, or model.name_or_path's config.json (no weights read)."""
    model, tokenizer = config.model, config.tokenizer
    if model.name_or_path is None:
        vocab = tokenizer.vocab_size if tokenizer.name_or_path is None else tokenizer_length(tokenizer.name_or_path, config)
        return ModelShape(model.num_hidden_layers, model.hidden_size, model.intermediate_size, model.num_attention_heads,
                          model.num_attention_heads, model.hidden_size // model.num_attention_heads, vocab,
                          model.max_position_embeddings)
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name_or_path: cannot read the config.json of {model.name_or_path} to plan memory "
                          f"({str(error).splitlines()[0]})") from None
    hf = getattr(hf, "text_config", None) or hf
    heads = hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    vocab = hf.vocab_size
    tokenizer_path = tokenizer.name_or_path or model.name_or_path
    if Path(tokenizer_path).is_dir():  # the pipeline grows the embeddings when the tokenizer gains a pad token
        vocab = max(vocab, tokenizer_length(tokenizer_path, config))
    return ModelShape(
        num_hidden_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, vocab_size=vocab,
        max_position_embeddings=getattr(hf, "max_position_embeddings", None) or 2048,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=attention_bias or hf.model_type.startswith("qwen2"), o_bias=attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)))


def tokenizer_length(name_or_path: str, config: PipelineConfig) -> int:
    from data.tokenizer import load_tokenizer

    try:
        return len(load_tokenizer(name_or_path, config.model.trust_remote_code))
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer.name_or_path: cannot load {name_or_path} ({str(error).splitlines()[0]})") from None


def projection_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer."""
    h, q, kv, i = shape.hidden_size, shape.num_attention_heads * shape.head_dim, \
        shape.num_key_value_heads * shape.head_dim, shape.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def decoder_layer_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder layer: the seven projections, their biases if any, two RMSNorm weights."""
    projections = projection_shapes(shape)
    weights = sum(n_in * n_out for n_in, n_out in projections.values())
    biases = (sum(projections[p][1] for p in ("q_proj", "k_proj", "v_proj")) if shape.qkv_bias else 0) \
        + (shape.hidden_size if shape.o_bias else 0) \
        + (2 * shape.intermediate_size + shape.hidden_size if shape.mlp_bias else 0)
    return weights + biases + 2 * shape.hidden_size


def backbone_parameters(shape: ModelShape) -> int:
    """Embeddings, every decoder layer and the final norm: what the LM and the reward model share."""
    return shape.vocab_size * shape.hidden_size + shape.num_hidden_layers * decoder_layer_parameters(shape) \
        + shape.hidden_size


def causal_lm_parameters(shape: ModelShape) -> int:
    """Parameters of the LM (the LM head counted once when tied to the embeddings)."""
    head = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
    return backbone_parameters(shape) + head


def reward_model_parameters(shape: ModelShape) -> int:
    """Parameters of the sequence classifier used as reward and value model: the backbone and a 1-output head."""
    return backbone_parameters(shape) + shape.hidden_size


def lora_parameters(shape: ModelShape, peft: PeftSection | dict[str, Any]) -> int:
    """Parameters of LoRA adapters: r × (in + out) for each targeted projection of each layer."""
    peft = peft if isinstance(peft, PeftSection) else PeftSection(**peft)
    targets = LLAMA_PROJECTIONS if peft.target_modules in ("all-linear", ["all-linear"]) else peft.target_modules
    projections = projection_shapes(shape)
    unknown = [t for t in targets if t not in projections]
    if unknown:
        raise ConfigError(f"peft.target_modules: {unknown[0]!r} is not a projection of a Llama-style decoder layer "
                          f"({', '.join(LLAMA_PROJECTIONS)}); the memory plan cannot size it")
    return shape.num_hidden_layers * sum(peft.r * sum(projections[t]) for t in targets)


# ---------------------------------------------------------------- bytes per device
@dataclass(frozen=True)
class Hardware:
    """Where the run goes: `devices` GPUs with `memory_bytes` each, or CPU processes sharing the machine's RAM."""

    kind: str  # "cuda" or "cpu"
    devices: int
    memory_bytes: int
    engine: str = "ddp"
    name: str = ""

    @property
    def usable_bytes(self) -> int:
        """Per device (per process on CPU) after the headroom stated in `headroom`."""
        if self.kind == "cuda":
            return int((self.memory_bytes - CUDA_CONTEXT_BYTES) * (1 - FRAGMENTATION_SHARE))
        return int((self.memory_bytes - CPU_LAUNCHER_BYTES) * (1 - FRAGMENTATION_SHARE)) // self.devices

    @property
    def headroom(self) -> str:
        if self.kind == "cuda":
            return f"{format_bytes(CUDA_CONTEXT_BYTES)} for the CUDA context, then {FRAGMENTATION_SHARE:.0%} for fragmentation"
        shared = f", shared by {self.devices} processes" if self.devices > 1 else ""
        return f"{format_bytes(CPU_LAUNCHER_BYTES)} for the rlhf/accelerate launchers, then {FRAGMENTATION_SHARE:.0%}{shared}"

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU, {self.devices} process{'es' if self.devices > 1 else ''}, {format_bytes(self.memory_bytes)} RAM available"
        return f"{self.devices} × {self.name or 'GPU'} ({format_bytes(self.memory_bytes)}), {self.engine}"


@dataclass(frozen=True)
class TrainingState:
    weights: int
    gradients: int
    optimizer_states: int


def trainable_model_bytes(parameters: int, trainable: int, hardware: Hardware, bf16: bool) -> TrainingState:
    """Weights, gradients and AdamW states of one trained model per device; `trainable` ≤ `parameters` (LoRA).

    ddp/fsdp2 keep fp32 weights and gradients (autocast makes the bf16 copies) and two fp32 moments; DeepSpeed
    under bf16 keeps bf16 weights and gradients and, with the optimizer, an fp32 master copy and two moments.
    Multi-process DDP also holds its gradient buckets, a second copy of the gradients."""
    engine, devices = hardware.engine, hardware.devices
    deepspeed = engine in ("zero2", "zero3")
    weight_bytes = 2 if deepspeed and bf16 else 4
    optimizer_bytes = 12 if deepspeed else 8
    weight_shards = devices if engine in SHARDS_WEIGHTS else 1
    state_shards = devices if engine in SHARDS_OPTIMIZER else 1
    gradients = math.ceil(trainable * weight_bytes / state_shards)
    if engine == "ddp" and devices > 1:
        gradients *= 2
    return TrainingState(weights=math.ceil(parameters * weight_bytes / weight_shards), gradients=gradients,
                         optimizer_states=math.ceil(trainable * optimizer_bytes / state_shards))


def frozen_model_bytes(parameters: int, hardware: Hardware, bf16: bool) -> int:
    """A model that only scores (reference, reward): DeepSpeed casts it to bf16 under mixed precision, the other
    engines keep it as loaded (fp32); zero3 and fsdp2 shard it."""
    weight_bytes = 2 if hardware.engine in ("zero2", "zero3") and bf16 else 4
    shards = hardware.devices if hardware.engine in SHARDS_WEIGHTS else 1
    return math.ceil(parameters * weight_bytes / shards)


def gathered_weight_bytes(shape: ModelShape, hardware: Hardware, bf16: bool) -> int:
    """What zero3/fsdp2 hold unsharded to compute: the embeddings and two decoder layers (one prefetched)."""
    if hardware.engine not in SHARDS_WEIGHTS:
        return 0
    weight_bytes = 2 if bf16 else 4
    return weight_bytes * (shape.vocab_size * shape.hidden_size + 2 * decoder_layer_parameters(shape))


def layer_activation_bytes_per_token(shape: ModelShape, seq_length: int, bf16: bool, eager_attention: bool,
                                     residual_bytes: int = 4) -> int:
    """Bytes one decoder layer saves for backward, per token.

    RMSNorm saves its input and normalised output in fp32 (HF upcasts), and autocast a bf16 copy for the next
    linear; then q, k, v; RoPE's rotated q, k; attention output and its reshaped copy; SwiGLU's gate, silu(gate),
    up and their product. Eager attention (bf16 on CPU) also saves the heads × length probabilities, fp32 from
    the softmax plus a cast; SDPA's fused kernels keep only a log-sum-exp."""
    h, q = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    kv, i = shape.num_key_value_heads * shape.head_dim, shape.intermediate_size
    act = 2 if bf16 else 4
    norm_fp32 = 4 if residual_bytes == 4 else 2
    norms = 2 * (2 * h * norm_fp32 + (h * act if act != norm_fp32 else 0))
    attention = (q + 2 * kv) * act + (q + kv) * act + 2 * q * act
    if eager_attention:
        attention += shape.num_attention_heads * seq_length * (4 + (act if act != 4 else 0))
    mlp = 4 * i * act
    return norms + attention + mlp


def training_activation_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool, eager_attention: bool,
                              gradient_checkpointing: bool = False, logit_tokens: int | None = None,
                              logit_copies: int = 3, residual_bytes: int = 4) -> int:
    """Activations of one forward/backward of `sequences` × `seq_length` tokens through the decoder, plus the
    logits of `logit_tokens` tokens (all of them when None; 0 for a scalar head): the loss keeps `logit_copies`
    fp32 tensors of batch × vocab at the backward's peak (log-softmax, its gradient, the logits' gradient)."""
    tokens = sequences * seq_length
    per_layer = layer_activation_bytes_per_token(shape, seq_length, bf16, eager_attention, residual_bytes) * tokens
    if gradient_checkpointing:  # each layer keeps only its input; one layer's activations are rebuilt at a time
        layers = shape.num_hidden_layers * tokens * shape.hidden_size * residual_bytes + per_layer
    else:
        layers = shape.num_hidden_layers * per_layer
    final_norm = 2 * tokens * shape.hidden_size * residual_bytes
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    logits = logit_tokens * shape.vocab_size * (4 * logit_copies + (2 if bf16 else 0))
    return layers + final_norm + logits


def kv_cache_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool) -> int:
    """The generation KV cache: sequences × length × layers × 2 (K and V) × kv_heads × head_dim × bytes."""
    return sequences * seq_length * shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim \
        * (2 if bf16 else 4)


def generation_transient_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool,
                               eager_attention: bool) -> int:
    """Besides the cache, the prefill of one layer at a time (and its attention matrix when eager)."""
    act = 2 if bf16 else 4
    tokens = sequences * seq_length
    hidden = tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * act
    scores = sequences * shape.num_attention_heads * seq_length * seq_length * 4 if eager_attention else 0
    return hidden + scores + sequences * shape.vocab_size * 4 * 3


# ---------------------------------------------------------------- stages
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


def stage_uses_bf16(requested: bool | None, hardware: Hardware) -> bool:
    """The stages' rule (pipeline.stage.bf16_enabled) for the planned device: on by default on a GPU, which the
    plan assumes supports bf16 (Ampere or newer), off on CPU."""
    return requested if requested is not None else hardware.kind == "cuda"


def runtime_bytes(stage: str, hardware: Hardware, config: PipelineConfig | None = None) -> int:
    """On CPU, the stage process's resident size besides the model's bytes; on a GPU that is host memory."""
    if hardware.kind != "cpu":
        return 0
    if stage == "pretrain" and config is not None and config.data.pretrain is None:
        return CPU_RUNTIME_BYTES[stage] + builtin_corpus_bytes(config)
    return CPU_RUNTIME_BYTES[stage]


def builtin_corpus_bytes(config: PipelineConfig) -> int:
    """The built-in pretraining corpus tokenized in memory (Python lists of ints before they become one tensor):
    measured 200 bytes per token at 1.1M tokens; the allocator keeps most of it through training."""
    return config.data.builtin.pretrain_stories * BUILTIN_TOKENS_PER_STORY * CORPUS_BYTES_PER_TOKEN


def residual_bytes_for(hardware: Hardware, bf16: bool) -> int:
    """DeepSpeed under bf16 runs the whole model in bf16; the others keep fp32 weights and residual stream."""
    return 2 if hardware.engine in ("zero2", "zero3") and bf16 else 4


def trainer_micro_batch(config: PipelineConfig, stage: str) -> tuple[int, int]:
    """(sequences, length) of one SFT or reward micro-batch; a reward batch counts prompts, each with K responses."""
    section = getattr(config, stage)
    length = section.get("max_length") or model_context(config)
    sequences = section.get("per_device_train_batch_size") or 8
    if stage == "reward":
        sequences *= config.data.builtin.completions_per_prompt if config.data.reward is None else 2
    return sequences, length


def model_context(config: PipelineConfig, shape: ModelShape | None = None) -> int:
    return (shape or model_shape(config)).max_position_embeddings


def pretrain_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """Our pretraining loop: the whole LM trains; the evaluation batch (no gradients) can be the larger peak."""
    settings = config.pretrain
    bf16 = stage_uses_bf16(settings.bf16, hardware)
    eager = bf16 and hardware.kind == "cpu"
    parameters = causal_lm_parameters(shape)
    state = trainable_model_bytes(parameters, parameters, hardware, bf16)
    residual = residual_bytes_for(hardware, bf16)
    base = StageEstimate("pretrain", "training", f"LM {format_count(parameters)} trainable",
                         weights=state.weights + gathered_weight_bytes(shape, hardware, bf16) + autocast_copies(
                             parameters, hardware, bf16),
                         gradients=state.gradients, optimizer_states=state.optimizer_states,
                         runtime=runtime_bytes("pretrain", hardware, config))
    training = replace(base, activations=training_activation_bytes(
        shape, settings.per_device_train_batch_size, settings.seq_length, bf16, eager, residual_bytes=residual))
    # No gradients at evaluation (set_to_none), and only the loss's log-softmax beside the logits.
    evaluation = replace(base, phase="evaluation", gradients=0, activations=no_grad_forward_bytes(
        shape, settings.per_device_eval_batch_size, settings.seq_length, bf16, logit_copies=2))
    return max((training, evaluation), key=lambda e: e.total)


def autocast_copies(trainable: int, hardware: Hardware, bf16: bool) -> int:
    """Autocast caches the bf16 cast of each trainable fp32 weight for the forward and backward (ddp)."""
    return 2 * trainable if bf16 and hardware.engine == "ddp" else 0


def no_grad_forward_bytes(shape: ModelShape, sequences: int, seq_length: int, bf16: bool, logit_copies: int,
                          logit_tokens: int | None = None) -> int:
    """A forward without gradients: one layer's hidden states at a time, then the logits and their copies."""
    act = 2 if bf16 else 4
    tokens = sequences * seq_length
    hidden = tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * act
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    return hidden + logit_tokens * shape.vocab_size * 4 * logit_copies


def sft_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """TRL's SFTTrainer: the LM or its LoRA adapters train; the trainer keeps the logits for its accuracy and
    entropy metrics, one more copy than the loss alone."""
    section = config.sft
    bf16 = stage_uses_bf16(section.get("bf16"), hardware)
    parameters = causal_lm_parameters(shape)
    trainable = lora_parameters(shape, section["peft"]) if section.get("peft") else parameters
    state = trainable_model_bytes(parameters + (trainable if section.get("peft") else 0), trainable, hardware, bf16)
    sequences, length = trainer_micro_batch(config, "sft")
    return StageEstimate(
        "sft", "training", describe_trained("LM", parameters, trainable),
        weights=state.weights + gathered_weight_bytes(shape, hardware, bf16) + autocast_copies(trainable, hardware, bf16),
        gradients=state.gradients, optimizer_states=state.optimizer_states,
        activations=training_activation_bytes(shape, sequences, length, bf16, bf16 and hardware.kind == "cpu",
                                              bool(section.get("gradient_checkpointing")), logit_copies=4,
                                              residual_bytes=residual_bytes_for(hardware, bf16)),
        runtime=runtime_bytes("sft", hardware))


def reward_estimate(config: PipelineConfig, shape: ModelShape, hardware: Hardware) -> StageEstimate:
    """TRL's RewardTrainer on prompt groups (K responses each, scored once); after training, the saved model
    is reloaded and the SFT policy sampled to normalise the scores, while the trainer's states are still held."""
    section = config.reward
    bf16 = stage_uses_bf16(section.get("bf16"), hardware)
    parameters = reward_model_parameters(shape)
    # SEQ_CLS LoRA trains (and keeps a copy of) the new score head besides the adapters.
    adapters = lora_parameters(shape, section["peft"]) + shape.hidden_size if section.get("peft") else 0
    trainable = adapters or parameters
    state = trainable_model_bytes(parameters + adapters, trainable, hardware, bf16)
    sequences, length = trainer_micro_batch(config, "reward")
    base = StageEstimate("reward", "training", describe_trained("reward model", parameters, trainable),
                         weights=state.weights + gathered_weight_bytes(shape, hardware, bf16)
                         + autocast_copies(trainable, hardware, bf16),
                         gradients=state.gradients, optimizer_states=state.optimizer_states,
                         runtime=runtime_bytes("reward", hardware))
    training = replace(base, activations=training_activation_bytes(
        shape, sequences, length, bf16, bf16 and hardware.kind == "cpu", bool(section.get("gradient_checkpointing")),
        logit_tokens=0, residual_bytes=residual_bytes_for(hardware, bf16)))
    # The normalisation pass runs on the main process outside the trainer, in fp32, 64 prompts at a time.
    samples = min(64, section["normalization_samples"])
    sample_length = min(length + config.ppo.response_length, shape.max_position_embeddings)
    normalisation = replace(
        base, phase="normalisation", gradients=0,
        weights=base.weights + 4 * (reward_model_parameters(shape) + causal_lm_parameters(shape)),
        kv_cache=kv_cache_bytes(shape, samples, sample_length, bf16=False),
        activations=generation_transient_bytes(shape, samples, sample_length, False, False))
    return max((training, normalisation), key=lambda e: e.total)


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
    eager = bf16 and hardware.kind == "cpu"
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
        runtime=runtime_bytes("ppo", hardware))
    # zero3/fsdp2 gather the whole policy to generate (unwrap_model_for_generation).
    gathered_policy = (lm + adapters) * (2 if bf16 else 4) if hardware.engine in SHARDS_WEIGHTS else 0
    generation_chunk = min(chunk, rollout_size)
    rollout = replace(base, phase="rollout", weights=base.weights + gathered_policy,
                      kv_cache=kv_cache_bytes(shape, generation_chunk, length, bf16),
                      activations=generation_transient_bytes(shape, generation_chunk, length, bf16, eager))
    # logits of the response, their tempered fp32 copy and log-sum-exp, then the entropy's log-softmax and exp
    scoring = replace(base, phase="scoring", activations=buffer + no_grad_forward_bytes(
        shape, generation_chunk, length, bf16, logit_copies=5, logit_tokens=generation_chunk * (response + 1)))
    micro = settings.per_device_train_batch_size
    residual = residual_bytes_for(hardware, bf16)
    update = replace(
        base, weights=base.weights + autocast_copies((adapters or lm) + classifier, hardware, bf16),
        gradients=policy.gradients + critic.gradients,
        activations=buffer + training_activation_bytes(shape, micro, length, bf16, eager, logit_tokens=micro * (response + 1),
                                                       logit_copies=4, residual_bytes=residual)
        + training_activation_bytes(shape, micro, length, bf16, eager, logit_tokens=0, residual_bytes=residual))
    return max((rollout, scoring, update), key=lambda e: e.total)


def describe_trained(name: str, parameters: int, trainable: int) -> str:
    if trainable == parameters:
        return f"{name} {format_count(parameters)} trainable"
    return f"{name} {format_count(parameters)} + LoRA {format_count(trainable)} trainable"


STAGE_ESTIMATES = {"pretrain": pretrain_estimate, "sft": sft_estimate, "reward": reward_estimate, "ppo": ppo_estimate}


def stage_estimate(config: PipelineConfig, stage: str, hardware: Hardware, shape: ModelShape | None = None) -> StageEstimate:
    """The peak memory per device of one stage of `config` on `hardware`."""
    return STAGE_ESTIMATES[stage](config, shape or model_shape(config), hardware)


# ---------------------------------------------------------------- what would make it fit
@dataclass
class Knob:
    """A change that brings a stage within memory: config overrides and/or another engine or GPU count."""

    label: str
    overrides: list[str] = field(default_factory=list)
    engine: str | None = None
    devices: int | None = None
    total: int = 0

    def describe(self) -> str:
        changes = " ".join(self.overrides + ([f"--engine {self.engine}"] if self.engine else [])
                           + ([f"--gpus {self.devices}"] if self.devices else []))
        return f"{self.label} → {format_bytes(self.total)}   ({changes})"


@dataclass
class StagePlan:
    estimate: StageEstimate
    usable_bytes: int
    knobs: list[Knob] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.usable_bytes


def config_with_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of `config` with `key=value` overrides applied, typed as load_config types them."""
    raw = config.to_dict()
    for override in overrides:
        apply_override(raw, override)
    changed = dataclass_from_dict(PipelineConfig, raw, "")
    for stage in ("sft", "reward"):
        setattr(changed, stage, trainer_section(stage, getattr(changed, stage)))
    changed.source = config.source
    return changed


def micro_batch_overrides(config: PipelineConfig, stage: str, micro: int) -> list[str]:
    """Micro-batch `micro` with the gradient accumulation that keeps the effective batch (and PPO's rollout)."""
    section = getattr(config, stage)
    get = section.get if isinstance(section, dict) else lambda key, default=None: getattr(section, key, default)
    current = get("per_device_train_batch_size") or 8
    accumulation = (get("gradient_accumulation_steps") or 1) * current // micro
    return [f"{stage}.per_device_train_batch_size={micro}", f"{stage}.gradient_accumulation_steps={accumulation}"]


def smaller_divisors(value: int) -> list[int]:
    return [d for d in range(value - 1, 0, -1) if value % d == 0]


def knobs_that_fit(config: PipelineConfig, stage: str, hardware: Hardware, shape: ModelShape) -> list[Knob]:
    """Each change that alone makes `stage` fit (the largest micro-batch that fits; the fewest GPUs per engine);
    when none does alone, LoRA and gradient checkpointing together with the largest micro-batch that fits."""
    usable = hardware.usable_bytes

    def total(overrides: list[str], on: Hardware = hardware) -> int:
        changed = config_with_overrides(config, overrides) if overrides else config
        return stage_estimate(changed, stage, on, shape).total

    section = getattr(config, stage)
    get = section.get if isinstance(section, dict) else lambda key, default=None: getattr(section, key, default)
    memory_savers: list[tuple[str, list[str]]] = []
    if stage in ("sft", "reward", "ppo") and not get("peft"):
        memory_savers.append((f"LoRA r={LORA_RANK_SUGGESTED}", [f"{stage}.peft={{r: {LORA_RANK_SUGGESTED}}}"]))
    if stage in ("sft", "reward") and not get("gradient_checkpointing"):
        memory_savers.append(("gradient checkpointing", [f"{stage}.gradient_checkpointing=true"]))
    knobs = [Knob(label, overrides, total=t) for label, overrides in memory_savers if (t := total(overrides)) <= usable]

    def largest_fitting_micro_batch(prefix: list[str]) -> Knob | None:
        for micro in smaller_divisors(get("per_device_train_batch_size") or 8):
            overrides = prefix + micro_batch_overrides(config, stage, micro)
            if (t := total(overrides)) <= usable:
                return Knob(f"{stage}.per_device_train_batch_size {micro}", overrides, total=t)
        return None

    if knob := largest_fitting_micro_batch([]):
        knobs.append(knob)
    if stage == "ppo":
        for chunk in smaller_divisors(config.ppo.local_rollout_forward_batch_size):
            overrides = [f"ppo.local_rollout_forward_batch_size={chunk}"]
            if (t := total(overrides)) <= usable:
                knobs.append(Knob(f"ppo.local_rollout_forward_batch_size {chunk}", overrides, total=t))
                break
    if hardware.kind == "cuda":
        for engine in ("zero2", "zero3", "fsdp2"):
            for devices in sorted({hardware.devices} | {2 ** k for k in range(1, 7) if 2 ** k > hardware.devices}):
                on = replace(hardware, engine=engine, devices=devices)
                if (t := total([], on)) <= on.usable_bytes:
                    knobs.append(Knob(f"{engine} on {devices} GPU{'s' if devices > 1 else ''}", engine=engine,
                                      devices=devices if devices != hardware.devices else None, total=t))
                    break
    if not knobs and memory_savers:
        together = [o for _, overrides in memory_savers for o in overrides]
        label = " + ".join(label for label, _ in memory_savers)
        if (t := total(together)) <= usable:
            knobs.append(Knob(label, together, total=t))
        elif knob := largest_fitting_micro_batch(together):
            knobs.append(replace(knob, label=f"{label} + {knob.label}"))
    return knobs


# ---------------------------------------------------------------- the run
def plan_run(config: PipelineConfig, hardware: Hardware) -> list[StagePlan]:
    """The plan of every stage of the run, with knobs for those that do not fit."""
    shape = model_shape(config)
    plans = []
    for stage in (s for s in STAGES if s in config.run.stages):
        plan = StagePlan(stage_estimate(config, stage, hardware, shape), hardware.usable_bytes)
        if not plan.fits:
            plan.knobs = knobs_that_fit(config, stage, hardware, shape)
        plans.append(plan)
    return plans


def check_run_fits(config: PipelineConfig, hardware: Hardware | None = None) -> None:
    """Refuse, with one line naming the stage and the shortfall, a run that cannot fit this machine."""
    hardware = hardware or machine_hardware(config)
    for plan in plan_run(config, hardware):
        if not plan.fits:
            estimate = plan.estimate
            hint = f"; e.g. {plan.knobs[0].label} → {format_bytes(plan.knobs[0].total)}" if plan.knobs else ""
            where = config.source or "CONFIG"
            raise ConfigError(
                f"{estimate.stage}: needs {format_bytes(estimate.total)} per device at its {estimate.phase} peak, "
                f"{format_bytes(estimate.total - plan.usable_bytes)} more than the {format_bytes(plan.usable_bytes)} "
                f"usable on {hardware.describe()}{hint} (`rlhf plan {where}` lists what would fit)")


def machine_hardware(config: PipelineConfig, gpus: int | None = None, gpu_memory_gib: float | None = None,
                     engine: str | None = None) -> Hardware:
    """The hardware to plan for: what the flags say, else this machine's GPUs (as many as the run's Accelerate
    config launches processes, with its engine), else its CPU RAM (MemAvailable) shared by those processes."""
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus: must be at least 1, got {gpus}")
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory: must be positive (GiB), got {gpu_memory_gib}")
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"--engine: must be one of {', '.join(ENGINES)}; got {engine!r}")
    launched_processes, launched_engine = accelerate_launch_settings(config.run.accelerate_config)
    engine = engine or launched_engine
    if gpu_memory_gib is not None:
        return Hardware("cuda", gpus or launched_processes, int(gpu_memory_gib * GIB), engine)
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return Hardware("cuda", gpus or launched_processes, properties.total_memory, engine, properties.name)
    if gpus is not None:
        raise ConfigError("--gpus: this machine has no GPU; give --gpu-memory (GiB per GPU) to plan for one")
    return Hardware("cpu", launched_processes, available_ram_bytes(), "ddp")


def accelerate_launch_settings(path: str | None) -> tuple[int, str]:
    """(processes, engine) that an Accelerate config file launches; one ddp process without one."""
    if path is None:
        return 1, "ddp"
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"run.accelerate_config: cannot read {path} ({error})") from None
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        engine = "zero3" if int((settings.get("deepspeed_config") or {}).get("zero_stage", 2)) == 3 else "zero2"
    else:
        engine = "fsdp2" if kind == "FSDP" else "ddp"
    return int(settings.get("num_processes", 1) or 1), engine


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo: free memory plus what the kernel can reclaim without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---------------------------------------------------------------- printing
def format_bytes(value: int) -> str:
    if abs(value) >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB" if abs(value) >= MIB else f"{value / 1024:.0f} KiB"


def format_count(value: int) -> str:
    for unit, size in (("B", 10 ** 9), ("M", 10 ** 6), ("k", 10 ** 3)):
        if value >= size:
            return f"{value / size:.{1 if value < 100 * size else 0}f}{unit}"
    return str(value)


def format_plan(plans: list[StagePlan], hardware: Hardware) -> str:
    """The table `rlhf plan` prints, then for each stage that does not fit the knobs that would make it fit."""
    lines = [f"Planning for {hardware.describe()}; usable per {'process' if hardware.kind == 'cpu' else 'GPU'}: "
             f"{format_bytes(hardware.usable_bytes)} (headroom: {hardware.headroom})"]
    columns = ("stage", "peak at", "weights", "grads", "optimizer", "activations", "kv cache", "runtime", "total", "fits")
    rows = [columns]
    for plan in plans:
        e = plan.estimate
        rows.append((e.stage, e.phase, *(format_bytes(v) for v in (e.weights, e.gradients, e.optimizer_states,
                                                                  e.activations, e.kv_cache, e.runtime, e.total)),
                     "yes" if plan.fits else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines += ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines += [f"  {plan.estimate.stage}: {plan.estimate.models}" for plan in plans]
    for plan in plans:
        if plan.fits:
            continue
        short = format_bytes(plan.estimate.total - plan.usable_bytes)
        if plan.knobs:
            lines.append(f"{plan.estimate.stage} does not fit ({short} short); any one of these would fit:")
            lines += [f"  {knob.describe()}" for knob in plan.knobs]
        else:
            lines.append(f"{plan.estimate.stage} does not fit ({short} short), and no single knob the plan tries "
                         f"(LoRA, gradient checkpointing, micro-batch, ZeRO/FSDP) makes it fit")
    return "\n".join(lines)
