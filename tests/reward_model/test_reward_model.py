import pytest
import torch
from safetensors.torch import load_file

from data.formats import prompt_response_ids
from reward_model import (
    RewardNormalization, load_reward_model, pairwise_accuracy, pairwise_loss, right_padded, score_responses,
    score_token_ids)


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
    right, right_mask = right_padded(sequences, tokenizer.pad_token_id)
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


def test_pairwise_loss_margin_weights_and_accuracy():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    logsigmoid = torch.nn.functional.logsigmoid
    expected = -(logsigmoid(torch.tensor(2.0)) + logsigmoid(torch.tensor(-1.0))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected.item())
    with_margin = -(logsigmoid(torch.tensor(1.0)) + logsigmoid(torch.tensor(-2.0))) / 2
    assert pairwise_loss(chosen, rejected, margin=1.0).item() == pytest.approx(with_margin.item())
    weighted = pairwise_loss(chosen, rejected, weights=torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(-logsigmoid(torch.tensor(2.0)).item())
    assert pairwise_accuracy(chosen, rejected) == 0.5
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0  # a tie is not a win


def test_normalization_round_trip(tmp_path):
    normalization = RewardNormalization.from_scores(torch.tensor([1.0, 3.0]))
    assert torch.allclose(normalization.apply(torch.tensor([1.0, 3.0])), torch.tensor([-0.7071, 0.7071]), atol=1e-4)
    normalization.save(tmp_path)
    assert (tmp_path / "reward_normalization.json").is_file()
    assert RewardNormalization.load(tmp_path) == normalization
    assert RewardNormalization.load(tmp_path / "none") == RewardNormalization(0.0, 1.0)
