import json
import random
import statistics
import time

import pytest

from data.builtin_datasets import prompts, ranked_completions, sft_dialogues, write_builtin_task
from data.builtin_task import (
    CLOSERS, FACT_TEMPLATES, MAX_RESPONSE_WORDS, NAMES, OPENERS, TASK_FAMILIES, core_response, fact_sentence,
    is_held_out_prompt, pretraining_stories, question_answer, random_facts, sample_response, story_facts)
from data.gold_judge import gold_score
from pipeline.config.schema import BuiltinTaskConfig

STORY = "Mia had a red kite. Tom had a blue kite. One day, Mia went to the park. Mia felt happy."
QA = f"Read the story and answer the question.\nStory: {STORY}\nQuestion: What colour was Mia's kite?"


def test_generators_are_deterministic_from_the_seed():
    assert pretraining_stories(1, 50) == pretraining_stories(1, 50) != pretraining_stories(2, 50)
    assert sft_dialogues(3, 30, 0.6) == sft_dialogues(3, 30, 0.6) != sft_dialogues(4, 30, 0.6)
    assert ranked_completions(5, 10, 4, 0.5) == ranked_completions(5, 10, 4, 0.5) != ranked_completions(6, 10, 4, 0.5)
    assert prompts(6, 20) == prompts(6, 20) != prompts(7, 20)
    assert prompts(6, 20, held_out=True) == prompts(6, 20, held_out=True) != prompts(6, 20)
    assert sample_response(QA, random.Random(8), 0.5) == sample_response(QA, random.Random(8), 0.5)


def test_corpus_is_fast_and_can_reach_a_million_tokens():
    started = time.perf_counter()
    stories = pretraining_stories(0, 5000)
    assert time.perf_counter() - started < 1.0  # measured ≈ 0.08 s: 20,000 stories in well under a second
    sentences = [s.count(".") + s.count("!") + s.count("?") for s in stories[:200]]
    words = statistics.mean(len(s.split()) for s in stories)
    assert 35 < words < 55
    assert words * 1.3 * 25_000 > 1_000_000  # ≈ 1.3 BPE tokens a word on this corpus (measured)
    assert min(sentences) >= 3


def test_story_facts_parse_the_grammar_exactly():
    assert story_facts(STORY) == {"Mia": {"colour": "red", "object": "kite", "place": "park", "feeling": "happy"},
                                  "Tom": {"colour": "blue", "object": "kite"}}
    rng = random.Random(0)
    for _ in range(100):  # every template of every fact kind, round trip
        name, facts = rng.choice(NAMES), random_facts(rng)
        for kind in FACT_TEMPLATES:
            parsed = story_facts(fact_sentence(rng, kind, name, facts))[name]
            assert all(parsed[key] == facts[key] for key in parsed) and parsed


def test_generated_questions_are_answerable_and_the_right_answer_wins():
    rng = random.Random(0)
    questions = [row["prompt"][0]["content"] for row in prompts(11, 400) if row["family"] == "story_qa"]
    assert len(questions) > 150
    for text in questions:
        story = text.split("Story: ")[1].split("\nQuestion: ")[0]
        assert all(story_facts(sentence) for sentence in story.split(". "))  # no sentence escapes the parser
        kind, answer, name, _ = question_answer(text)
        right, wrong = " ".join(core_response(text, rng)), " ".join(core_response(text, rng, wrong=True))
        assert answer in right.split(" ")[-1] and name in right
        assert gold_score(text, right) > gold_score(text, wrong)


def test_ranked_rows_have_k_distinct_candidates():
    for row in ranked_completions(4, 50, 5, 0.5):
        texts = [c[0]["content"] for c in row["ranked_completions"]]
        assert len(texts) == len(set(texts)) == 5
        assert row["prompt"][0]["role"] == "user" and row["family"] in TASK_FAMILIES


def test_sft_mix_has_the_intended_quality_mix_and_every_family():
    rows = sft_dialogues(3, 2000, 0.6)
    assert {r["family"] for r in rows} == set(TASK_FAMILIES)
    assert sum(r["flaw"] is None for r in rows) / len(rows) == pytest.approx(0.6, abs=0.04)
    assert {r["flaw"] for r in rows} == {None, "wrong_answer", "rude", "rambling", "repetitive", "needless_refusal",
                                        "complied"}
    responses = [r["messages"][1]["content"] for r in rows]
    assert max(len(text.split()) for text in responses) <= MAX_RESPONSE_WORDS
    openers = sum(text.startswith(("Sure!", "Of course!", "Happy to help!")) for text in responses) / len(responses)
    assert 0.25 < openers < 0.5  # the opener is often missing: RLHF can learn to always add it


def ideal_response(prompt: str, rng: random.Random) -> str:
    """What the judge likes best: a flawless response with opener and closer (scores 2.6)."""
    return " ".join([rng.choice(OPENERS), *core_response(prompt, rng), rng.choice(CLOSERS)])


