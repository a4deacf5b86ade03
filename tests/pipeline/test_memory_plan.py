"""The memory planner: exact parameter and state bytes for small shapes, what each engine shards, LoRA and PPO's
model count, refusal of a run that cannot fit, and knobs that fit when recomputed."""

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.memory_plan import (
    GIB, Hardware, ModelShape, accelerate_launch_settings, available_ram_bytes, causal_lm_parameters,
    check_run_fits, config_with_overrides, decoder_layer_parameters, format_bytes, format_plan, frozen_model_bytes,
    gathered_weight_bytes, kv_cache_bytes, knobs_that_fit, layer_activation_bytes_per_token, lora_parameters,
    machine_hardware, model_shape, plan_run, ppo_sequence_lengths, reward_model_parameters, stage_estimate,
    trainable_model_bytes, training_activation_bytes)
from tests.helpers import REPO, SMOKE

# 2 layers, width 64, 4 heads of 16 (2 kv heads), SwiGLU 128, vocabulary 300
SHAPE = ModelShape(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=128)
CPU = Hardware("cpu", 1, 24 * GIB)
# A 1.2B-parameter Llama: too big for the small devices below, big enough for knobs to matter.
BIG = ["model.num_hidden_layers=24", "model.hidden_size=2048", "model.intermediate_size=5632",
       "model.num_attention_heads=16"]


def smoke(*overrides):
    return load_config(SMOKE, list(overrides))


def gpus(count, gib, engine="ddp"):
    return Hardware("cuda", count, int(gib * GIB), engine)


def test_parameter_counts_by_hand():
    # q 64·64, k and v 64·32 each, o 64·64, gate/up/down 64·128 each, two norms of 64
    assert decoder_layer_parameters(SHAPE) == 4096 + 2 * 2048 + 4096 + 3 * 8192 + 2 * 64 == 36_992
    assert causal_lm_parameters(SHAPE) == 300 * 64 + 2 * 36_992 + 64 == 93_248  # tied head
    assert causal_lm_parameters(ModelShape(**{**SHAPE.__dict__, "tie_word_embeddings": False})) == 93_248 + 300 * 64
    assert reward_model_parameters(SHAPE) == 93_248 + 64
    # LoRA r=8 on q, v: 8·(64+64) + 8·(64+32) per layer
    assert lora_parameters(SHAPE, {"r": 8, "target_modules": ["q_proj", "v_proj"]}) == 2 * (1024 + 768)


def test_parameter_counts_match_transformers_and_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

    def count(model, trainable_only=False):
        return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    for tied in (True, False):
        shape = ModelShape(**{**SHAPE.__dict__, "tie_word_embeddings": tied})
        assert causal_lm_parameters(shape) == count(LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=tied)))
    assert reward_model_parameters(SHAPE) == count(LlamaForSequenceClassification(LlamaConfig(**sizes, num_labels=1)))
    qwen = ModelShape(**{**SHAPE.__dict__, "qkv_bias": True})  # Qwen2 has q/k/v biases without saying so
    assert causal_lm_parameters(qwen) == count(Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True)))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapted = get_peft_model(LlamaForCausalLM(LlamaConfig(**sizes)), LoraConfig(r=4, target_modules=targets))
    assert lora_parameters(SHAPE, {"r": 4, "target_modules": targets}) == count(adapted, trainable_only=True)
    with pytest.raises(ConfigError, match="c_attn"):
        lora_parameters(SHAPE, {"r": 4, "target_modules": ["c_attn"]})


def test_shape_from_the_model_section_and_from_a_checkpoint(tiny_causal_lm):
    from transformers import AutoModelForCausalLM

    assert model_shape(smoke()) == ModelShape(2, 64, 176, 4, 4, 16, 512, 256)
    config = smoke(f"model.name_or_path={tiny_causal_lm}", "run.stages=[sft]")
    shape = model_shape(config)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    assert causal_lm_parameters(shape) == sum(p.numel() for p in model.parameters())
    assert (shape.num_hidden_layers, shape.hidden_size, shape.max_position_embeddings) == (2, 64, 128)


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


def test_smoke_and_default_presets_fit_this_machine():
    for preset in ("smoke", "default"):
        config = load_config(REPO / "configs" / f"{preset}.yaml")
        check_run_fits(config)
        check_run_fits(config, Hardware("cpu", 1, 24 * GIB))  # a CI machine of this size
        assert all(plan.fits for plan in plan_run(config, Hardware("cpu", 2, 8 * GIB)))


def test_a_run_that_cannot_fit_is_refused_in_one_line():
    config = smoke(*BIG)
    with pytest.raises(ConfigError) as refusal:
        check_run_fits(config, gpus(1, 8))
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("pretrain: needs ") and "more than the 6.3 GiB usable" in message
    with pytest.raises(ConfigError, match=r"^pretrain: needs .* GiB RAM available"):
        check_run_fits(config, Hardware("cpu", 1, 8 * GIB))


