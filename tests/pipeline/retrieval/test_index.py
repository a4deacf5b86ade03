"""pipeline/retrieval/index.py and embeddings.py: the right passage is found and named, the cache re-indexes only
what changed, both embeddings work."""

import os

import pytest

from pipeline.config.parsing import ConfigError
from pipeline.retrieval.index import build_index

STORIES = {"mia.txt": "Mia had a red kite. Mia went to the park.",
           "tom.txt": "Tom found a blue ball by the door. Tom felt happy.",
           "ben.txt": "Ben had a pet rabbit. In the morning, Ben walked to the lake."}


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in STORIES.items():
        (folder / name).write_text(text)
    return folder


def test_tfidf_finds_and_names_the_passage_that_answers(docs):
    index, report = build_index(docs, "tfidf", show_progress=False)
    best = index.search("What colour was Tom's ball?", 2)
    assert best[0].passage.source == "tom.txt" and best[0].passage.number == 1
    assert best[0].score > best[1].score
    assert report.passages == 3 and sorted(report.indexed) == sorted(STORIES) and report.reused == []
    assert "3 passages from 3 file(s): 3 indexed, 0 from the cache" in report.summary()


def test_a_changed_file_is_indexed_again_and_an_unchanged_one_is_not(docs):
    build_index(docs, "tfidf", show_progress=False)
    (docs / "tom.txt").write_text("Tom found a green hat by the tree.")
    index, report = build_index(docs, "tfidf", show_progress=False)
    assert report.indexed == ["tom.txt"] and sorted(report.reused) == ["ben.txt", "mia.txt"]
    assert index.search("Where did Tom find the green hat?", 1)[0].passage.text.startswith("Tom found a green hat")
    (docs / "ben.txt").unlink()
    index, report = build_index(docs, "tfidf", show_progress=False)
    assert report.indexed == [] and report.passages == 2
    # What the cache held for the old tom.txt and for ben.txt is gone: it keeps the folder's current files only.
    assert len(list((docs / ".rlhf-index" / "tfidf" / "passages").iterdir())) == 2


def test_the_model_embedding_caches_its_vectors_per_file(docs, tiny_causal_lm):
    from data.tokenizer import load_tokenizer
    from pipeline.train.models import load_causal_lm

    tokenizer = load_tokenizer(tiny_causal_lm)
    model = load_causal_lm(tiny_causal_lm, tokenizer).eval()
    index, report = build_index(docs, "model", model, tokenizer, str(tiny_causal_lm), show_progress=False)
    assert len(report.indexed) == 3 and len(list((docs / ".rlhf-index").glob("model-*/vectors/*.npy"))) == 3
    found = index.search("Mia had a red kite.", 3)
    assert len(found) == 3 and found[0].passage.source == "mia.txt"  # its own text is the nearest
    again, report = build_index(docs, "model", model, tokenizer, str(tiny_causal_lm), show_progress=False)
    assert report.indexed == [] and again.search("Mia had a red kite.", 1)[0].passage.source == "mia.txt"


def test_an_unwritable_cache_and_an_unknown_embedding_are_one_line(docs, tmp_path):
    with pytest.raises(ConfigError, match="^--embedding: must be one of tfidf, model"):
        build_index(docs, "bm25")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should go")
    with pytest.raises(ConfigError, match="cannot write the index cache .* pass --index-dir"):
        build_index(docs, "tfidf", cache_dir=blocked, show_progress=False)
    (docs / "only.txt").write_text("a b c")
    for name in STORIES:
        os.remove(docs / name)
    with pytest.raises(ConfigError, match="its files hold no words to search"):
        build_index(docs, "tfidf", show_progress=False)
