"""pipeline/generation/padding.py: prompts left-padded, responses right-padded, positions over real tokens."""

import torch

from pipeline.generation.padding import left_pad


def test_left_pad_aligns_the_ends():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
