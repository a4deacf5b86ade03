"""Retrieval-augmented answers on the built-in story questions: is the right story found, and does the answer improve?

A corpus of held-out story_qa prompts' stories (one per row of a .jsonl file, duplicates dropped) is indexed the way
`rlhf generate --docs` indexes a folder; each question is then asked with no story, with the top retrieved story and
with the true story, and the gold judge says whether the answer names the asked-for fact (data/gold_judge.py,
`story_answer_correct`). Measured for each embedding (TF-IDF, the model's own mean-pooled states) and each model
given (default: the default run's PPO policy and SmolLM2-135M-Instruct's run, where they exist):

    python bench/rag.py [--stories 1000] [--questions 200] [--answers 100] [--speed-passages 10000]
                        [--model runs/default/ppo/final --model runs/smollm2/ppo/final ...]

Prints readable lines, then every figure as one JSON line. Speed: indexing --speed-passages stories with each
embedding (from an empty cache) and the median retrieval time of one question, with the first model.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODELS = (REPO / "runs" / "default" / "ppo" / "final", REPO / "runs" / "smollm2" / "ppo" / "final")


def story_questions(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, story, question) of `count` held-out story_qa prompts with distinct stories."""
    from data.builtin_task import QA_PREFIX, draw_prompt

    rng, seen, found = random.Random(seed), set(), []
    while len(found) < count:
        family, prompt = draw_prompt(rng, held_out=True)
        if family != "story_qa":
            continue
        story, _, question = prompt[len(QA_PREFIX):].partition("\nQuestion: ")
        if story not in seen:
            seen.add(story)
            found.append((prompt, story, question))
    return found


