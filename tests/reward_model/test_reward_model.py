import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.tokenizer import train_bpe_tokenizer
from reward_model import (
    RewardNormalization, encode_dialogue, load_reward_model, pairwise_accuracy, pairwise_loss, score_responses,
    score_token_ids)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny causal LM saved as an SFT checkpoint would be."""
    path = tmp_path_factory.mktemp("sft")
    tokenizer = train_bpe_tokenizer(["Mia had a red kite. Sure! Hope this helps."] * 20, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_gives_one_output_head_on_the_sft_backbone(checkpoint):
    model, tokenizer = load_reward_model(checkpoint)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.score.weight.shape == (1, 64)


def test_scores_do_not_depend_on_padding_side(checkpoint):
    model, tokenizer = load_reward_model(checkpoint)
    model.eval()
    a, b = encode_dialogue(tokenizer, "Hi", "Sure! Mia had a red kite."), encode_dialogue(tokenizer, "Hi", "No.")
    assert a[-1] == tokenizer.eos_token_id
    width = max(len(a), len(b))
    right = torch.full((2, width), tokenizer.pad_token_id)
    left = right.clone()
    right_mask, left_mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for row, ids in enumerate((a, b)):
        right[row, : len(ids)], right_mask[row, : len(ids)] = torch.tensor(ids), 1
        left[row, width - len(ids):], left_mask[row, width - len(ids):] = torch.tensor(ids), 1
    with torch.no_grad():
        alone = torch.cat([score_token_ids(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                           for ids in (a, b)])
        assert torch.allclose(score_token_ids(model, right, right_mask), alone, atol=1e-5)
        assert torch.allclose(score_token_ids(model, left, left_mask), alone, atol=1e-5)
    texts = score_responses(model, tokenizer, ["Hi", [{"role": "user", "content": "Hi"}]],
                            ["Sure! Mia had a red kite.", "No."], batch_size=1)
    assert torch.allclose(texts, alone, atol=1e-5)


def test_pairwise_loss_and_accuracy():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected.item())
    assert pairwise_loss(chosen, rejected, margin=1.0).item() > pairwise_loss(chosen, rejected).item()
    assert pairwise_accuracy(chosen, rejected) == 0.5


def test_normalization_round_trip(tmp_path):
    normalization = RewardNormalization.from_scores(torch.tensor([1.0, 3.0]))
    assert torch.allclose(normalization.apply(torch.tensor([1.0, 3.0])), torch.tensor([-0.7071, 0.7071]), atol=1e-4)
    normalization.save(tmp_path)
    assert RewardNormalization.load(tmp_path) == normalization
    assert RewardNormalization.load(tmp_path / "none") == RewardNormalization(0.0, 1.0)