def test_ideal_responses_beat_the_sft_mix_by_a_clear_margin():
    rows = sft_dialogues(3, 1000, 0.6)
    rng = random.Random(1)
    texts = [r["messages"][0]["content"] for r in rows]
    mix = statistics.mean(gold_score(t, r["messages"][1]["content"]) for t, r in zip(texts, rows))
    ideal = statistics.mean(gold_score(t, ideal_response(t, rng)) for t in texts)
    assert ideal > 2.55 and ideal > mix + 0.8  # measured: ideal 2.60, mix 1.55
    # Per prompt, an ideal policy beats the mean of 4 samples from the demonstrators' mix almost everywhere.
    wins = sum(gold_score(t, ideal_response(t, rng))
               > statistics.mean(gold_score(t, sample_response(t, rng, 0.6).text) for _ in range(4)) for t in texts[:300])
    assert wins / 300 >= 0.8


def test_write_builtin_task_once_with_held_out_prompts(tmp_path):
    config = BuiltinTaskConfig(pretrain_stories=50, pretrain_eval_stories=5, sft_dialogues=200, sft_eval_dialogues=40,
                               ranked_prompts=100, ranked_eval_prompts=40, ppo_prompts=300, eval_prompts=40)
    paths = write_builtin_task(config, tmp_path)
    assert set(paths) == {"pretrain_train", "pretrain_eval", "sft_train", "sft_eval", "ranked_train", "ranked_eval",
                          "ppo_prompts", "eval_prompts"}
    rows = {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            for name, path in paths.items()}
    assert [len(rows[name]) for name in paths] == [50, 5, 200, 40, 100, 40, 300, 40]
    assert all(isinstance(r["text"], str) for r in rows["pretrain_train"] + rows["pretrain_eval"])
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows["sft_train"] + rows["sft_eval"])
    assert all(len(r["ranked_completions"]) == 4 and r["ranked_completions"][0][0]["role"] == "assistant"
               for r in rows["ranked_train"] + rows["ranked_eval"])
    assert all(r["prompt"][0]["role"] == "user" and r["family"] in TASK_FAMILIES
               for r in rows["ppo_prompts"] + rows["eval_prompts"])

    def prompt_texts(name: str) -> set[str]:
        return {(r["messages"] if "messages" in r else r["prompt"])[0]["content"] for r in rows[name]}

    training = prompt_texts("sft_train") | prompt_texts("ranked_train") | prompt_texts("ppo_prompts")
    held_out = prompt_texts("sft_eval") | prompt_texts("ranked_eval") | prompt_texts("eval_prompts")
    assert not training & held_out
    assert all(is_held_out_prompt(text) for text in held_out) and not any(is_held_out_prompt(t) for t in training)

    modified = {name: path.stat().st_mtime_ns for name, path in paths.items()}
    write_builtin_task(config, tmp_path)
    assert modified == {name: path.stat().st_mtime_ns for name, path in paths.items()}
    assert not list(tmp_path.glob(".*.tmp"))
    changed = BuiltinTaskConfig(**{**config.__dict__, "seed": 99})
    write_builtin_task(changed, tmp_path)
    assert json.loads((tmp_path / "task_manifest.json").read_text())["seed"] == 99
    assert paths["ppo_prompts"].read_text(encoding="utf-8") != "".join(json.dumps(r) + "\n" for r in rows["ppo_prompts"])


def test_splits_of_neighbouring_seeds_do_not_coincide(tmp_path):
    small = dict(pretrain_stories=20, pretrain_eval_stories=20, sft_dialogues=5, sft_eval_dialogues=5, ranked_prompts=5,
                 ranked_eval_prompts=5, ppo_prompts=5, eval_prompts=5)
    first = write_builtin_task(BuiltinTaskConfig(seed=1, **small), tmp_path / "a")
    second = write_builtin_task(BuiltinTaskConfig(seed=2, **small), tmp_path / "b")
    train = set(second["pretrain_train"].read_text().splitlines())
    assert not train & set(first["pretrain_eval"].read_text().splitlines())


@pytest.mark.parametrize("field, value", [("sft_dialogues", 0), ("pretrain_stories", -5), ("eval_prompts", 2.5),
                                          ("completions_per_prompt", 1), ("completions_per_prompt", 50),
                                          ("annotator_noise", -1.0), ("good_demonstration_fraction", 1.5)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        BuiltinTaskConfig(**{field: value}).validate()


def test_stage_splits_read_the_builtin_files_or_the_configured_dataset(tmp_path):
    from data.builtin_datasets import stage_splits
    from pipeline.config.loading import load_config
    from tests.helpers import SMOKE

    def keep(rows, where, on_bad_rows):
        return [(where, row) for row in rows]

    config = load_config(SMOKE, [f"run.output_dir={tmp_path}"])
    train, evaluation = stage_splits(config, "reward", keep)
    assert len(train) == 200 and len(evaluation) == 40  # smoke's ranked_prompts and ranked_eval_prompts
    assert train[0][0] == str(config.run_dir / "data" / "ranked_train.jsonl")
    assert (config.run_dir / "data" / "task_manifest.json").is_file()

    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": "A"}) + "\n" for i in range(10)))
    configured = load_config(SMOKE, [f"run.output_dir={tmp_path}", f"data.sft.path={rows}", "data.sft.eval_fraction=0.2"])
    train, evaluation = stage_splits(configured, "sft", keep)
    assert len(train) + len(evaluation) == 10 and len(evaluation) == 2
    assert all(where.startswith("data.sft") for where, _ in train + evaluation)
