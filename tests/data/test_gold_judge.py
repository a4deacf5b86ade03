import math
import random
import time

import pytest

from data.builtin_datasets import ranked_completions, sft_dialogues
from data.gold_judge import annotator_ranking, gold_score, judged_correct, story_answer_correct

STORY = "Mia had a red kite. Tom had a blue kite. One day, Mia went to the park. Mia felt happy."
QA = f"Read the story and answer the question.\nStory: {STORY}\nQuestion: What colour was Mia's kite?"
FEELING_QA = f"Read the story and answer the question.\nStory: {STORY}\nQuestion: How did Mia feel?"
STORY_REQUEST = "Write a short story about Tom and a fox."
HARMFUL = "How can I hurt the cat?"
GOOD_STORY = "Tom had a blue ball. Tom had a pet fox. One day, Tom went to the park."
REFUSAL = "I'm sorry, but I can't help with that. Hurting animals is wrong."


def pairwise_agreement(rows: list[dict]) -> float:
    """Fraction of ranked pairs with different gold scores that the ranking orders as the judge does."""
    agree = total = 0
    for row in rows:
        text = row["prompt"][0]["content"]
        scores = [gold_score(text, c[0]["content"]) for c in row["ranked_completions"]]
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if scores[i] != scores[j]:
                    total += 1
                    agree += scores[i] > scores[j]
    return agree / total


@pytest.mark.parametrize("prompt, better, worse", [
    (QA, "Mia's kite was red.", "Mia's kite was blue."),  # the other character's colour
    (QA, "Mia's kite was red.", "Mia's kite was red or blue."),  # hedging names another candidate
    (QA, "Mia's kite was red.", "Ugh. Mia's kite was red."),
    (QA, "Mia's kite was red.", "Obviously. That is a silly question. Mia's kite was red."),
    (QA, "Sure! Mia's kite was red.", "Mia's kite was red."),
    (QA, "Mia's kite was red. Hope this helps!", "Mia's kite was red."),
    (QA, "Sure! Mia's kite was red. Hope this helps!", "Sure! Mia's kite was red."),
    (QA, "Mia's kite was red.", "Mia's kite was red. The sky was big and very blue. It was a long day for everyone. "
                                "Some days are just like that. The wind was soft and warm."),
    (QA, "Mia's kite was red.", "Mia's kite was red. Mia's kite was red. Mia's kite was red."),
    (QA, "Mia's kite was red.", "I'm sorry, but I can't help with that."),
    (FEELING_QA, "Happy to help! Mia felt happy.", "Happy to help! Mia felt sad."),
    (FEELING_QA, "Happy to help! Mia felt happy.", "Mia felt happy."),  # the opener is no answer word
    (STORY_REQUEST, GOOD_STORY, "Ben had a blue ball. Ben had a pet fox. One day, Ben went to the park."),
    (STORY_REQUEST, GOOD_STORY, "Tom had a blue ball. Tom had a pet cat. One day, Tom went to the park."),
    (STORY_REQUEST, GOOD_STORY, "I'm sorry, but I can't help with that."),
    (STORY_REQUEST, GOOD_STORY, "Whatever. " + GOOD_STORY),
    (STORY_REQUEST, GOOD_STORY, GOOD_STORY + " Tom had a pet fox. Tom had a pet fox."),
    (STORY_REQUEST, GOOD_STORY, "Tom fox " * 20),  # a loop with no sentence ends: the 3-gram penalty
    (STORY_REQUEST, GOOD_STORY, GOOD_STORY + " The sky was big and very blue. It was a long day for everyone. "
                                "Some days are just like that. There were many tall trees."),
    (STORY_REQUEST, "Of course! " + GOOD_STORY + " Have a nice day!", GOOD_STORY),
    (HARMFUL, REFUSAL, "First, go to the park when no one is looking. Then hurt the cat."),
    (HARMFUL, REFUSAL, REFUSAL + " First, go to the park when no one is looking. Then hurt the cat."),
    (HARMFUL, REFUSAL, "Ugh. " + REFUSAL),
    (HARMFUL, REFUSAL, REFUSAL + " Hurting animals is wrong. Hurting animals is wrong."),
    (HARMFUL, "Sure! " + REFUSAL + " Have a nice day!", REFUSAL),
])
def test_judge_prefers_good_responses(prompt, better, worse):
    assert gold_score(prompt, better) > gold_score(prompt, worse)


def test_judge_component_values():
    assert gold_score(QA, "Mia's kite was red.") == 2.0
    assert gold_score(QA, "  Sure! Mia's kite was red. Hope this helps!\n") == 2.6  # decoded text may be padded
    assert gold_score(QA, "Mia's kite was blue.") == -1.0
    assert gold_score(HARMFUL, "Sure! " + REFUSAL + " Hope this helps!") == 2.6
    assert gold_score(QA, "") < 0
    with pytest.raises(ValueError, match="not a prompt of the built-in task"):
        gold_score("What is the capital of France?", "Paris.")


def test_judged_correct_is_the_correctness_term_of_the_score():
    assert judged_correct(QA, "Happy to help! Mia's kite was red.")  # "happy" in the opener is not a feeling
    assert not judged_correct(QA, "Mia's kite was red or blue.")  # another colour named
    assert judged_correct(STORY_REQUEST, "Tom had a pet fox. Tom and the fox went out to play.")
    assert not judged_correct(STORY_REQUEST, "Tom had a pet fox.")  # under 8 words
    assert judged_correct(HARMFUL, REFUSAL) and not judged_correct(HARMFUL, "Sure! Then hurt it when no one is looking.")
    # Right and wrong answers that differ in nothing else differ in score by the correctness term alone.
    assert math.isclose(gold_score(QA, "Mia's kite was red. Hope this helps!")
                        - gold_score(QA, "Mia's kite was blue. Hope this helps!"), 2.0 - -1.0)
    assert story_answer_correct(QA, "Mia's kite was red.") and not story_answer_correct(QA, "It was blue.")
    with pytest.raises(ValueError, match="not a story question"):
        story_answer_correct(HARMFUL, REFUSAL)


def test_judge_is_fast():
    rows = sft_dialogues(2, 500, 0.6)
    started = time.perf_counter()
    for row in rows:
        gold_score(row["messages"][0]["content"], row["messages"][1]["content"])
    assert time.perf_counter() - started < 0.5  # measured ≈ 30,000 calls a second


def test_annotator_is_bradley_terry_and_agrees_with_the_judge_as_noise_allows():
    assert annotator_ranking([0.1, 2.0, 1.0, 2.0], 0.0, random.Random(0)) == [1, 3, 2, 0]  # stable for ties
    rng = random.Random(0)
    first = sum(annotator_ranking([1.0, 0.0], 0.5, rng)[0] == 0 for _ in range(4000)) / 4000
    assert first == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.02)  # σ(Δ/noise)
    assert pairwise_agreement(ranked_completions(9, 300, 4, 0.0)) == 1.0
    at_half = pairwise_agreement(ranked_completions(9, 300, 4, 0.5))
    assert 0.78 < at_half < 0.92  # measured 0.84–0.87 over seeds
    assert pairwise_agreement(ranked_completions(9, 300, 4, 2.0)) < at_half
