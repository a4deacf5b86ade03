"""How token id lists become batches: prompts left-padded (every prompt ends where generation starts),
responses right-padded, positions counted over real tokens, and the last real token of each row."""

from __future__ import annotations

import torch


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the left to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence):] = 1
    return ids, mask


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate` does with left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def prompt_response_batch(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, attention_mask, response mask) laid out as PPO lays out a rollout: prompts left-padded so that
    every response starts in the same column, responses right-padded."""
    queries, query_mask = left_pad(prompts, pad_token_id)
    answers, answer_mask = right_padded(responses, pad_token_id)
    return torch.cat([queries, answers], 1), torch.cat([query_mask, answer_mask], 1), answer_mask.bool()


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
