import pytest

from data.formats import (
    dialogues_from_rows, preference_pairs_from_rows, prompts_from_rows, ranked_pairs_from_lists, split_hh_transcript)
from data.loading import DataError


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_dialogues_from_messages_and_prompt_completion():
    rows = [{"messages": user("Hi") + assistant("Hello.")},
            {"prompt": "Hi", "completion": "Hey."},
            {"prompt": user("Q"), "completion": assistant("A")}]
    dialogues = dialogues_from_rows(rows, "d.jsonl", "error")
    assert [d["messages"][-1]["content"] for d in dialogues] == ["Hello.", "Hey.", "A"]
    assert dialogues[1]["messages"][0] == {"role": "user", "content": "Hi"}


@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, "needs 'messages', or 'prompt' and 'completion'"),
    ({"messages": user("Hi")}, "the last message must be the assistant.s"),
    ({"messages": "Hi"}, "'messages' must be a non-empty list"),
    ({"messages": user("Hi") + [{"role": "robot", "content": "x"}]}, r"'messages'\[1\] must be a message with role"),
    ({"prompt": "Hi", "completion": "  "}, "'completion' is empty"),
    ({"prompt": 3, "completion": "x"}, "'prompt' must be a non-empty list"),
])
def test_bad_dialogue_rows_name_the_row(row, message):
    rows = [{"messages": user("ok") + assistant("fine")}, row]
    with pytest.raises(DataError, match=rf"d\.jsonl row 2: {message}"):
        dialogues_from_rows(rows, "d.jsonl", "error")


def test_skip_counts_bad_rows(capsys):
    rows = [{"messages": user("ok") + assistant("fine")}, {"text": "x"}, {"prompt": "a", "completion": ""}]
    assert len(dialogues_from_rows(rows, "d.jsonl", "skip")) == 1
    assert "skipped 2 of 3 rows" in capsys.readouterr().err
    with pytest.raises(DataError, match="no usable rows"):
        dialogues_from_rows([{"text": "x"}], "d.jsonl", "skip")


def test_ranked_lists_expand_to_all_pairs_in_one_group():
    pairs = ranked_pairs_from_lists(user("p"), ["a", "b", "c", "d"], group=7)
    assert [(p.chosen, p.rejected, p.rank_gap) for p in pairs] == [
        ("a", "b", 1), ("a", "c", 2), ("a", "d", 3), ("b", "c", 1), ("b", "d", 2), ("c", "d", 1)]
    assert {p.group for p in pairs} == {7}
    rows = [{"prompt": user("p"), "ranked_completions": [assistant("a"), assistant("b"), assistant("c")]}]
    assert len(preference_pairs_from_rows(rows, "r", "error")) == 3


def test_preference_formats():
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"chosen": user("p") + assistant("good"), "rejected": user("p") + assistant("bad")},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure",
             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"}]
    pairs = preference_pairs_from_rows(rows, "p.jsonl", "error")
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad"), ("good", "bad"), ("sure", "no")]
    assert pairs[1].prompt == user("p")
    assert [m["role"] for m in pairs[2].prompt] == ["user", "assistant", "user"]
    assert [p.group for p in pairs] == [0, 1, 2]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "p", "ranked_completions": ["only"]}, "'ranked_completions' must list at least 2"),
    ({"prompt": "p", "chosen": "x"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "'chosen' and 'rejected' transcripts differ"),
    ({"prompt": "p", "chosen": "", "rejected": "x"}, "'chosen' is empty"),
])
def test_bad_preference_rows(row, message):
    with pytest.raises(DataError, match=f"row 1: {message}"):
        preference_pairs_from_rows([row], "p.jsonl", "error")


def test_hh_transcript_split():
    prompt, reply = split_hh_transcript("\n\nHuman: What is 2+2?\n\nAssistant: 4")
    assert prompt == user("What is 2+2?") and reply == "4"


def test_prompts_from_prompt_only_and_dialogues():
    rows = [{"prompt": "p"}, {"prompt": user("q")}, {"messages": user("r") + assistant("s")}]
    assert prompts_from_rows(rows, "x", "error") == [user("p"), user("q"), user("r")]
    with pytest.raises(DataError, match="row 1: needs 'prompt'"):
        prompts_from_rows([{"text": "t"}], "x", "error")
