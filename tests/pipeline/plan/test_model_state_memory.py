"""Weights, gradients and optimizer states per device, as each engine keeps and shards them."""

from pipeline.plan.model_state_memory import frozen_model_bytes, trainable_model_bytes
from tests.pipeline.plan.memory_plan_examples import CPU, gpus


def test_training_state_bytes_per_engine():
    p = 1000
    assert trainable_model_bytes(p, p, CPU, bf16=False).__dict__ == dict(weights=4000, gradients=4000,
                                                                        optimizer_states=8000)
    # multi-process DDP replicates everything and adds its gradient buckets
    assert trainable_model_bytes(p, p, gpus(4, 80), bf16=True).__dict__ == dict(weights=4000, gradients=8000,
                                                                               optimizer_states=8000)
    # ZeRO under bf16: bf16 weights and gradients, fp32 master + two moments (12 bytes), sharded as its stage says
    assert trainable_model_bytes(p, p, gpus(4, 80, "zero2"), bf16=True).__dict__ == dict(
        weights=2000, gradients=500, optimizer_states=3000)
    assert trainable_model_bytes(p, p, gpus(4, 80, "zero3"), bf16=True).__dict__ == dict(
        weights=500, gradients=500, optimizer_states=3000)
    assert trainable_model_bytes(p, p, gpus(4, 80, "fsdp2"), bf16=True).__dict__ == dict(
        weights=1000, gradients=1000, optimizer_states=2000)
    # LoRA: the frozen base is held, only the adapters get gradients and moments
    assert trainable_model_bytes(p, 10, CPU, bf16=False).__dict__ == dict(weights=4000, gradients=40,
                                                                         optimizer_states=80)
    assert frozen_model_bytes(p, gpus(4, 80), bf16=True) == 4000
    assert frozen_model_bytes(p, gpus(4, 80, "zero2"), bf16=True) == 2000
    assert frozen_model_bytes(p, gpus(4, 80, "zero3"), bf16=True) == 500
    assert frozen_model_bytes(p, gpus(4, 80, "fsdp2"), bf16=False) == 1000
