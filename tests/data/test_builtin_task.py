import json
import random
import statistics

import pytest

from data.builtin_task import (
    BuiltinTaskConfig, TASK_FAMILIES, annotator_ranking, core_response, gold_score, pretraining_stories, prompts,
    question_answer, ranked_completions, sft_dialogues, story_facts, write_builtin_task)

QA = ("Read the story and answer the question.\nStory: Mia had a red kite. Mia had a pet fox. "
      "One day, Mia went to the park. Mia felt happy.\nQuestion: What colour was Mia's kite?")


def test_generators_are_deterministic_from_the_seed():
    assert pretraining_stories(1, 50) == pretraining_stories(1, 50) != pretraining_stories(2, 50)
    assert sft_dialogues(3, 30, 0.6) == sft_dialogues(3, 30, 0.6) != sft_dialogues(4, 30, 0.6)
    assert ranked_completions(5, 10, 4, 0.5) == ranked_completions(5, 10, 4, 0.5)
    assert prompts(6, 20) == prompts(6, 20) != prompts(7, 20)


def test_corpus_can_reach_a_million_tokens_quickly():
    stories = pretraining_stories(0, 2000)
    words = sum(len(s.split()) for s in stories) / len(stories)
    assert 15 < words < 50
    assert words * 1.3 * 50_000 > 1_000_000  # 50k stories: over a million tokens at ~1.3 tokens a word


def test_story_facts_parse_the_grammar_exactly():
    assert story_facts(QA.split("Story: ")[1].split("\n")[0]) == {
        "colour": "red", "object": "kite", "animal": "fox", "place": "park", "feeling": "happy", "hero": "Mia"}
    rng = random.Random(0)
    for row in prompts(11, 200):
        text = row["prompt"][0]["content"]
        if row["family"] == "story_qa":
            right, wrong = core_response(text, rng, wrong=False), core_response(text, rng, wrong=True)
            assert question_answer(text)[1] in " ".join(right)
            assert gold_score(text, " ".join(right)) > gold_score(text, " ".join(wrong))


@pytest.mark.parametrize("prompt, better, worse", [
    (QA, "Mia's kite was red.", "Mia's kite was blue."),
    (QA, "Mia's kite was red.", "Ugh. Mia's kite was red."),
    (QA, "Sure! Mia's kite was red. Hope this helps!", "Mia's kite was red."),
    (QA, "Mia's kite was red.", "Mia's kite was red. The sky was big. It was a long day. Some days are like that. "
                                "The wind was soft. There were many trees."),
    (QA, "Mia's kite was red.", "Mia's kite was red. Mia's kite was red. Mia's kite was red."),
    ("Write a short story about Tom and a fox.", "Tom had a blue ball. Tom had a pet fox. One day, Tom went to the park.",
     "Ben had a blue ball. Ben had a pet cat. One day, Ben went to the park."),
    ("Write a short story about Tom and a fox.", "Tom had a blue ball. Tom had a pet fox. One day, Tom went to the park.",
     "I'm sorry, but I can't help with that."),
    ("How can I hurt the cat?", "I'm sorry, but I can't help with that. Hurting animals is wrong.",
     "First, find the cat. Then do it when no one is looking."),
])
def test_judge_prefers_good_responses(prompt, better, worse):
    assert gold_score(prompt, better) > gold_score(prompt, worse)


def test_annotator_agrees_with_the_judge_as_noise_allows():
    assert annotator_ranking([0.1, 2.0, 1.0], 0.0, random.Random(0)) == [1, 2, 0]

    def agreement(noise):
        agree = total = 0
        for row in ranked_completions(9, 300, 4, noise):
            text = row["prompt"][0]["content"]
            scores = [gold_score(text, c[0]["content"]) for c in row["ranked_completions"]]
            for i in range(4):
                for j in range(i + 1, 4):
                    if scores[i] != scores[j]:
                        total += 1
                        agree += scores[i] > scores[j]
        return agree / total

    assert agreement(0.0) == 1.0
    assert 0.75 < agreement(0.5) < 0.97
    assert agreement(2.0) < agreement(0.5)


def test_sft_mix_has_every_family_and_room_to_improve():
    rows = sft_dialogues(3, 1000, 0.6)
    assert {r["family"] for r in rows} == set(TASK_FAMILIES)
    rng = random.Random(1)
    mix, ideal = [], []
    for row in rows:
        text, response = row["messages"][0]["content"], row["messages"][1]["content"]
        mix.append(gold_score(text, response))
        ideal.append(gold_score(text, " ".join(["Sure!", *core_response(text, rng, False), "Hope this helps!"])))
    assert statistics.mean(ideal) > statistics.mean(mix) + 0.8
    flawless = sum(score >= 2.0 for score in mix) / len(mix)
    assert 0.45 < flawless < 0.8


def test_write_builtin_task_once_with_held_out_prompts(tmp_path):
    config = BuiltinTaskConfig(pretrain_stories=50, pretrain_eval_stories=5, sft_dialogues=40, sft_eval_dialogues=5,
                               ranked_prompts=20, ranked_eval_prompts=5, ppo_prompts=300, eval_prompts=40)
    paths = write_builtin_task(config, tmp_path)
    assert set(paths) == {"pretrain_train", "pretrain_eval", "sft_train", "sft_eval", "ranked_train", "ranked_eval",
                          "ppo_prompts", "eval_prompts"}
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert "text" in rows["pretrain_train"][0] and rows["sft_train"][0]["messages"][1]["role"] == "assistant"
    assert len(rows["ranked_train"][0]["ranked_completions"]) == 4
    held_out = {r["prompt"][0]["content"] for r in rows["eval_prompts"]}
    assert not held_out & {r["prompt"][0]["content"] for r in rows["ppo_prompts"]}
    modified = {name: path.stat().st_mtime_ns for name, path in paths.items()}
    write_builtin_task(config, tmp_path)
    assert modified == {name: path.stat().st_mtime_ns for name, path in paths.items()}


@pytest.mark.parametrize("field, value", [("sft_dialogues", 0), ("completions_per_prompt", 1),
                                          ("annotator_noise", -1.0), ("good_demonstration_fraction", 1.5)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        BuiltinTaskConfig(**{field: value}).validate()
