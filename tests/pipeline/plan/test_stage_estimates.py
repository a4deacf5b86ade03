"""Each stage's peak: what each engine shards, what LoRA shrinks, PPO's model count, the CPU runtime."""

import pytest

from pipeline.plan.model_shape import causal_lm_parameters, lora_parameters, model_shape, reward_model_parameters
from pipeline.plan.model_state_memory import gathered_weight_bytes
from pipeline.plan.stage_estimates import CPU_RUNTIME_BYTES, builtin_corpus_bytes, runtime_bytes, stage_estimate
from tests.pipeline.plan.memory_plan_examples import BIG, CPU, gpus, smoke


def test_engines_shard_what_they_should():
    config = smoke(*BIG)
    for stage in ("pretrain", "sft"):
        one, four = (stage_estimate(config, stage, gpus(n, 80, "ddp")) for n in (1, 4))
        assert (four.weights, four.optimizer_states) == (one.weights, one.optimizer_states)
        assert four.gradients == 2 * one.gradients and four.activations == one.activations
        zero2 = [stage_estimate(config, stage, gpus(n, 80, "zero2")) for n in (1, 4)]
        assert zero2[1].weights == zero2[0].weights
        assert zero2[1].optimizer_states == pytest.approx(zero2[0].optimizer_states / 4, rel=1e-6)
        assert zero2[1].gradients == pytest.approx(zero2[0].gradients / 4, rel=1e-6)
        for engine in ("zero3", "fsdp2"):
            one, four = (stage_estimate(config, stage, gpus(n, 80, engine)) for n in (1, 4))
            gathered = gathered_weight_bytes(model_shape(config), gpus(1, 80, engine), bf16=True)
            assert four.weights - gathered == pytest.approx((one.weights - gathered) / 4, rel=1e-6)
            assert four.optimizer_states == pytest.approx(one.optimizer_states / 4, rel=1e-6)
    # frozen models too: the reference and the reward model shrink with the trainable ones under zero3
    ppo_zero3 = [stage_estimate(config, "ppo", gpus(n, 80, "zero3")) for n in (1, 8)]
    assert ppo_zero3[1].optimizer_states == pytest.approx(ppo_zero3[0].optimizer_states / 8, rel=1e-6)


def test_lora_shrinks_gradients_and_optimizer_states_only():
    full = stage_estimate(smoke(), "sft", CPU)
    lora = stage_estimate(smoke("sft.peft={r: 8}"), "sft", CPU)
    adapters = lora_parameters(model_shape(smoke()), {"r": 8})
    assert (lora.gradients, lora.optimizer_states) == (4 * adapters, 8 * adapters)
    assert full.gradients == 4 * causal_lm_parameters(model_shape(smoke()))
    assert lora.weights == full.weights + 4 * adapters


def test_ppo_holds_four_models_three_with_lora():
    shape = model_shape(smoke())
    lm, classifier = causal_lm_parameters(shape), reward_model_parameters(shape)
    full = stage_estimate(smoke(), "ppo", CPU)
    assert full.phase == "update"
    assert full.weights == 4 * (2 * lm + 2 * classifier)  # policy, reference, critic, reward model in fp32
    assert full.optimizer_states == 8 * (lm + classifier)
    assert "reference" in full.models
    lora = stage_estimate(smoke("ppo.peft={r: 8}"), "ppo", CPU)
    adapters = lora_parameters(shape, {"r": 8})
    assert lora.weights == 4 * (lm + adapters + 2 * classifier)  # no reference: the policy with its adapter off
    assert lora.optimizer_states == 8 * (adapters + classifier)
    assert "reference" not in lora.models


def test_cpu_runtime_counts_the_measured_baseline_and_the_builtin_corpus():
    small, large = smoke("data.builtin.pretrain_stories=1000"), smoke("data.builtin.pretrain_stories=4000")
    assert builtin_corpus_bytes(large) == 4 * builtin_corpus_bytes(small) > 0
    assert runtime_bytes("pretrain", CPU, large) == CPU_RUNTIME_BYTES["pretrain"] + builtin_corpus_bytes(large)
    assert runtime_bytes("sft", CPU, large) == CPU_RUNTIME_BYTES["sft"]
    assert runtime_bytes("pretrain", gpus(1, 80), large) == 0  # host memory, not the GPU's
