"""What the policy-gradient tests build their hand-made batches from: token ids, NaN, and padding filled with
garbage that must never reach a result."""

from __future__ import annotations

import torch

EOS, PAD = 2, 0
NAN = float("nan")


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def poisoned(values: torch.Tensor, mask: torch.Tensor, garbage: float) -> torch.Tensor:
    """`values` with every padding position replaced by garbage (NaN, 1e9, ...)."""
    return values.masked_fill(~mask, garbage)
