"""The passage index of a folder, cached beside it in DIR/.rlhf-index/<embedding>/: each file's passages (and, for
the model embedding, their vectors) are stored under the digest of the file's bytes, so a changed or new file is
split and embedded again and an unchanged one is read back. TF-IDF's vocabulary and weights depend on every
passage, so they are fitted anew from the cached passages on each load (10,000 passages: about a second)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.config.parsing import ConfigError
from pipeline.retrieval.documents import INDEX_DIRECTORY, Document, Passage, read_documents, split_passages
from pipeline.retrieval.embeddings import EMBEDDINGS, ModelEmbedding, TfidfEmbedding, mean_pooled_states, model_signature


@dataclass
class IndexReport:
    """What building the index did: files read back from the cache, files (re)indexed, files skipped."""

    reused: list[str] = field(default_factory=list)
    indexed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    passages: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        skipped = (f"; {len(self.skipped)} file(s) skipped as binary or not UTF-8 ({', '.join(self.skipped[:3])}"
                   f"{', ...' if len(self.skipped) > 3 else ''})") if self.skipped else ""
        return (f"{self.passages} passages from {len(self.reused) + len(self.indexed)} file(s): {len(self.indexed)} "
                f"indexed, {len(self.reused)} from the cache, in {self.seconds:.1f} s{skipped}")


@dataclass
class Retrieved:
    passage: Passage
    score: float


class PassageIndex:
    """The passages of a folder and a way to rank them for a question."""

    def __init__(self, passages: list[Passage], embedding):
        self.passages, self.embedding = passages, embedding

    def search(self, question: str, k: int) -> list[Retrieved]:
        """The k passages most similar to the question, best first."""
        scores, indices = self.embedding.search(question, k)
        return [Retrieved(self.passages[int(i)], float(s)) for s, i in zip(scores, indices) if i >= 0]


def write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def save_array(array: np.ndarray, path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def prune_cache(cache: Path, digests: set[str]) -> None:
    """Remove what the cache holds for file contents the folder no longer has (edited or deleted files)."""
    for part in ("passages", "vectors"):
        for path in (cache / part).iterdir():
            if path.name.split(".")[0] not in digests:
                path.unlink(missing_ok=True)


def cached_passages(document: Document, cache: Path) -> list[Passage] | None:
    path = cache / "passages" / f"{document.digest}.json"
    if not path.is_file():
        return None
    return [Passage(document.source, number, text) for number, text in enumerate(json.loads(path.read_text()), 1)]


def require_libraries(embedding: str) -> None:
    """A one-line error naming the install command when a library the embedding needs is missing."""
    import importlib.util

    needed = {"tfidf": ("sklearn",), "model": ("faiss",)}[embedding]
    if any(importlib.util.find_spec(name) is None for name in needed):
        raise ConfigError(f"--embedding {embedding}: needs {' and '.join(needed)}, which is not installed; "
                          f"install it with pip install -e \".[rag]\"")


def build_index(folder: Path, embedding: str = "tfidf", model=None, tokenizer=None, model_dir: str | None = None,
                cache_dir: Path | None = None, show_progress: bool = True) -> tuple[PassageIndex, IndexReport]:
    """Read, split and embed the folder's documents, reusing what the cache holds for unchanged files. The model
    embedding needs the answering `model`, its `tokenizer` and `model_dir` (whose signature keys its vectors)."""
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"--embedding: must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}")
    require_libraries(embedding)
    started = time.perf_counter()
    documents, skipped = read_documents(folder)
    key = embedding if embedding == "tfidf" else f"model-{model_signature(model_dir)}"
    cache = Path(cache_dir or Path(folder) / INDEX_DIRECTORY) / key
    try:
        for part in ("passages", "vectors"):
            (cache / part).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--docs {folder}: cannot write the index cache in {cache} ({error.strerror}); "
                          f"pass --index-dir to keep it elsewhere") from None

    report = IndexReport(skipped=skipped)
    passages, vectors = [], []
    todo = [(d, cached_passages(d, cache)) for d in documents]
    if embedding == "model":
        todo = [(d, p if p is not None and (cache / "vectors" / f"{d.digest}.npy").is_file() else None)
                for d, p in todo]
    # (document, cached passages or None, its passages): a file not in the cache is split once, here.
    todo = [(d, found, found if found is not None else split_passages(d)) for d, found in todo]
    new_passages = sum(len(split) for _, found, split in todo if found is None) if embedding == "model" else 0
    bar = tqdm(total=new_passages, desc="indexing", unit="passage", leave=False,
               disable=not show_progress or new_passages < 500)
    for document, found, file_passages in todo:
        if found is not None:
            report.reused.append(document.source)
            if embedding == "model":
                vectors.append(np.load(cache / "vectors" / f"{document.digest}.npy"))
        else:
            report.indexed.append(document.source)
            write_atomically(cache / "passages" / f"{document.digest}.json",
                             lambda path: path.write_text(json.dumps([p.text for p in file_passages])))
            if embedding == "model":
                file_vectors = mean_pooled_states(model, tokenizer, [p.text for p in file_passages],
                                                  progress=bar.update)
                file_vectors = file_vectors.reshape(len(file_passages), -1)
                write_atomically(cache / "vectors" / f"{document.digest}.npy", partial(save_array, file_vectors))
                vectors.append(file_vectors)
        passages += file_passages
    bar.close()
    if not passages:
        raise ConfigError(f"--docs {folder}: its files hold no text to search")
    files = {d.source: d.digest for d in documents}
    write_atomically(cache / "files.json", lambda path: path.write_text(json.dumps(files, indent=1, sort_keys=True)))
    prune_cache(cache, set(files.values()))
    if embedding == "tfidf":
        try:
            index = TfidfEmbedding([p.text for p in passages])
        except ValueError:  # scikit-learn's "empty vocabulary": no word of two letters or more anywhere
            raise ConfigError(f"--docs {folder}: its files hold no words to search") from None
    else:
        index = ModelEmbedding(model, tokenizer, np.concatenate([v for v in vectors if len(v)]))
    report.passages, report.seconds = len(passages), time.perf_counter() - started
    return PassageIndex(passages, index), report
