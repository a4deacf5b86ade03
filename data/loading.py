"""Load datasets in TRL's standard formats from local files or the HF hub, with errors that name the row.

Formats (https://huggingface.co/docs/trl/dataset_formats), each standard (strings) or conversational
(lists of {"role", "content"} messages):
    text               {"text"}  (or a plain .txt file: one document per paragraph)
    messages           {"messages"}
    prompt-completion  {"prompt", "completion"}
    preference         {"prompt"?, "chosen", "rejected"}  (implicit prompt when "prompt" is absent)
    ranked             {"prompt", "ranked_completions": [best, ..., worst]}  (ours; expands to K·(K−1)/2 pairs)
    prompt-only        {"prompt"}
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path
from typing import Any

from pipeline.config.schema import DatasetSource
from pipeline.config.validation import looks_like_local_path

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


class DataError(ValueError):
    """A dataset problem, reported to the user as one line naming the file and row."""


def read_rows(path: str | Path, key: str = "data") -> list[dict[str, Any]]:
    """Read a local .jsonl/.json/.parquet/.csv file (optionally gzipped) into a list of dict rows."""
    path = Path(path)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind not in LOCAL_SUFFIXES:
        raise DataError(f"{key}.path: {path} is not one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
    if not path.is_file():
        raise DataError(f"{key}.path: file {path} does not exist")
    if kind in (".parquet", ".csv"):
        # pyarrow directly, not datasets.load_dataset: no cache written, and no error logged beside ours
        import pyarrow.csv
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path) if kind == ".parquet" else pyarrow.csv.read_csv(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable {kind[1:]} file ({first_line(error)})") from None
        rows = table.to_pylist()
        if not rows:
            raise DataError(f"{key}.path: {path} holds no rows")
        return rows
    raw = read_bytes(path)
    if kind == ".txt":  # plain text: each paragraph (blank-line separated) is one document of a text dataset
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
        rows = [{"text": p.strip("\n")} for p in text.split("\n\n") if p.strip()]
    elif kind == ".json":
        try:
            payload = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON at line {error.lineno}: {error.msg}") from None
        rows = payload if isinstance(payload, list) else None
        if rows is None:
            raise DataError(f"{path}: a .json dataset must be a list of objects, got {type(payload).__name__}")
    else:
        rows = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError:
                raise DataError(f"{path} row {number}: not UTF-8 text") from None
            except json.JSONDecodeError as error:
                raise DataError(f"{path} row {number}: not valid JSON ({error.msg})") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{key}.path: {path} holds no rows")
    return rows


def read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when it ends in .gz; a damaged or unreadable file is a DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: damaged or truncated gzip file ({first_line(error)})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or first_line(error)})") from None


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_source(source: DatasetSource, key: str, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of a configured dataset as (train, eval): the eval split if named, else a seeded held-out share."""
    if looks_like_local_path(source.path):
        rows = read_rows(source.path, key)
        evaluation = read_rows(source.eval_split, key) if source.eval_split else None
    else:
        rows = load_hub_split(source, source.split, key)
        evaluation = load_hub_split(source, source.eval_split, key) if source.eval_split else None
    if source.max_rows is not None:
        rows = rows[: source.max_rows]
    if evaluation is not None:
        return rows, evaluation
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(len(rows) * source.eval_fraction)) if len(rows) > 1 else 0
    eval_indices = set(order[:held_out])
    return ([r for i, r in enumerate(rows) if i not in eval_indices], [r for i, r in enumerate(rows) if i in eval_indices])


def load_hub_split(source: DatasetSource, split: str, key: str) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.name, split=split)
    except Exception as error:  # datasets raises many kinds; the user needs the id and the reason
        raise DataError(f"{key}.path: could not load hub dataset {source.path!r} split {split!r}: "
                        f"{first_line(error)}") from None
    rows = dataset.to_list()
    if not rows:
        raise DataError(f"{key}.path: hub dataset {source.path!r} split {split!r} holds no rows")
    return rows


def texts_from_rows(rows: list[dict[str, Any]], where: str) -> list[str]:
    """The `text` field of every row of a text-format dataset; a missing or non-string text names the row."""
    texts = []
    for number, row in enumerate(rows, start=1):
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where} row {number}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where} row {number}: 'text' is empty")
        texts.append(text)
    return texts
