"""pipeline/retrieval/prompts.py: the template a model knows, and passages cut to fit its context."""

import json

from data.tokenizer import load_tokenizer
from pipeline.retrieval.documents import Passage
from pipeline.retrieval.index import Retrieved
from pipeline.retrieval.prompts import augmented_prompt, render, template_for

STORY = Retrieved(Passage("stories.jsonl", 4, "Mia had a red kite."), 0.9)
OTHER = Retrieved(Passage("notes.md", 1, "Tom had a blue ball. " * 20), 0.5)


def test_the_story_template_is_the_one_the_builtin_policies_learned():
    assert render("What colour was Mia's kite?", [STORY], "story") == (
        "Read the story and answer the question.\nStory: Mia had a red kite.\nQuestion: What colour was Mia's kite?")
    chat = render("What colour was Mia's kite?", [STORY, OTHER], "chat")
    assert "[1] (stories.jsonl, passage 4) Mia had a red kite." in chat and "[2] (notes.md, passage 1)" in chat
    assert chat.endswith("Question: What colour was Mia's kite?")


def test_the_template_follows_the_checkpoints_run(tmp_path, smoke_run):
    def checkpoint(config):
        stage = tmp_path / str(len(list(tmp_path.iterdir())))
        (stage / "final").mkdir(parents=True)
        (stage / "manifest.json").write_text(json.dumps({"config": config}))
        return stage / "final"

    # A stage manifest records the stage's identity keys, e.g. PPO's "data.builtin" and "data.ppo".
    builtin = {"data.builtin": {"seed": 1234}, "data.ppo": None, "model.trust_remote_code": False}
    assert template_for(checkpoint(builtin)) == "story"
    assert template_for(checkpoint({"data.builtin": {}, "data.sft": {"path": "chats.jsonl"}})) == "chat"
    assert template_for(checkpoint({"run.seed": 1})) == "chat"  # no data settings recorded
    assert template_for(tmp_path / "a hub id or a folder without a manifest") == "chat"
    # A real stage manifest: the smoke run's pretraining, on the built-in task.
    assert template_for(smoke_run / "smoke" / "pretrain" / "final") == "story"


def test_passages_that_do_not_fit_are_cut_and_counted(tiny_causal_lm):
    tokenizer = load_tokenizer(tiny_causal_lm)
    question = "What colour was Mia's kite?"
    whole = augmented_prompt(question, [STORY, OTHER], "chat", tokenizer, max_prompt_tokens=10_000)
    assert whole.cut == 0 and [r.passage.text for r in whole.passages] == [STORY.passage.text, OTHER.passage.text]

    def length(message):
        return len(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])

    budget = length(render(question, [STORY], "chat")) + 60  # the first passage and a little of the second
    fitted = augmented_prompt(question, [STORY, OTHER], "chat", tokenizer, max_prompt_tokens=budget)
    assert fitted.cut == 1 and len(fitted.passages) == 2 and fitted.passages[0] == STORY
    assert 0 < len(fitted.passages[1].passage.text) < len(OTHER.passage.text)
    assert length(fitted.message) <= budget and fitted.message.endswith(question)
    nothing = augmented_prompt(question, [STORY], "chat", tokenizer, max_prompt_tokens=length(render(question, [], "chat")))
    assert nothing.passages == [] and nothing.cut == 1 and nothing.message.endswith(question)
