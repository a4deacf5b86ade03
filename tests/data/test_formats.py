import pytest

from data.formats import (
    converted_splits, dialogues_from_rows, preference_pairs_from_rows, prompt_response_ids, prompts_from_rows,
    ranked_pairs_from_lists, split_hh_transcript)
from data.loading import DataError


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm):
    from data.tokenizer import load_tokenizer
    return load_tokenizer(tiny_causal_lm)


def test_dialogues_from_messages_and_prompt_completion():
    rows = [{"messages": user("Hi") + assistant("Hello.")},
            {"prompt": "Hi", "completion": "Hey."},
            {"prompt": user("Q"), "completion": assistant("A")}]
    dialogues = dialogues_from_rows(rows, "d.jsonl", "error")
    assert [d["messages"][-1]["content"] for d in dialogues] == ["Hello.", "Hey.", "A"]
    assert dialogues[1]["messages"] == user("Hi") + assistant("Hey.")


@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, "needs 'messages', or 'prompt' and 'completion'"),
    ({"messages": user("Hi")}, "the last message must be the assistant's"),
    ({"messages": "Hi"}, "'messages' must be a non-empty list"),
    ({"messages": user("Hi") + [{"role": "robot", "content": "x"}]}, r"'messages'\[1\] must be a message with role"),
    ({"messages": user("Hi") + [{"role": "assistant"}]}, r"'messages'\[1\] has empty or non-string content"),
    ({"prompt": "Hi", "completion": "  "}, "'completion' is empty"),
    ({"prompt": 3, "completion": "x"}, "'prompt' must be a non-empty list"),
])
def test_bad_dialogue_rows_name_the_file_and_row(row, message):
    rows = [{"messages": user("ok") + assistant("fine")}, row]
    with pytest.raises(DataError, match=rf"^d\.jsonl row 2: {message}"):
        dialogues_from_rows(rows, "d.jsonl", "error")


def test_skip_counts_bad_rows_in_one_line(capsys):
    rows = [{"messages": user("ok") + assistant("fine")}, {"text": "x"}, {"prompt": "a", "completion": ""}]
    assert len(dialogues_from_rows(rows, "d.jsonl", "skip")) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(DataError, match="no usable rows"):
        dialogues_from_rows([{"text": "x"}], "d.jsonl", "skip")


