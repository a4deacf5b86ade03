"""PPO's models (pipeline/ppo/models.py): the critic starts in the units of PPO's rewards, and its folded head is
what a checkpoint saves and a resume loads."""

import torch

from pipeline.config.loading import load_config
from pipeline.generation.padding import pad_sequences, position_ids_of
from pipeline.ppo.models import ValueModel, build_critic
from tests.helpers import SMOKE


def test_critic_starts_at_the_normalised_score_of_the_reward_model(tiny_causal_lm, tmp_path):
    """At step 0 the critic's value at each response's EOS is (score − μ)/σ, the reward PPO gives that sequence,
    not the raw score; the folded head (bias included) is what a checkpoint saves and a resume loads."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.rl.masked import response_mask
    from reward_model.model import load_reward_model, score_token_ids
    from reward_model.normalization import RewardNormalization

    torch.manual_seed(0)
    reward_model, tokenizer = load_reward_model(tiny_causal_lm)
    reward_dir = tmp_path / "reward"
    reward_model.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    normalization = RewardNormalization(mean=0.7, std=2.5)
    normalization.save(reward_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    queries, query_mask = pad_sequences([[5, 6, 7], [8], [9, 10]], pad, "left")
    responses = torch.tensor([[11, 12, eos, pad], [13, eos, pad, pad], [14, 15, 16, 17]])  # the last never ends
    mask, last_index, _ = response_mask(responses, eos)
    sequences, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
    score_position = queries.shape[1] + last_index
    rows = torch.arange(3)
    reward_model = load_reward_model(reward_dir)[0].eval()

    config = load_config(SMOKE)
    critic = build_critic(config, str(tiny_causal_lm), reward_dir, tokenizer).eval()
    with torch.no_grad():
        raw = score_token_ids(reward_model, sequences, attention_mask)
        values = critic(sequences, attention_mask, position_ids_of(attention_mask))
    assert (normalization.apply(raw) - raw).abs().min() > 0.1  # a critic left in raw units fails below
    torch.testing.assert_close(values[rows, score_position], normalization.apply(raw), rtol=1e-5, atol=1e-6)

    resumed = ValueModel(AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1)).eval()
    resumed.load_state_dict(critic.state_dict())  # strict: the head's bias is part of the state
    with torch.no_grad():
        assert torch.equal(resumed(sequences, attention_mask, position_ids_of(attention_mask)), values)

    config.ppo.normalize_reward = False  # PPO is rewarded with raw scores then: so is the critic
    raw_critic = build_critic(config, str(tiny_causal_lm), reward_dir, tokenizer).eval()
    with torch.no_grad():
        raw_values = raw_critic(sequences, attention_mask, position_ids_of(attention_mask))
    torch.testing.assert_close(raw_values[rows, score_position], raw, rtol=1e-5, atol=1e-6)
