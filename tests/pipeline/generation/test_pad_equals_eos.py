"""PPO's truncation and score placement when the tokenizer pads with its EOS (SmolLM2, Llama 3 via load_tokenizer):
the token values after a response cannot tell padding from EOS, the mask must."""

import torch

from pipeline.generation.sampling import cut_at_first_eos
from pipeline.rl.advantages import per_token_rewards
from pipeline.rl.masked import response_mask

EOS = 2


def test_truncation_and_the_score_stop_at_the_first_eos_when_pad_is_eos():
    sampled = torch.tensor([[5, 6, EOS, 7, EOS, 8],   # ends at 2; what follows is not the response
                            [5, EOS, EOS, EOS, EOS, EOS],  # generate padded a finished row with pad == EOS
                            [5, 6, 7, 8, 9, 10]])  # never ended
    responses, cut_mask = cut_at_first_eos(sampled, EOS, pad_token_id=EOS)
    assert responses.tolist() == [[5, 6, EOS, EOS, EOS, EOS], [5, EOS, EOS, EOS, EOS, EOS], [5, 6, 7, 8, 9, 10]]
    mask, last_index, contains_eos = response_mask(responses, EOS)
    assert torch.equal(mask, cut_mask)
    assert mask.sum(1).tolist() == [3, 2, 6] and last_index.tolist() == [2, 1, 5]
    assert contains_eos.tolist() == [True, True, False]
    rewards, _ = per_token_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 6), mask, last_index, kl_coef=0.1)
    assert rewards.tolist() == [[0, 0, 1, 0, 0, 0], [0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 3]]