def test_split_datasets_name_a_bad_row_by_its_row_in_the_file(tmp_path, capsys):
    import json

    from pipeline.config.schema import DatasetSource
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(19)] + [{"prompt": "q", "completion": ""}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = DatasetSource(path=str(path), eval_fraction=0.25)
    with pytest.raises(DataError, match=r"sft\.jsonl\) row 20: 'completion' is empty"):
        converted_splits(source, "data.sft", 0, "error", dialogues_from_rows)
    train, evaluation = converted_splits(source, "data.sft", 0, "skip", dialogues_from_rows)
    assert len(train) + len(evaluation) == 19 and len(evaluation) in (4, 5)
    assert "skipped 1 of" in capsys.readouterr().err


def test_too_long_after_templating_is_a_bad_row(tokenizer, capsys):
    rows = [{"prompt": "Hi", "completion": "Mia had a red kite."}, {"prompt": "Hi", "completion": "Tom went to the park. " * 30}]
    with pytest.raises(DataError, match=r"d\.jsonl row 2: \d+ tokens after templating, more than max_length=40"):
        dialogues_from_rows(rows, "d.jsonl", "error", tokenizer, max_length=40)
    assert len(dialogues_from_rows(rows, "d.jsonl", "skip", tokenizer, max_length=40)) == 1
    assert "skipped 1 of 2 rows" in capsys.readouterr().err
    pairs = [{"prompt": "Hi", "chosen": "Sure!", "rejected": "Tom went to the park. " * 30}]
    with pytest.raises(DataError, match=r"p\.jsonl row 1: \d+ tokens after templating"):
        preference_pairs_from_rows(pairs, "p.jsonl", "error", tokenizer, max_length=40)


def test_prompt_response_ids_match_the_chat_template_and_end_with_eos(tokenizer):
    prompt = user("Where did Tom go?")
    ids = prompt_response_ids(tokenizer, prompt, "Tom went to the park.")
    whole = tokenizer.apply_chat_template(prompt + assistant("Tom went to the park."), return_dict=True)["input_ids"]
    assert ids == list(whole) and ids[-1] == tokenizer.eos_token_id
    assert prompt_response_ids(tokenizer, "Where did Tom go?", "Tom went to the park.") == ids


def test_ranked_lists_expand_to_all_pairs_in_one_group():
    pairs = ranked_pairs_from_lists(user("p"), ["a", "b", "c", "d"], group=7)
    assert [(p.chosen, p.rejected, p.rank_gap) for p in pairs] == [
        ("a", "b", 1), ("a", "c", 2), ("a", "d", 3), ("b", "c", 1), ("b", "d", 2), ("c", "d", 1)]
    assert {p.group for p in pairs} == {7}
    rows = [{"prompt": "q", "ranked_completions": ["x", "y"]},
            {"prompt": user("p"), "ranked_completions": [assistant("a"), assistant("b"), assistant("c")]}]
    assert [p.group for p in preference_pairs_from_rows(rows, "r", "error")] == [0, 1, 1, 1]


def test_every_preference_layout_gives_prompt_and_two_responses():
    transcript = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: "
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"},  # standard, explicit prompt
            {"prompt": user("p"), "chosen": assistant("good"), "rejected": assistant("bad")},  # conversational
            {"chosen": user("p") + assistant("good"), "rejected": user("p") + assistant("bad")},  # implicit
            {"chosen": transcript + "sure", "rejected": transcript + "no"},  # HH-RLHF
            {"chosen": "The sky is blue.", "rejected": "The sky is green."}]  # standard, implicit prompt
    pairs = preference_pairs_from_rows(rows, "p.jsonl", "error")
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad")] * 3 + [("sure", "no"), ("blue.", "green.")]
    assert pairs[0].prompt == pairs[1].prompt == pairs[2].prompt == user("p")
    assert pairs[3].prompt == user("hi") + assistant("hello") + user("help?")
    assert pairs[4].prompt == user("The sky is")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "p", "ranked_completions": ["only"]}, "'ranked_completions' must list at least 2"),
    ({"prompt": "p", "ranked_completions": ["a", "b", "a"]}, "'ranked_completions' repeats a completion"),
    ({"ranked_completions": ["a", "b"]}, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": "x"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "'chosen' and 'rejected' transcripts differ"),
    ({"chosen": "Yes.", "rejected": "No."}, "'chosen' and 'rejected' share no prompt"),
    ({"prompt": "p", "chosen": "", "rejected": "x"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": 1, "rejected": "x"}, "'chosen' must be a non-empty list"),
])
def test_bad_preference_rows_name_the_row(row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match=f"^p.jsonl row 2: {message}"):
        preference_pairs_from_rows([good, row], "p.jsonl", "error")
    assert len(preference_pairs_from_rows([good, row], "p.jsonl", "skip")) == 1


def test_hh_transcript_split():
    prompt, reply = split_hh_transcript("\n\nHuman: What is 2+2?\n\nAssistant: 4")
    assert prompt == user("What is 2+2?") and reply == "4"


def test_prompts_from_prompt_only_rows_and_dialogues():
    rows = [{"prompt": "p"}, {"prompt": user("q")}, {"messages": user("r") + assistant("s")}]
    assert prompts_from_rows(rows, "x", "error") == [user("p"), user("q"), user("r")]
    with pytest.raises(DataError, match="row 1: needs 'prompt'"):
        prompts_from_rows([{"text": "t"}], "x", "error")
    with pytest.raises(DataError, match="row 1: the prompt must end with a user message"):
        prompts_from_rows([{"messages": assistant("s")}], "x", "error")
