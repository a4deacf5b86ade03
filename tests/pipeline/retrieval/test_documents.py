"""pipeline/retrieval/documents.py: which files are read, how they become passages, what is refused."""

import json

import pytest

from pipeline.config.parsing import ConfigError
from pipeline.retrieval.documents import read_documents, split_passages


def test_text_files_are_read_recursively_and_binary_or_non_utf8_ones_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("Mia had a red kite.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# Notes\n\nTom had a blue ball.")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Ben felt happy."}) + "\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ignored.pdf").write_bytes(b"%PDF")
    (tmp_path / ".rlhf-index").mkdir()
    (tmp_path / ".rlhf-index" / "cached.txt").write_text("not a document")
    documents, skipped = read_documents(tmp_path)
    assert [d.source for d in documents] == ["a.txt", "c.jsonl", "sub/b.md"]
    assert skipped == ["image.txt", "latin1.txt"]
    assert len({d.digest for d in documents}) == 3


@pytest.mark.parametrize("case, message", [("missing", "no such folder"), ("file", "not a folder"),
                                           ("empty", "no readable .txt, .md or .jsonl file$"),
                                           ("binary", r"no readable .txt, .md or .jsonl file \(1 skipped as binary")])
def test_a_folder_with_nothing_to_read_is_one_line_naming_it(tmp_path, case, message):
    folder = tmp_path / "docs"
    if case == "file":
        folder.write_text("x")
    elif case in ("empty", "binary"):
        folder.mkdir()
        if case == "binary":
            (folder / "x.txt").write_bytes(b"\0\1\2")
    with pytest.raises(ConfigError, match=f"^--docs {folder}: {message}"):
        read_documents(folder)


def test_passages_are_paragraphs_or_rows_cut_at_the_word_limit(tmp_path):
    (tmp_path / "story.txt").write_text("One two three.\n\n  \nFour five six seven eight.\n")
    rows = [{"text": "a b c d e"}, {"title": "no text field"}, "not a mapping", {"text": "f"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    documents = {d.source: d for d in read_documents(tmp_path)[0]}
    story = split_passages(documents["story.txt"], max_words=3)
    assert [(p.number, p.text) for p in story] == [(1, "One two three."), (2, "Four five six"), (3, "seven eight.")]
    assert story[1].label == "story.txt, passage 2"
    assert [p.text for p in split_passages(documents["rows.jsonl"], max_words=3)] == ["a b c", "d e", "f"]