def write_corpus(stories: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stories.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    return folder


def recall(index, items: list[tuple[str, str, str]], ks=(1, 5)) -> tuple[dict[str, float], float]:
    """recall@k of the true story over the questions, and the median seconds of one retrieval."""
    hits, seconds = {k: 0 for k in ks}, []
    for _, story, question in items:
        started = time.perf_counter()
        found = [r.passage.text for r in index.search(question, max(ks))]
        seconds.append(time.perf_counter() - started)
        for k in ks:
            hits[k] += story in found[:k]
    return {f"recall@{k}": hits[k] / len(items) for k in ks}, statistics.median(seconds)


def retrieval_ceiling(items: list[tuple[str, str, str]], asked, ks=(1, 5)) -> dict[str, float]:
    """The best recall@k any retriever can expect from the question alone: a built-in question names a person (and
    sometimes an object), and every story that states that kind of fact about them fits it equally; with ties
    broken at random, recall@k is min(1, k / fitting stories)."""
    from data.builtin_task import question_answer, story_facts

    facts = [story_facts(story) for _, story, _ in items]
    shares = {k: [] for k in ks}
    for prompt, _, _ in asked:
        kind, _, name, thing = question_answer(prompt)
        fitting = sum(1 for (_, story, _), known in zip(items, facts)
                      if kind in known.get(name, {}) and (not thing or thing in story))
        for k in ks:
            shares[k].append(min(1.0, k / max(fitting, 1)))
    return {f"recall@{k}": sum(values) / len(values) for k, values in shares.items()}


def answer_accuracy(model, tokenizer, template: str, index, items, max_new_tokens: int) -> dict[str, float]:
    """Share of right answers (gold judge) with no story, the top retrieved story and the true story."""
    from data.gold_judge import story_answer_correct
    from pipeline.cli.generate import SamplingSettings, generate_responses
    from pipeline.retrieval.index import Retrieved
    from pipeline.retrieval.documents import Passage
    from pipeline.retrieval.prompts import render

    settings = SamplingSettings(greedy=True, max_new_tokens=max_new_tokens)
    conditions = {
        "no_story": [render(q, [], template) if template == "story" else q for _, _, q in items],
        "retrieved_story": [render(q, index.search(q, 1), template) for _, _, q in items],
        "true_story": [render(q, [Retrieved(Passage("stories.jsonl", 0, s), 1.0)], template) for _, s, q in items],
    }
    accuracy = {}
    for name, prompts in conditions.items():
        answers = generate_responses(model, tokenizer, prompts, settings)
        accuracy[name] = sum(story_answer_correct(p, a) for (p, _, _), a in zip(items, answers)) / len(items)
    return accuracy


def indexing_speed(model, tokenizer, checkpoint: str, passages: int, seed: int, embeddings) -> dict[str, dict]:
    """Seconds to index `passages` distinct stories from an empty cache, and the median retrieval time."""
    from pipeline.retrieval.index import build_index

    items = story_questions(passages, seed + 1)
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        write_corpus([s for _, s, _ in items], Path(folder) / "docs")
        for embedding in embeddings:
            started = time.perf_counter()
            index, _ = build_index(Path(folder) / "docs", embedding, model, tokenizer, checkpoint,
                                   Path(folder) / f"cache-{embedding}", show_progress=False)
            seconds = time.perf_counter() - started
            _, query = recall(index, items[:100])
            figures[embedding] = {"passages": passages, "index_seconds": round(seconds, 2),
                                  "query_ms_median": round(1000 * query, 2)}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a checkpoint to answer with (repeatable)")
    parser.add_argument("--stories", type=int, default=1000, help="stories in the corpus")
    parser.add_argument("--questions", type=int, default=200, help="questions for retrieval recall")
    parser.add_argument("--answers", type=int, default=100, help="questions answered per condition and model")
    parser.add_argument("--speed-passages", type=int, default=10000, help="passages indexed for the speed figures")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    arguments = parser.parse_args(argv)
    checkpoints = arguments.model or [str(p) for p in DEFAULT_MODELS if p.is_dir()]
    missing = [c for c in checkpoints if not Path(c).is_dir()]
    if not checkpoints or missing:
        print(f"error: no checkpoint to answer with ({', '.join(missing) or 'run `rlhf run configs/default.yaml`'})",
              file=sys.stderr)
        return 2
    if min(arguments.stories, arguments.questions, arguments.answers) < 1 or arguments.questions > arguments.stories:
        print("error: --stories, --questions and --answers must be positive, --questions at most --stories",
              file=sys.stderr)
        return 2

    import torch

    from pipeline.cli.generate import load_for_sampling
    from pipeline.retrieval.embeddings import EMBEDDINGS
    from pipeline.retrieval.index import build_index
    from pipeline.retrieval.prompts import template_for
    from pipeline.train.entry import quiet_transformers

    quiet_transformers()
    items = story_questions(arguments.stories, arguments.seed)
    asked = items[: arguments.questions]
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "stories": len(items), "questions": len(asked), "answers": arguments.answers,
              "ceiling": retrieval_ceiling(items, asked), "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        docs = write_corpus([s for _, s, _ in items], Path(folder) / "docs")
        for checkpoint in checkpoints:
            model, tokenizer = load_for_sampling(checkpoint)
            template = template_for(checkpoint)
            cache = Path(folder) / f"cache-{len(result['models'])}"  # each model indexes from nothing
            figures = {"template": template, "embeddings": {}}
            for embedding in EMBEDDINGS:
                started = time.perf_counter()
                index, _ = build_index(docs, embedding, model, tokenizer, checkpoint, cache, show_progress=False)
                index_seconds = time.perf_counter() - started
                recalls, query = recall(index, asked)
                figures["embeddings"][embedding] = {**recalls, "index_seconds": round(index_seconds, 2),
                                                    "query_ms_median": round(1000 * query, 2)}
            best = max(EMBEDDINGS, key=lambda e: figures["embeddings"][e]["recall@1"])
            index, _ = build_index(docs, best, model, tokenizer, checkpoint, cache, show_progress=False)
            figures["answers_with"] = best
            figures["accuracy"] = answer_accuracy(model, tokenizer, template, index, items[: arguments.answers],
                                                  arguments.max_new_tokens)
            if checkpoint == checkpoints[0]:  # the speed goal is the first model's (the default policy's)
                figures["speed"] = indexing_speed(model, tokenizer, checkpoint, arguments.speed_passages,
                                                  arguments.seed, EMBEDDINGS)
            result["models"][checkpoint] = figures

    print(f"RAG on the built-in story questions ({result['date']}, {result['machine']}): a corpus of {len(items)} "
          f"stories, recall over {len(asked)} questions, answers to {arguments.answers}")
    print(f"  the question alone fits several stories: the best recall to expect is recall@1 "
          f"{result['ceiling']['recall@1']:.3f}, recall@5 {result['ceiling']['recall@5']:.3f}")
    for checkpoint, figures in result["models"].items():
        print(f"{checkpoint} ({figures['template']} template):")
        for embedding, values in figures["embeddings"].items():
            print(f"  {embedding:6} recall@1 {values['recall@1']:.3f}  recall@5 {values['recall@5']:.3f}  "
                  f"index {values['index_seconds']:.1f} s  query {values['query_ms_median']:.1f} ms")
        accuracy = figures["accuracy"]
        print(f"  right answers (gold judge), retrieval by {figures['answers_with']}: no story "
              f"{accuracy['no_story']:.2f}, retrieved story {accuracy['retrieved_story']:.2f}, true story "
              f"{accuracy['true_story']:.2f}")
        for embedding, values in figures.get("speed", {}).items():
            print(f"  speed, {embedding}: {values['passages']} passages indexed in {values['index_seconds']:.1f} s, "
                  f"a query in {values['query_ms_median']:.1f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
