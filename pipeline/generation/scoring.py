"""Forwards that read a policy's log-likelihood of given responses: positions and logits as PPO's scoring
forward computes them, only at the positions that predict response tokens."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.generation.padding import position_ids_of, prompt_response_batch
from pipeline.rl.masked import masked_sum
from pipeline.rl.logprobs import logprobs_of_tokens


def predicting_positions(sequences: torch.Tensor, context_length: int) -> torch.Tensor:
    """The positions whose logits predict the response tokens (each the position before its token), as the 1-D
    `logits_to_keep` of a transformers causal LM: the LM head runs on exactly these, and no [batch, length, vocab]
    logits are sliced afterwards (whose gradient would be another zero-filled tensor of that size)."""
    return torch.arange(context_length - 1, sequences.shape[1] - 1, device=sequences.device)


def response_logits(policy, sequences: torch.Tensor, attention_mask: torch.Tensor, context_length: int
                    ) -> torch.Tensor:
    """Logits that predict each response token (the position before it), for sequences whose responses start at
    column `context_length`. Only those positions go through the LM head: prompts are often longer than
    responses, and the head is a large share of a small model's work."""
    return policy(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_of(attention_mask),
                  logits_to_keep=predicting_positions(sequences, context_length)).logits


@torch.no_grad()
def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], temperature: float,
                      pad_token_id: int, batch_size: int = 32, description: str | None = None) -> list[float]:
    """log π(response | prompt) of each pair at the sampling temperature, batched, positions and logits as in
    PPO's scoring forward."""
    device = next(model.parameters()).device
    totals = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=description is None,
                      leave=False):
        sequences, attention_mask, mask = (t.to(device) for t in prompt_response_batch(
            prompts[start: start + batch_size], responses[start: start + batch_size], pad_token_id))
        context_length = sequences.shape[1] - mask.shape[1]
        logits = response_logits(model, sequences, attention_mask, context_length)
        logprobs = logprobs_of_tokens(logits, sequences[:, context_length:], temperature)
        totals += masked_sum(logprobs, mask, dim=1).tolist()
    return totals
