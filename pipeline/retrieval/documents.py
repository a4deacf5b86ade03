"""A folder of documents as passages: every .txt and .md file (split at blank lines) and every row of a .jsonl
file with a "text" field, cut into passages of at most `max_words` words. Files that are binary or not UTF-8 are
skipped and counted; an empty or missing folder is a one-line error."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.parsing import ConfigError

SUFFIXES = (".txt", ".md", ".jsonl")
INDEX_DIRECTORY = ".rlhf-index"  # the cache beside the documents (pipeline/retrieval/index.py)
MAX_WORDS = 120  # about 160 tokens: a built-in story is one passage, and several fit a small model's context
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Passage:
    """A piece of a document: its file (relative to the folder), its number in that file (from 1) and its text."""

    source: str
    number: int
    text: str

    @property
    def label(self) -> str:
        """How the answer names it: file and passage number."""
        return f"{self.source}, passage {self.number}"


@dataclass(frozen=True)
class Document:
    """A readable file of the folder and the digest of its bytes (what decides whether it is indexed again)."""

    path: Path
    source: str
    digest: str
    text: str


def read_documents(folder: Path, option: str = "--docs") -> tuple[list[Document], list[str]]:
    """The folder's readable text files (searched recursively, in name order, the index cache left out) and the
    relative paths of those skipped as binary or not UTF-8. A ConfigError naming `option` when the folder is
    missing or holds no text file at all."""
    folder = Path(folder)
    if not folder.exists():
        raise ConfigError(f"{option} {folder}: no such folder")
    if not folder.is_dir():
        raise ConfigError(f"{option} {folder}: not a folder")
    documents, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and INDEX_DIRECTORY not in p.relative_to(folder).parts):
        data = path.read_bytes()
        source = str(path.relative_to(folder))
        try:
            if b"\0" in data:
                raise UnicodeDecodeError("utf-8", data, 0, 1, "a NUL byte: a binary file")
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(source)
            continue
        documents.append(Document(path, source, hashlib.sha256(data).hexdigest(), text))
    if not documents:
        found = f" ({len(skipped)} skipped as binary or not UTF-8)" if skipped else ""
        raise ConfigError(f"{option} {folder}: no readable .txt, .md or .jsonl file{found}")
    return documents, skipped


def split_passages(document: Document, max_words: int = MAX_WORDS) -> list[Passage]:
    """The document's passages: a .jsonl file's rows (their "text" field; a row without one is left out), or a
    text file's paragraphs; each cut into pieces of at most `max_words` words."""
    if document.path.suffix.lower() == ".jsonl":
        pieces = []
        for line in document.text.splitlines():
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                pieces.append(row["text"])
    else:
        pieces = PARAGRAPH_BREAK.split(document.text)
    passages = []
    for piece in pieces:
        words = piece.split()
        for start in range(0, len(words), max_words):
            passages.append(Passage(document.source, len(passages) + 1, " ".join(words[start: start + max_words])))
    return passages
