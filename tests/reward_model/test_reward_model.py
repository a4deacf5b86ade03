import pytest
import torch
from safetensors.torch import load_file

from data.formats import prompt_response_ids
from pipeline.generation.padding import pad_sequences
from reward_model.calibration import preference_calibration
from reward_model.losses import pairwise_accuracy, pairwise_loss
from reward_model.model import classifier_scores, load_reward_model, score_responses, score_token_ids
from reward_model.normalization import RewardNormalization


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


def test_preference_calibration_bins_both_orders_of_each_pair():
    log3 = torch.log(torch.tensor(3.0)).item()
    # σ of the score gaps: 0.75, 0.5, 0.25; the third pair's chosen response is in fact the worse one
    calibration = preference_calibration(torch.tensor([log3, 0.0, 0.0]), torch.tensor([0.0, 0.0, log3]),
                                         torch.tensor([True, True, False]), bins=2)
    low, high = calibration["bins"]
    # both orders: predicted (0.75, 0.5, 0.25, 0.25, 0.5, 0.75), observed (1, 1, 0, 0, 0, 1)
    assert (low["count"], low["mean_predicted"], low["observed"]) == (2, pytest.approx(0.25), 0.0)
    assert (high["count"], high["mean_predicted"], high["observed"]) == (4, pytest.approx(0.625), 0.75)
    assert (low["low"], low["high"], high["high"]) == (0.0, 0.5, 1.0)
    assert calibration["expected_calibration_error"] == pytest.approx(2 / 6 * 0.25 + 4 / 6 * 0.125)


def test_preference_calibration_against_the_labels_themselves():
    undecided = preference_calibration(torch.zeros(4), torch.zeros(4))  # p = 0.5, and each pair counts both ways
    assert undecided["expected_calibration_error"] == pytest.approx(0.0)
    assert [b["count"] for b in undecided["bins"]] == [0] * 5 + [8] + [0] * 4
    assert undecided["bins"][0]["mean_predicted"] is None and undecided["bins"][0]["observed"] is None
    confident = torch.full((4,), 20.0)
    assert preference_calibration(confident, torch.zeros(4))["expected_calibration_error"] == pytest.approx(0.0, abs=1e-6)
    half_wrong = preference_calibration(confident, torch.zeros(4), torch.tensor([True, False, True, False]))
    assert half_wrong["expected_calibration_error"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="3 chosen but 2 rejected"):
        preference_calibration(torch.zeros(3), torch.zeros(2))


def test_policy_and_reward_model_must_read_token_ids_alike():
    from data.tokenizer import train_bpe_tokenizer
    from pipeline.config.parsing import ConfigError
    from reward_model.model import require_same_vocabulary

    first = train_bpe_tokenizer(["Mia had a red kite."] * 20, 300)
    other = train_bpe_tokenizer(["Tom went to the park with a fox."] * 20, 300)
    require_same_vocabulary(first, first, "ppo")
    with pytest.raises(ConfigError, match="^ppo: the policy and the reward model use different tokenizers"):
        require_same_vocabulary(first, other, "ppo")
