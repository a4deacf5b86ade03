import torch

from data.tokenizer import load_tokenizer
from pipeline.train.models import attention_for_precision, count_parameters, load_causal_lm


def test_bf16_on_cpu_switches_attention_to_matmuls_with_the_same_outputs(tiny_causal_lm):
    model = load_causal_lm(tiny_causal_lm, load_tokenizer(tiny_causal_lm)).eval()
    ids = torch.tensor([[5, 9, 11, 30, 7, 2]])
    with torch.no_grad():
        fused = model(input_ids=ids).logits
    assert attention_for_precision(model, bf16=True, device="cpu") is model
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fused, rtol=1e-4, atol=1e-5)


def test_attention_kept_in_fp32_and_on_gpus(tiny_causal_lm):
    for bf16, device in ((False, "cpu"), (True, "cuda")):
        model = load_causal_lm(tiny_causal_lm)
        attention_for_precision(model, bf16=bf16, device=device)
        assert model.config._attn_implementation == "sdpa"


def test_a_wrapped_model_is_switched_and_the_choice_is_not_saved(tiny_causal_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(tiny_causal_lm), LoraConfig(r=2, target_modules=["q_proj"]))
    attention_for_precision(model, bf16=True, device=torch.device("cpu"))
    assert model.get_base_model().config._attn_implementation == "eager"
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = load_causal_lm(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    assert count_parameters(reloaded) == count_parameters(merged)


def test_library_notices_a_user_cannot_act_on_are_hidden_and_only_those(tmp_path, caplog):
    import logging
    import warnings

    from accelerate import Accelerator
    from accelerate.utils import clean_state_dict_for_safetensors
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from pipeline.train.models import quiet_library_warnings

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        # TRL 1.16's SFTConfig and RewardConfig pass the name transformers 5 renamed, whatever the user set
        assert TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True).activation_checkpointing
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]

    with caplog.at_level(logging.WARNING):
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(tied)
        accelerator.save_state(tmp_path / "state")
        assert "Removed shared tensor" not in caplog.text
        shared = torch.zeros(3)
        clean_state_dict_for_safetensors({"encoder.weight": shared, "decoder.weight": shared})
        assert "Removed shared tensor {'decoder.weight'}" in caplog.text  # not a tied output embedding: still said
    accelerator.load_state(tmp_path / "state")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_lora_adapter_trains_only_its_targets(tiny_causal_lm):
    from data.tokenizer import load_tokenizer
    from pipeline.config.schema import PeftSection
    from pipeline.train.models import load_causal_lm, with_lora_adapter

    model = with_lora_adapter(load_causal_lm(tiny_causal_lm, load_tokenizer(tiny_causal_lm)),
                              PeftSection(r=4, target_modules=["q_proj"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "q_proj" in name for name in trainable)


def test_a_built_llama_takes_its_initial_weight_scale_from_the_config(tiny_causal_lm):
    from pipeline.config.schema import ModelSection
    from pipeline.train.models import build_llama_from_config

    tokenizer = load_tokenizer(tiny_causal_lm)
    stds = {}
    for scale in (0.02, 0.06):
        section = ModelSection(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                               initializer_range=scale)
        model = build_llama_from_config(section, tokenizer, seed=0)
        assert model.config.initializer_range == scale
        stds[scale] = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(stds[0.02] - 0.02) < 0.002 and abs(stds[0.06] - 0.06) < 0.006


def test_weight_decay_groups_decay_matrices_only_and_keep_the_order():
    from pipeline.train.models import weight_decay_groups

    layer, norm = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)
    parameters = [layer.weight, layer.bias, norm.weight, norm.bias]
    decayed, kept = weight_decay_groups(parameters, 0.1)
    assert decayed["weight_decay"] == 0.1 and decayed["params"] == [layer.weight]
    assert kept["weight_decay"] == 0.0 and kept["params"] == [layer.bias, norm.weight, norm.bias]
    assert weight_decay_groups(iter(parameters), 0.1)[0]["params"] == [layer.weight]  # a generator is read once
