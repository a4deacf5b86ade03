"""A sweep's corpus, written once: the built-in stories (drawn long enough for the largest token budget) or a
user's text file or dataset, split into train and held-out rows, with the one tokenizer every point shares."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from data.builtin_datasets import write_atomically, write_builtin_task
from data.loading import DataError, load_source, read_rows, texts_from_rows
from data.tokenizer import load_tokenizer, train_bpe_tokenizer
from pipeline.config.schema import PipelineConfig
from pipeline.run.files import atomic_directory, write_json_atomically


@dataclass
class Corpus:
    train: Path
    eval: Path
    tokenizer: Path
    rows: int
    tokens_per_row: float
    builtin: bool


def corpus_identity(config: PipelineConfig, rows_needed_hint: int) -> str:
    source = asdict(config.data.pretrain) if config.data.pretrain else asdict(config.data.builtin)
    payload = json.dumps({"source": source, "tokenizer": asdict(config.tokenizer), "rows": rows_needed_hint,
                          "seed": config.run.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def paragraphs_of_text_file(path: Path) -> list[str]:
    """A plain .txt corpus (tinyshakespeare) as documents: the blocks between blank lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"data.pretrain.path: {path} cannot be read as UTF-8 text ({error})") from None
    documents = [block.strip() for block in text.split("\n\n") if block.strip()]
    if len(documents) < 2:
        raise DataError(f"data.pretrain.path: {path} has fewer than two blocks of text between blank lines")
    return documents


def user_corpus(config: PipelineConfig) -> tuple[list[str], list[str]]:
    source = config.data.pretrain
    path = Path(source.path)
    if path.suffix == ".txt":
        documents = paragraphs_of_text_file(path)
        order = np.random.default_rng(config.run.seed).permutation(len(documents))
        held_out = max(1, round(len(documents) * source.eval_fraction))
        return ([documents[i] for i in sorted(order[held_out:])], [documents[i] for i in sorted(order[:held_out])])
    train_rows, eval_rows = load_source(source, "data.pretrain", config.run.seed)
    return (texts_from_rows(train_rows, f"data.pretrain ({source.path})"),
            texts_from_rows(eval_rows, f"data.pretrain eval ({source.path})"))


def write_rows(path: Path, texts: list[str]) -> None:
    write_atomically(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def tokens_per_row(tokenizer, texts: list[str]) -> float:
    sample = texts[:2000]
    counts = tokenizer(sample, add_special_tokens=False)["input_ids"]
    return sum(len(ids) + 1 for ids in counts) / len(sample)  # +1: the EOS that ends each document in a block


def prepare_corpus(config: PipelineConfig, sweep_directory: Path, largest: int) -> Corpus:
    """The shared corpus and tokenizer for points of up to `largest` tokens, in `sweep_directory`: written once,
    reused on resume (their directory is named by what made them). The built-in corpus is drawn long enough that no
    point repeats a story."""
    directory = sweep_directory / f"corpus-{corpus_identity(config, largest)}"
    summary_path = directory / "corpus.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        return Corpus(Path(summary["train"]), Path(summary["eval"]), Path(summary["tokenizer"]), summary["rows"],
                      summary["tokens_per_row"], summary["builtin"])
    directory.mkdir(parents=True, exist_ok=True)
    builtin = config.data.pretrain is None
    if builtin:
        task = config.data.builtin
        train, evaluation = write_builtin_task(task, directory / "task")["pretrain_train"], None
        texts = [row["text"] for row in read_rows(train)]
    else:
        texts, eval_texts = user_corpus(config)
    tokenizer_dir = directory / "tokenizer"
    if config.tokenizer.name_or_path:
        tokenizer = load_tokenizer(config.tokenizer.name_or_path, config.model.trust_remote_code)
    else:
        tokenizer = train_bpe_tokenizer(texts[: config.tokenizer.training_texts], config.tokenizer.vocab_size)
    with atomic_directory(tokenizer_dir) as staging:
        tokenizer.save_pretrained(staging)
    per_row = tokens_per_row(tokenizer, texts)
    if builtin:
        # Stories are drawn one after another from one seed: a longer corpus begins with the same stories, so the
        # tokenizer trained on the first ones is the one a default run of the same seed would train.
        needed = math.ceil(largest / per_row * 1.05) + 64
        if needed > task.pretrain_stories:
            task = replace(task, pretrain_stories=needed)
        paths = write_builtin_task(task, directory / "task")
        train, evaluation = paths["pretrain_train"], paths["pretrain_eval"]
        rows = task.pretrain_stories
    else:
        train, evaluation = directory / "pretrain_train.jsonl", directory / "pretrain_eval.jsonl"
        write_rows(train, texts)
        write_rows(evaluation, eval_texts)
        rows = len(texts)
    summary = {"train": str(train), "eval": str(evaluation), "tokenizer": str(tokenizer_dir), "rows": rows,
               "tokens_per_row": per_row, "builtin": builtin}
    write_json_atomically(summary_path, summary)
    return Corpus(train, evaluation, tokenizer_dir, rows, per_row, builtin)
