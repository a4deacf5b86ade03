"""pipeline/train/final_save.py on one CPU process: what plain transformers loads from a final save is the trained
model, an adapter merged into a copy (never into the model that trains on), and under sharded engines the gathered
weights go through a fresh CPU copy of the architecture. The engine tier (tests/engines/) saves under ZeRO-3 and
FSDP2 for real."""

from __future__ import annotations

import pipeline.train.final_save as final_save
import pytest
import torch
from accelerate import Accelerator

from pipeline.train.engines import Engine
from pipeline.train.final_save import save_final_model
from tests.pipeline.train.test_engines import batch, tiny_policy_and_value


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_final_save_writes_the_policys_part_prefix_stripped_with_lora_merged(tmp_path, lora):
    """What a plain transformers load of final/ gives is the trained policy (its adapter merged), not the critic."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from data.tokenizer import train_bpe_tokenizer

    model = tiny_policy_and_value()
    if lora:
        model.policy = get_peft_model(model.policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    ids, mask, positions = batch()
    with torch.no_grad():
        expected = model.policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    tokenizer = train_bpe_tokenizer(["a small corpus for a tokenizer"] * 5, 260)
    save_final_model(accelerator, model, tokenizer, tmp_path / "final", part="policy")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        logits = saved(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in saved.named_parameters())
    if lora:  # merged into a copy: the policy keeps training with its adapter
        assert any("lora" in name for name, _ in accelerator.unwrap_model(model).policy.named_parameters())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_under_sharded_engines_the_gathered_weights_are_written_through_a_fresh_cpu_copy(monkeypatch, lora):
    """ZeRO-3 and FSDP2 processes hold shards, so the main process loads the gathered state dict into a copy of
    the architecture (its adapter too), tied weights tied, and refuses a state dict that does not fit."""
    from peft import LoraConfig, get_peft_model

    policy = tiny_policy_and_value().policy
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   init_lora_weights=False))
    state = {k: v.clone() for k, v in policy.state_dict().items() if not k.endswith("lm_head.weight")}
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(final_save, "engine_of", lambda accelerator: Engine("zero3"))
    copy = final_save.model_holding(state, policy, accelerator)
    assert copy is not policy
    assert all(torch.equal(value, copy.state_dict()[key]) for key, value in state.items())
    base = copy.get_base_model() if lora else copy
    assert base.lm_head.weight is base.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="do not fit the model: missing"):
        final_save.model_holding({k: v for k, v in state.items() if "layers.1." not in k}, policy, accelerator)
