import torch

from data.tokenizer import load_tokenizer
from pipeline.models import attention_for_precision, count_parameters, load_causal_lm


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
