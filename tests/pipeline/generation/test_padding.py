"""pipeline/generation/padding.py: prompts left-padded, responses right-padded, positions over real tokens."""

import torch

from pipeline.generation.padding import last_real_positions, pad_sequences, position_ids_of


def test_left_pad_aligns_the_ends():
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_right_padding_aligns_the_starts_and_last_real_positions_find_each_end_on_either_side():
    sequences = [[5, 6, 7], [8]]
    right, right_mask = pad_sequences(sequences, 0, "right")
    assert right.tolist() == [[5, 6, 7], [8, 0, 0]] and right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left, left_mask = pad_sequences(sequences, 0, "left")
    assert last_real_positions(right_mask).tolist() == [2, 0]
    assert last_real_positions(left_mask).tolist() == [2, 2]
    # Positions count real tokens only: a left-padded row starts at position 0 where its first token is.
    assert position_ids_of(left_mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert position_ids_of(right_mask).tolist() == [[0, 1, 2], [0, 0, 0]]
