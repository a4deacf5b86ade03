"""reward_model/model.py: loading from an SFT checkpoint, and scores read at the EOS however the batch is padded."""

import pytest
import torch
from safetensors.torch import load_file

from data.formats import prompt_response_ids
from pipeline.generation.padding import pad_sequences
from reward_model.model import classifier_scores, load_reward_model, score_responses, score_token_ids


def test_load_keeps_the_sft_backbone_and_adds_one_output_head(tiny_causal_lm):
    model, tokenizer = load_reward_model(tiny_causal_lm)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.score.weight.shape == (1, 64)
    causal = load_file(str(tiny_causal_lm / "model.safetensors"))
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, causal["model.layers.1.mlp.up_proj.weight"])


def test_scores_read_the_eos_whatever_the_padding_side(tiny_causal_lm):
    model, tokenizer = load_reward_model(tiny_causal_lm)
    model.eval()
    sequences = [prompt_response_ids(tokenizer, "Hi", "Sure! Mia had a red kite."), prompt_response_ids(tokenizer, "Hi", "No.")]
    width = max(map(len, sequences))
    right, right_mask = pad_sequences(sequences, tokenizer.pad_token_id, "right")
    left = torch.stack([torch.tensor([tokenizer.pad_token_id] * (width - len(s)) + s) for s in sequences])
    left_mask = torch.stack([torch.tensor([0] * (width - len(s)) + [1] * len(s)) for s in sequences])
    with torch.no_grad():
        alone = torch.cat([score_token_ids(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in sequences])
        assert torch.allclose(score_token_ids(model, right, right_mask), alone, atol=1e-5)
        assert torch.allclose(score_token_ids(model, left, left_mask), alone, atol=1e-5)
        # the classifier's own pooling (what training goes through) reads the same position on right padding
        assert torch.allclose(model(input_ids=right, attention_mask=right_mask).logits.squeeze(-1), alone, atol=1e-5)
    texts = score_responses(model, tokenizer, ["Hi", [{"role": "user", "content": "Hi"}]],
                            ["Sure! Mia had a red kite.", "No."], batch_size=1)
    assert texts.dtype == torch.float32 and texts.shape == (2,)
    assert torch.allclose(texts, alone, atol=1e-5)


def test_training_scores_read_the_eos_when_pad_is_eos(tiny_causal_lm):
    """With pad == EOS (SmolLM2, Llama 3 fine-tunes) the classifier's own pooling stops one token short of the
    EOS; classifier_scores reads the EOS, also through a LoRA wrapper, and gradients reach the head."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_reward_model(tiny_causal_lm)
    model.config.pad_token_id = tokenizer.eos_token_id
    sequences = [prompt_response_ids(tokenizer, "Hi", "Sure! Mia had a red kite."), prompt_response_ids(tokenizer, "Hi", "No.")]
    ids, mask = pad_sequences(sequences, tokenizer.eos_token_id, "right")
    model.eval()
    with torch.no_grad():
        alone = torch.cat([score_token_ids(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in sequences])
        assert torch.allclose(classifier_scores(model, ids, mask), alone, atol=1e-5)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits.squeeze(-1), alone, atol=1e-3)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    scores = classifier_scores(wrapped, ids, mask)
    assert torch.allclose(scores, alone, atol=1e-5)  # LoRA's B starts at 0: the same function
    scores.sum().backward()
    head = next(p for name, p in wrapped.named_parameters() if "score" in name and p.requires_grad)
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_policy_and_reward_model_must_read_token_ids_alike():
    from data.tokenizer import train_bpe_tokenizer
    from pipeline.config.parsing import ConfigError
    from reward_model.model import require_same_vocabulary

    first = train_bpe_tokenizer(["Mia had a red kite."] * 20, 300)
    other = train_bpe_tokenizer(["Tom went to the park with a fox."] * 20, 300)
    require_same_vocabulary(first, first, "ppo")
    with pytest.raises(ConfigError, match="^ppo: the policy and the reward model use different tokenizers"):
        require_same_vocabulary(first, other, "ppo")
