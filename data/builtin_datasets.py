"""The built-in task's datasets, as the stages read them: pretraining stories, SFT dialogues, ranked responses
and prompt-only splits, generated from the world in data/builtin_task.py (responses ranked by the annotator of
data/gold_judge.py) and written once per run directory as jsonl files (rewritten only when the task config or
TASK_VERSION changes)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data.builtin_task import TASK_VERSION, draw_prompt, pretraining_stories, sample_response
from data.formats import converted_splits
from data.gold_judge import annotator_ranking, gold_score
from data.loading import read_rows
from pipeline.config.schema import BuiltinTaskConfig, PipelineConfig


def user_message(text: str) -> list[dict[str, str]]:
    """A one-turn conversational prompt."""
    return [{"role": "user", "content": text}]


def sft_dialogues(seed: int, count: int, good_fraction: float, *, held_out: bool = False) -> list[dict]:
    """Demonstrations {"messages", "family", "flaw"}: `good_fraction` of them flawless (flaw None)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        family, text = draw_prompt(rng, held_out)
        response = sample_response(text, rng, good_fraction)
        rows.append({"messages": user_message(text) + [{"role": "assistant", "content": response.text}],
                     "family": family, "flaw": response.flaw})
    return rows


def ranked_completions(seed: int, count: int, k: int, annotator_noise: float, *, held_out: bool = False) -> list[dict]:
    """Prompts with k distinct responses, ranked best first by the simulated annotator (not by the judge)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        family, text = draw_prompt(rng, held_out)
        candidates: list[str] = []
        for _ in range(20 * k):
            response = sample_response(text, rng, good_fraction=0.4).text  # more flaws: candidates that differ
            if response not in candidates:
                candidates.append(response)
                if len(candidates) == k:
                    break
        else:
            continue
        order = annotator_ranking([gold_score(text, c) for c in candidates], annotator_noise, rng)
        rows.append({"prompt": user_message(text), "family": family,
                     "ranked_completions": [[{"role": "assistant", "content": candidates[i]}] for i in order]})
    return rows


def prompts(seed: int, count: int, *, held_out: bool = False) -> list[dict]:
    """Prompt-only rows {"prompt", "family"}; held_out=True draws from the prompts reserved for evaluation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        family, text = draw_prompt(rng, held_out)
        rows.append({"prompt": user_message(text), "family": family})
    return rows


SPLITS = ("pretrain_train", "pretrain_eval", "sft_train", "sft_eval", "ranked_train", "ranked_eval", "ppo_prompts",
          "eval_prompts")


def builtin_task_files(config: BuiltinTaskConfig, out_dir: Path) -> Path:
    """The task's files in `out_dir`, written by the main process while the others wait: every process of a
    multi-process launch reads them next. Returns `out_dir`."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        write_builtin_task(config, out_dir)
    state.wait_for_everyone()
    return Path(out_dir)


# The built-in files a Trainer stage trains and evaluates on, when its dataset is not configured.
BUILTIN_SPLITS = {"sft": ("sft_train", "sft_eval"), "reward": ("ranked_train", "ranked_eval")}


def stage_splits(config: PipelineConfig, stage: str, convert: Callable[[list[dict], str, str], list[Any]]
                 ) -> tuple[list[Any], list[Any]]:
    """A Trainer stage's (train, eval) rows through `convert` (which checks every row): the dataset configured as
    data.<stage>, or else the built-in task's files for it (written once, read by every process)."""
    source = getattr(config.data, stage)
    if source is not None:
        return converted_splits(source, f"data.{stage}", config.run.seed, config.data.on_bad_rows, convert)
    data_dir = builtin_task_files(config.data.builtin, config.run_dir / "data")
    return tuple(convert(read_rows(data_dir / f"{name}.jsonl"), str(data_dir / f"{name}.jsonl"), config.data.on_bad_rows)
                 for name in BUILTIN_SPLITS[stage])


def write_builtin_task(config: BuiltinTaskConfig, out_dir: Path) -> dict[str, Path]:
    """Write the task's jsonl files and return {split: path}. An existing set whose task_manifest.json matches the
    config is kept as it is; each file is written to a temporary name and renamed, so none is ever half written."""
    config.validate()
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.jsonl" for name in SPLITS}
    manifest = out_dir / "task_manifest.json"
    wanted = {**asdict(config), "task_version": TASK_VERSION}
    if manifest.is_file() and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(manifest.read_text(encoding="utf-8")) == wanted:
                return paths
        except json.JSONDecodeError:
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # a crash below must not leave new files under an old, matching manifest
    seeds = {name: config.seed * 1000 + index for index, name in enumerate(SPLITS)}  # distinct for distinct seeds
    k, noise, good = config.completions_per_prompt, config.annotator_noise, config.good_demonstration_fraction
    generate = {
        "pretrain_train": lambda s: [{"text": t} for t in pretraining_stories(s, config.pretrain_stories)],
        "pretrain_eval": lambda s: [{"text": t} for t in pretraining_stories(s, config.pretrain_eval_stories)],
        "sft_train": lambda s: sft_dialogues(s, config.sft_dialogues, good),
        "sft_eval": lambda s: sft_dialogues(s, config.sft_eval_dialogues, good, held_out=True),
        "ranked_train": lambda s: ranked_completions(s, config.ranked_prompts, k, noise),
        "ranked_eval": lambda s: ranked_completions(s, config.ranked_eval_prompts, k, noise, held_out=True),
        "ppo_prompts": lambda s: prompts(s, config.ppo_prompts),
        "eval_prompts": lambda s: prompts(s, config.eval_prompts, held_out=True),
    }
    for name, path in paths.items():
        write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generate[name](seeds[name])))
    write_atomically(manifest, json.dumps(wanted, indent=2) + "\n")
    return paths


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path` (named per process), then rename it over `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
