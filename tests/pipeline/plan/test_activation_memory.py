"""The KV cache and saved activations of a small shape, counted by hand."""

from pipeline.plan.activation_memory import kv_cache_bytes, layer_activation_bytes_per_token, training_activation_bytes
from pipeline.plan.model_shape import model_shape
from pipeline.plan.stage_estimates import ppo_sequence_lengths
from tests.pipeline.plan.memory_plan_examples import SHAPE, smoke


def test_kv_cache_and_activations_by_hand():
    assert kv_cache_bytes(SHAPE, sequences=8, seq_length=100, bf16=True) == 8 * 100 * 2 * 2 * 2 * 16 * 2
    config = smoke("ppo.local_rollout_forward_batch_size=64", "reward.max_length=200")
    assert ppo_sequence_lengths(config, model_shape(config)) == (200, 24)  # reward.max_length bounds prompts
    # fp32, SDPA: norms 2·(2·64·4), q/k/v (64+32+32)·4, RoPE (64+32)·4, attention out 2·64·4, SwiGLU 4·128·4
    per_token = 2 * 2 * 64 * 4 + 128 * 4 + 96 * 4 + 128 * 4 + 4 * 128 * 4
    assert layer_activation_bytes_per_token(SHAPE, 50, bf16=False, eager_attention=False) == per_token
    # eager attention also keeps the heads × length probabilities
    assert layer_activation_bytes_per_token(SHAPE, 50, False, eager_attention=True) == per_token + 4 * 50 * 4
    tokens = 2 * 50
    full = training_activation_bytes(SHAPE, 2, 50, bf16=False, eager_attention=False, logit_tokens=0)
    assert full == 2 * per_token * tokens + 2 * tokens * 64 * 4
    checkpointed = training_activation_bytes(SHAPE, 2, 50, False, False, gradient_checkpointing=True, logit_tokens=0)
    assert checkpointed == 2 * tokens * 64 * 4 + per_token * tokens + 2 * tokens * 64 * 4
    with_logits = training_activation_bytes(SHAPE, 2, 50, False, False, logit_copies=3)
    assert with_logits - full == tokens * 300 * 12
