"""The reward model: a causal LM's backbone with a scalar head, read at the last real token (the EOS).

The API the reward stage, PPO and the comparison report call: `load_reward_model`, `score_responses` (text),
`score_token_ids` (already tokenized, left or right padded), `classifier_scores` (through a wrapped model, in
training), `pairwise_loss`, `pairwise_accuracy`, `preference_calibration`, and
`RewardNormalization`, the mean/std of scores on SFT samples stored beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from data.formats import prompt_response_ids
from data.tokenizer import load_tokenizer
from pipeline.generation.padding import last_real_positions, pad_sequences, position_ids_of, prompt_response_batch


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
        from pipeline.config.parsing import ConfigError

        raise ConfigError(f"{where}: the policy and the reward model use different tokenizers; token ids are scored "
                          f"as sampled, so train the reward model from the policy's SFT checkpoint")


def score_token_ids(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores [B] of tokenized prompt+response sequences, left or right padded: the head's output at the last
    position the mask keeps (the EOS), with positions counted over real tokens so left padding changes nothing."""
    position_ids = position_ids_of(attention_mask)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    last = last_real_positions(attention_mask)
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
    last = last_real_positions(attention_mask)
    return per_position[-1][torch.arange(len(last), device=last.device), last].squeeze(-1).float()


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
    scores = [score_token_ids(model, *pad_sequences(encoded[start: start + batch_size], tokenizer.pad_token_id, "right", device=device))
              for start in range(0, len(encoded), batch_size)]
    model.train(was_training)
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


@torch.no_grad()
def reward_scores(reward_model, prompts: list[list[int]], responses: list[list[int]], pad_token_id: int,
                  batch_size: int = 32, description: str | None = None) -> torch.Tensor:
    """Raw reward-model scores (float32 [N], on the CPU) of prompt + response token ids, as PPO scores its
    rollouts: no decode and re-encode, no EOS added, read at the last real token."""
    device = next(reward_model.parameters()).device
    scores = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=description is None,
                      leave=False):
        sequences, attention_mask, _ = prompt_response_batch(prompts[start: start + batch_size],
                                                             responses[start: start + batch_size], pad_token_id)
        scores.append(score_token_ids(reward_model, sequences.to(device), attention_mask.to(device)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