def test_rlhf_plan_prints_the_table_and_exits_1_when_a_stage_does_not_fit(capsys):
    assert main(["plan", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Planning for CPU, 1 process") and out.count(" yes") == 4
    assert main(["plan", str(SMOKE), *BIG, "--gpus", "2", "--gpu-memory", "24"]) == 1
    out = capsys.readouterr().out
    assert "pretrain does not fit" in out and "zero3 on 2 GPUs → " in out and "(--engine zero3)" in out
    assert main(["plan", str(SMOKE), "--gpus", "0", "--gpu-memory", "24"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus: must be at least 1, got 0"


def test_rlhf_run_refuses_before_writing_anything(tmp_path, capsys):
    # 24 layers of width 8192: ~20B parameters, 320 GB of weights and AdamW states, on no machine's RAM
    huge = ["model.num_hidden_layers=24", "model.hidden_size=8192", "model.intermediate_size=22016",
            "model.num_attention_heads=64"]
    assert main(["run", str(SMOKE), f"run.output_dir={tmp_path}", *huge]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: pretrain: needs ") and "\n" not in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage, hardware", [
    ("pretrain", gpus(2, 24)), ("sft", gpus(2, 24)), ("sft", gpus(1, 12)), ("reward", gpus(1, 24)),
    ("ppo", gpus(1, 40)), ("ppo", gpus(2, 64)), ("sft", Hardware("cpu", 1, 12 * GIB))])
def test_suggested_knobs_fit_when_recomputed(stage, hardware):
    config = smoke(*BIG, "sft.max_length=256", "reward.max_length=256")
    shape = model_shape(config)
    assert stage_estimate(config, stage, hardware, shape).total > hardware.usable_bytes
    knobs = knobs_that_fit(config, stage, hardware, shape)
    assert knobs, f"no knob for {stage} on {hardware}"
    for knob in knobs:
        changed = config_with_overrides(config, knob.overrides)
        on = Hardware(hardware.kind, knob.devices or hardware.devices, hardware.memory_bytes,
                      knob.engine or hardware.engine)
        recomputed = stage_estimate(changed, stage, on, shape)
        assert recomputed.total == knob.total <= on.usable_bytes, knob.describe()


def test_micro_batch_knob_keeps_the_effective_batch():
    config = smoke(*BIG)
    knobs = knobs_that_fit(config, "sft", gpus(1, 32), model_shape(config))
    (micro,) = [k for k in knobs if k.label.startswith("sft.per_device_train_batch_size")]
    before, after = config.sft, config_with_overrides(config, micro.overrides).sft
    assert after["per_device_train_batch_size"] < before["per_device_train_batch_size"]
    assert (after["per_device_train_batch_size"] * after["gradient_accumulation_steps"]
            == before["per_device_train_batch_size"] * (before.get("gradient_accumulation_steps") or 1))


def test_hardware_from_flags_accelerate_configs_and_this_machine():
    accelerate = REPO / "configs" / "accelerate"
    assert accelerate_launch_settings(None) == (1, "ddp")
    assert accelerate_launch_settings(str(accelerate / "deepspeed_zero3.yaml")) == (8, "zero3")
    assert accelerate_launch_settings(str(accelerate / "deepspeed_zero2.yaml")) == (8, "zero2")
    assert accelerate_launch_settings(str(accelerate / "fsdp.yaml")) == (8, "fsdp2")
    assert accelerate_launch_settings(str(accelerate / "cpu_ddp.yaml")) == (2, "ddp")
    config = smoke(f"run.accelerate_config={accelerate / 'deepspeed_zero3.yaml'}")
    assert machine_hardware(config, gpu_memory_gib=80) == Hardware("cuda", 8, 80 * GIB, "zero3")
    assert machine_hardware(config, gpus=2, gpu_memory_gib=80, engine="fsdp2").engine == "fsdp2"
    import torch

    if not torch.cuda.is_available():
        here = machine_hardware(smoke())
        assert here.kind == "cpu" and here.devices == 1 and 0 < here.memory_bytes <= available_ram_bytes() * 1.5
        with pytest.raises(ConfigError, match="--gpus: this machine has no GPU"):
            machine_hardware(smoke(), gpus=2)


def test_format_plan_and_bytes():
    assert (format_bytes(3 * GIB // 2), format_bytes(5 * 1024 ** 2), format_bytes(2048)) == ("1.5 GiB", "5 MiB", "2 KiB")
    config = smoke()
    text = format_plan(plan_run(config, CPU), CPU)
    header = text.splitlines()[1].split()
    assert header[:3] == ["stage", "peak", "at"] and header[-2:] == ["total", "fits"]
    assert "ppo: policy 133k trainable + critic 134k trainable + reference 133k + reward 134k" in text


def test_cpu_runtime_counts_the_measured_baseline_and_the_builtin_corpus():
    from pipeline.memory_plan import CPU_RUNTIME_BYTES, builtin_corpus_bytes, runtime_bytes

    small, large = smoke("data.builtin.pretrain_stories=1000"), smoke("data.builtin.pretrain_stories=4000")
    assert builtin_corpus_bytes(large) == 4 * builtin_corpus_bytes(small) > 0
    assert runtime_bytes("pretrain", CPU, large) == CPU_RUNTIME_BYTES["pretrain"] + builtin_corpus_bytes(large)
    assert runtime_bytes("sft", CPU, large) == CPU_RUNTIME_BYTES["sft"]
    assert runtime_bytes("pretrain", gpus(1, 80), large) == 0  # host memory, not the GPU's
