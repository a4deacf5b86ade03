"""The reward model: a causal LM's backbone with a scalar head, read at the last real token (the EOS).

The API the PPO stage and the comparison report call: `load_reward_model`, `score_responses` (text),
`score_token_ids` (already tokenized, left or right padded), `pairwise_loss`, `pairwise_accuracy`, and
`RewardNormalization`, the mean/std of scores on SFT samples stored beside the weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from data.tokenizer import load_tokenizer

NORMALIZATION_FILE = "reward_normalization.json"


def load_reward_model(name_or_path: str | Path, trust_remote_code: bool = False
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A one-output sequence classifier from a reward checkpoint, or from a causal LM (its head is then new)."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), num_labels=1, use_safetensors=True, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def score_token_ids(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of tokenized prompt+response sequences, read at the last position the mask keeps (the EOS),
    with positions counted over real tokens so that left padding changes nothing."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(-1)
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def encode_dialogue(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], response: str) -> list[int]:
    """Token ids of prompt + response with the chat template, the response ended by EOS."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


@torch.no_grad()
def score_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]],
                    responses: list[str], batch_size: int = 32) -> torch.Tensor:
    """Raw scores of (prompt, response) pairs, float32 [N]."""
    model.eval()
    encoded = [encode_dialogue(tokenizer, p, r) for p, r in zip(prompts, responses)]
    scores = []
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start: start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        scores.append(score_token_ids(model, ids, mask))
    return torch.cat(scores) if scores else torch.zeros(0)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Bradley–Terry: −log σ(r_chosen − r_rejected − margin), averaged."""
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores higher."""
    return (chosen_scores > rejected_scores).float().mean().item() if len(chosen_scores) else float("nan")


@dataclass
class RewardNormalization:
    """Scores minus the mean, over the std, of SFT samples: PPO then starts from rewards around 0 (N+ details)."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def save(self, directory: Path) -> None:
        (Path(directory) / NORMALIZATION_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> RewardNormalization:
        """The stored statistics, or the identity when the checkpoint has none."""
        path = Path(directory) / NORMALIZATION_FILE
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> RewardNormalization:
        return cls(float(scores.mean()), float(scores.std().clamp(min=1e-6)) if len(scores) > 1 else 1.0)
