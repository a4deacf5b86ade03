"""Bytes per device of the models a stage holds, as each engine keeps them: weights, gradients and AdamW states of
what trains, weights of what only scores, each sharded over the GPUs where the engine shards it, and what the
engine holds unsharded or cast besides (gathered layers, autocast's bf16 copies)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.plan.hardware import Hardware
from pipeline.plan.model_shape import ModelShape, decoder_layer_parameters


@dataclass(frozen=True)
class TrainingState:
    weights: int
    gradients: int
    optimizer_states: int


def model_dtype_bytes(hardware: Hardware, bf16: bool) -> int:
    """Bytes per weight (and per value of the residual stream): DeepSpeed under bf16 runs the whole model in bf16,
    the other engines keep fp32 weights and residual stream."""
    return 2 if hardware.deepspeed and bf16 else 4


def trainable_model_bytes(parameters: int, trainable: int, hardware: Hardware, bf16: bool) -> TrainingState:
    """Weights, gradients and AdamW states of one trained model per device; `trainable` ≤ `parameters` (LoRA).

    ddp/fsdp2 keep fp32 weights and gradients (autocast makes the bf16 copies) and two fp32 moments; DeepSpeed
    under bf16 keeps bf16 weights and gradients and, with the optimizer, an fp32 master copy and two moments.
    Multi-process DDP also holds its gradient buckets, a second copy of the gradients."""
    weight_bytes = model_dtype_bytes(hardware, bf16)
    optimizer_bytes = 12 if hardware.deepspeed else 8
    weight_shards = hardware.devices if hardware.shards_weights else 1
    state_shards = hardware.devices if hardware.shards_optimizer_states else 1
    gradients = math.ceil(trainable * weight_bytes / state_shards)
    if hardware.engine == "ddp" and hardware.devices > 1:
        gradients *= 2
    return TrainingState(weights=math.ceil(parameters * weight_bytes / weight_shards), gradients=gradients,
                         optimizer_states=math.ceil(trainable * optimizer_bytes / state_shards))


def frozen_model_bytes(parameters: int, hardware: Hardware, bf16: bool) -> int:
    """A model that only scores (reference, reward): DeepSpeed casts it to bf16 under mixed precision, the other
    engines keep it as loaded (fp32); zero3 and fsdp2 shard it."""
    shards = hardware.devices if hardware.shards_weights else 1
    return math.ceil(parameters * model_dtype_bytes(hardware, bf16) / shards)


def gathered_weight_bytes(shape: ModelShape, hardware: Hardware, bf16: bool) -> int:
    """What zero3/fsdp2 hold unsharded to compute: the embeddings and two decoder layers (one prefetched)."""
    if not hardware.shards_weights:
        return 0
    weight_bytes = 2 if bf16 else 4
    return weight_bytes * (shape.vocab_size * shape.hidden_size + 2 * decoder_layer_parameters(shape))


def autocast_copies(trainable: int, hardware: Hardware, bf16: bool) -> int:
    """Autocast caches the bf16 cast of each trainable fp32 weight for the forward and backward (ddp)."""
    return 2 * trainable if bf16 and hardware.engine == "ddp" else 0
