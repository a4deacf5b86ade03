"""The reward model: a causal LM's backbone with a scalar head, read at the last real token (the EOS).

    model.py          loading, scoring token ids or text (as PPO and the comparison score), scores in training
    losses.py         the Bradley–Terry pairwise loss and accuracy
    calibration.py    how well its preference probabilities match how often it is right
    normalization.py  the mean/std of its scores on SFT samples, stored beside the weights
"""

from reward_model.calibration import preference_calibration
from reward_model.losses import pairwise_accuracy, pairwise_loss
from reward_model.model import (
    classifier_scores, load_reward_model, require_same_vocabulary, reward_scores, score_responses, score_token_ids)
from reward_model.normalization import NORMALIZATION_FILE, RewardNormalization

__all__ = ["NORMALIZATION_FILE", "RewardNormalization", "classifier_scores", "load_reward_model", "pairwise_accuracy",
           "pairwise_loss", "preference_calibration", "require_same_vocabulary", "reward_scores", "score_responses",
           "score_token_ids"]
