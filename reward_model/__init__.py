"""The reward model: a causal LM's backbone with a scalar head, read at the last real token (the EOS).

The API the reward stage, PPO and the comparison report call: `load_reward_model`, `score_responses` (text),
`score_token_ids` (already tokenized, left or right padded), `classifier_scores` (through a wrapped model, in
training), `pairwise_loss`, `pairwise_accuracy`, `preference_calibration`, and
`RewardNormalization`, the mean/std of scores on SFT samples stored beside the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from data.formats import prompt_response_ids
from data.tokenizer import load_tokenizer

NORMALIZATION_FILE = "reward_normalization.json"


def load_reward_model(name_or_path: str | Path, trust_remote_code: bool = False
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A one-output sequence classifier in float32 (safetensors only) from a reward checkpoint, or from a causal
    LM such as the SFT model, whose backbone it keeps while the scalar head starts new (seed torch first)."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), num_labels=1, use_safetensors=True, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    # Batches of more than one row need a pad token in the config; the score is read by attention mask
    # (score_token_ids, classifier_scores), never by the classifier's search for it, which fails when pad == EOS.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def require_same_vocabulary(policy_tokenizer: PreTrainedTokenizerBase, reward_tokenizer: PreTrainedTokenizerBase,
                            where: str) -> None:
    """PPO and the comparison score the policy's token ids with the reward model as they are, without decoding:
    both must read them as the same tokens."""
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        from pipeline.config import ConfigError

        raise ConfigError(f"{where}: the policy and the reward model use different tokenizers; token ids are scored "
                          f"as sampled, so train the reward model from the policy's SFT checkpoint")


def score_token_ids(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] of tokenized prompt+response sequences, left or right padded: the head's output at the last
    position the mask keeps (the EOS), with positions counted over real tokens so left padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(-1)
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def classifier_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] through the classifier's own forward (DDP- or LoRA-wrapped, so gradients flow and sync as in
    training), read at the last position the attention mask keeps. The classifier's pooling reads the last
    token that is not the pad token instead, which is a position too early when pad == EOS."""
    head = next(m.score for m in model.modules() if isinstance(m, PreTrainedModel) and hasattr(m, "score"))
    per_position = []
    hook = head.register_forward_hook(lambda module, inputs, output: per_position.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(-1)
    return per_position[-1][torch.arange(len(last), device=last.device), last].squeeze(-1).float()


def right_padded(sequences: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token id lists padded on the right to the longest."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def score_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]],
                    responses: list[str], batch_size: int = 32) -> torch.Tensor:
    """Raw scores (float32 [N]) of each prompt (a user message or a conversation) answered by its response."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_responses: {len(prompts)} prompts but {len(responses)} responses")
    encoded = [prompt_response_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = [score_token_ids(model, *right_padded(encoded[start: start + batch_size], tokenizer.pad_token_id, device))
              for start in range(0, len(encoded), batch_size)]
    model.train(was_training)
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: torch.Tensor | float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry: −log σ(r_chosen − r_rejected − margin), averaged over pairs (weighted by `weights`, which
    sum to 1, when given)."""
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    losses = -F.logsigmoid(difference)
    return losses.mean() if weights is None else (losses * weights).sum()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores strictly higher (NaN for no pairs)."""
    return (chosen_scores > rejected_scores).float().mean().item() if len(chosen_scores) else float("nan")


def preference_calibration(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                           chosen_preferred: torch.Tensor | None = None, bins: int = 10) -> dict:
    """How well the Bradley–Terry probability σ(r_chosen − r_rejected) matches how often the chosen response is
    in fact preferred (`chosen_preferred`, bools; all true, i.e. the labels themselves, when None).

    Returns {"expected_calibration_error", "bins"}: the bins split [0, 1] into `bins` equal widths, each with
    its count, mean predicted probability and observed frequency (None when empty); the error is the
    count-weighted mean gap between the two. Every pair counts in both orders, (p, y) and (1 − p, 1 − y):
    a pair has no natural first response, and with labelled data listing the chosen one first every observed
    frequency would otherwise be 1. The diagram is then symmetric about (0.5, 0.5)."""
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"preference_calibration: {len(chosen_scores)} chosen but {len(rejected_scores)} rejected scores")
    if bins < 1:
        raise ValueError(f"preference_calibration: bins must be positive, got {bins}")
    predicted = torch.sigmoid((chosen_scores - rejected_scores).double())
    observed = torch.ones_like(predicted) if chosen_preferred is None else chosen_preferred.double()
    predicted, observed = torch.cat([predicted, 1 - predicted]), torch.cat([observed, 1 - observed])
    index = (predicted * bins).long().clamp(max=bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        mean_predicted = predicted[members].mean().item() if count else None
        frequency = observed[members].mean().item() if count else None
        if count:
            error += count / len(predicted) * abs(mean_predicted - frequency)
        table.append({"low": b / bins, "high": (b + 1) / bins, "count": count,
                      "mean_predicted": mean_predicted, "observed": frequency})
    return {"expected_calibration_error": error if len(predicted) else float("nan"), "bins": table}


@dataclass
class RewardNormalization:
    """Scores minus the mean, over the std, of the SFT policy's own samples: PPO then starts from rewards
    around 0 with unit spread, whatever offset and scale the Bradley–Terry loss (blind to both) left."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def save(self, directory: str | Path) -> None:
        (Path(directory) / NORMALIZATION_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> RewardNormalization:
        """The statistics stored in a reward checkpoint, or the identity (0, 1) when it has none."""
        path = Path(directory) / NORMALIZATION_FILE
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> RewardNormalization:
        """Mean and std of a batch of scores; a std of 1 when there are too few to measure one."""
        std = float(scores.float().std()) if len(scores) > 1 else 1.0
        return cls(float(scores.float().mean()), max(std, 1e-6))
