"""How token id lists become batches: prompts left-padded (every prompt ends where generation starts),
responses right-padded, positions counted over real tokens, and the last real token of each row."""

from __future__ import annotations

from typing import Literal

import torch


def pad_sequences(sequences: list[list[int]], pad_token_id: int, side: Literal["left", "right"],
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask) of token id lists padded to the longest: on the left for prompts (each ends
    where generation starts), on the right for responses and whole sequences."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        mask[row, columns] = 1
    return ids.to(device), mask.to(device)


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate` does with left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The index of each row's last position the mask keeps (where a sequence-level score is read), left or right
    padded alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


def prompt_response_batch(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, attention_mask, response mask) laid out as PPO lays out a rollout: prompts left-padded so that
    every response starts in the same column, responses right-padded."""
    queries, query_mask = pad_sequences(prompts, pad_token_id, "left")
    answers, answer_mask = pad_sequences(responses, pad_token_id, "right")
    return torch.cat([queries, answers], 1), torch.cat([query_mask, answer_mask], 1), answer_mask.bool()
