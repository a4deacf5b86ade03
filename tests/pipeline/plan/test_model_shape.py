"""Parameter counts of the decoder, the reward model and LoRA adapters, by hand and against transformers and
peft; the shape read from the model section and from a checkpoint."""

import pytest

from pipeline.config.parsing import ConfigError
from pipeline.plan.model_shape import (
    ModelShape, causal_lm_parameters, decoder_layer_parameters, lora_parameters, model_shape, reward_model_parameters)
from tests.pipeline.plan.memory_plan_examples import SHAPE, smoke


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
    from transformers import (
        LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM)

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
