"""bench/reward_hh.py's floor: the accuracy of preferring the longer response."""

import math

from data.formats import PreferencePair
from reward_hh import longer_response_accuracy


class WordTokenizer:
    """One token per word: lengths a reader can count."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [text.split() for text in texts]}


def test_longer_chosen_counts_as_right_equal_lengths_as_half():
    prompt = [{"role": "user", "content": "Hi"}]
    pairs = [PreferencePair(prompt, "a b c", "a", 0),  # longer chosen: right
             PreferencePair(prompt, "a", "a b", 1),  # shorter chosen: wrong
             PreferencePair(prompt, "a b", "c d", 2)]  # a tie: half
    assert longer_response_accuracy(pairs, WordTokenizer()) == 1.5 / 3
    assert math.isnan(longer_response_accuracy([], WordTokenizer()))
