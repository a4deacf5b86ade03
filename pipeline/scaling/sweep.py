"""`rlhf sweep CONFIG`: pretrain every point of a grid, probe it, fit the laws, write results.json and scaling.html.

    RUN_DIR-sweep/                  <output_dir>/<run.name>-sweep (-quick with --quick)
      pipeline.yaml                 the config without its sweep section: what every point's stage reads
      corpus-<id>/                  the corpus once (enough rows for the largest token budget) and its tokenizer
      points/<size>-C<budget>/      a run directory per point: pretrain/ (checkpoints, manifest), log.txt, probe.json
      results.json, scaling.html    every run, the fits, the plots

Each point is the pretrain stage itself, launched as `rlhf run` launches it, so a killed sweep resumes like a run:
finished points are skipped (their identity still matches), an unfinished one resumes from its last checkpoint,
and a point whose config changed trains again. Points read the first rows of one shared corpus, as many as their
budget needs: the tokenizer pass then costs what the point trains on, not the whole corpus per point.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from data.builtin_datasets import write_atomically, write_builtin_task
from data.loading import DataError, load_source, read_rows, texts_from_rows
from data.tokenizer import load_tokenizer, train_bpe_tokenizer
from pipeline.config.loading import config_from_mapping, load_config
from pipeline.config.parsing import ConfigError, apply_override, read_yaml_mapping
from pipeline.config.schema import STAGES, PipelineConfig
from pipeline.config.validation import validate
from pipeline.run.files import atomic_directory, write_json_atomically
from pipeline.run.launch import LocalStageLauncher, StageFailed, run_stages
from pipeline.run.manifests import read_manifest
from pipeline.run.stage_graph import cached_directory_digest
from pipeline.scaling.fit import LossLaw, bootstrap_intervals, fit_loss_law, isoflop_profiles, power_law_through
from pipeline.scaling.grid import (
    QUICK_GRID,
    QUICK_OVERRIDES,
    GridPlan,
    ModelSize,
    SweepGrid,
    SweepPoint,
    parse_grid,
    plan_points,
    tokens_per_step,
)
from pipeline.scaling.probe import reading_probe


@dataclass
class Sweep:
    config: PipelineConfig  # the base config: every point is it with its size and steps overridden
    raw: dict[str, Any]  # the same as YAML would hold it, without the sweep section: what the points' stages read
    config_run: dict[str, Any]  # the config's own pretraining as a point (before --quick's smaller batches)
    grid: SweepGrid
    plan: GridPlan
    directory: Path
    quick: bool

    @property
    def base_file(self) -> Path:
        return self.directory / "pipeline.yaml"


def load_sweep(config_path: str | Path | None, overrides: list[str], quick: bool = False) -> Sweep:
    """The sweep a config describes, every value checked (ConfigError naming the key) before anything is written."""
    raw = read_yaml_mapping(Path(config_path)) if config_path else {}
    grid_raw = raw.pop("sweep", None)
    if quick:
        grid_raw = dict(QUICK_GRID)
    sweep_overrides = {"sweep": grid_raw if isinstance(grid_raw, dict) else {}}
    for override in overrides:
        apply_override(sweep_overrides if override.startswith("sweep.") else raw, override)
    config_run = config_run_point(config_from_mapping(copy.deepcopy(raw)))
    for override in QUICK_OVERRIDES if quick else []:
        apply_override(raw, override)
    if grid_raw is not None and not isinstance(grid_raw, dict):
        raise ConfigError(f"sweep: must be a mapping, got {type(grid_raw).__name__}")
    grid = parse_grid(sweep_overrides["sweep"])
    config = config_from_mapping(copy.deepcopy(raw))
    config.source = str(config_path) if config_path else None
    validate(config, STAGES)
    if config.model.name_or_path:
        raise ConfigError("model.name_or_path: a sweep trains every size from scratch; remove it (sizes come from "
                          "sweep.sizes)")
    if config.run.accelerate_config and grid.parallel > 1:
        raise ConfigError("sweep.parallel: points run one at a time under run.accelerate_config; set it to 1")
    processes = 1  # a point's batch is per process; a multi-process sweep would train on that many times more
    plan = plan_points(grid, config, processes)
    suffix = "-sweep-quick" if quick else "-sweep"
    return Sweep(config, raw, config_run, grid, plan, Path(config.run.output_dir) / f"{config.run.name}{suffix}", quick)


# ---------------------------------------------------------------- the corpus, once
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


def prepare_corpus(sweep: Sweep) -> Corpus:
    """The shared corpus and tokenizer: written once, reused on resume (their directory is named by what made
    them). The built-in corpus is drawn long enough that no point repeats a story."""
    config, largest = sweep.config, max(point.tokens for point in sweep.plan.points)
    directory = sweep.directory / f"corpus-{corpus_identity(config, largest)}"
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


# ---------------------------------------------------------------- the points
def point_overrides(sweep: Sweep, point: SweepPoint, corpus: Corpus) -> list[str]:
    """What makes the base config this point: its shape, steps (warmup and cosine fitted to them, as Hoffmann et
    al. match the schedule to each token budget), its share of the corpus, its run directory."""
    settings = sweep.config.pretrain
    rows = min(corpus.rows, math.ceil(point.tokens / corpus.tokens_per_row * 1.05) + 64)
    overrides = point.size.overrides() + [
        f"run.output_dir={sweep.directory / 'points'}", f"run.name={point.name}", "run.stages=[pretrain]",
        "run.keep_last_checkpoints=1", f"pretrain.max_steps={point.steps}",
        f"pretrain.warmup_steps={min(settings.warmup_steps, max(1, point.steps // 10))}",
        f"pretrain.eval_steps={point.steps}", f"pretrain.save_steps={max(20, point.steps // 4)}",
        f"pretrain.logging_steps={min(settings.logging_steps, point.steps)}", "pretrain.report_to=none",
        f"tokenizer.name_or_path={corpus.tokenizer}", f"data.pretrain.path={corpus.train}",
        f"data.pretrain.eval_split={corpus.eval}", f"data.pretrain.max_rows={rows}"]
    if point.size.learning_rate is not None:
        overrides.append(f"pretrain.learning_rate={point.size.learning_rate}")
    return overrides


def point_directory(sweep: Sweep, point: SweepPoint) -> Path:
    return sweep.directory / "points" / point.name


def train_point(sweep: Sweep, point: SweepPoint, corpus: Corpus, launcher: LocalStageLauncher | None,
                threads: int | None, restart: bool) -> dict[str, Any]:
    """Pretrain one point (skipped when finished, resumed when not) and return its record."""
    overrides = point_overrides(sweep, point, corpus)
    config = load_config(sweep.base_file, overrides)
    directory = point_directory(sweep, point)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        run_stages(config, overrides, {"pretrain"} if restart else set(), launcher, threads, directory / "log.txt")
    except StageFailed as failure:
        raise StageFailed(f"pretrain of sweep point {point.name} (see {directory / 'log.txt'})", failure.code) from None
    manifest = read_manifest(directory / "pretrain") or {}
    metrics = manifest.get("metrics") or {}
    rows = int(overrides[-1].split("=")[1])
    return {"name": point.name, "layers": point.size.layers, "hidden": point.size.hidden, "heads": point.size.heads,
            "intermediate": point.size.mlp_width, "non_embedding_parameters": point.size.non_embedding_parameters(),
            "parameters": manifest.get("parameters"), "compute": point.compute, "tokens": point.tokens,
            "steps": point.steps, "epochs": round(point.tokens / (rows * corpus.tokens_per_row), 3),
            "eval_loss": metrics.get("eval_loss"), "train_loss": metrics.get("train_loss"),
            "wall_time_s": manifest.get("wall_time_s"), "train_tokens_per_second": manifest.get("train_tokens_per_second"),
            "learning_rate": point.size.learning_rate or sweep.config.pretrain.learning_rate}


def probe_point(sweep: Sweep, point: SweepPoint, corpus: Corpus) -> dict[str, Any] | None:
    """The reading probe of a finished point, cached in its probe.json under the digest of the model it probed."""
    if not corpus.builtin or sweep.grid.probe_steps == 0:
        return None
    directory = point_directory(sweep, point)
    model_dir = directory / "pretrain" / "final"
    key = {"model": cached_directory_digest(model_dir, directory), "steps": sweep.grid.probe_steps,
           "questions": sweep.grid.probe_questions, "seed": sweep.config.run.seed}
    cache = directory / "probe.json"
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["result"]
    result = reading_probe(model_dir, corpus.tokenizer, sweep.grid.probe_steps, sweep.grid.probe_questions,
                           sweep.config.run.seed)
    write_json_atomically(cache, {"key": key, "result": result})
    return result


# ---------------------------------------------------------------- the analysis
def config_run_point(config: PipelineConfig) -> dict[str, float]:
    """The config's own pretraining (its model for its max_steps) as a point of the same axes."""
    size = ModelSize(config.model.num_hidden_layers, config.model.hidden_size, config.model.num_attention_heads,
                     config.model.intermediate_size)
    tokens = config.pretrain.max_steps * tokens_per_step(config)
    parameters = size.non_embedding_parameters()
    return {"name": f"{size.name} × {config.pretrain.max_steps} steps (this config's run)",
            "non_embedding_parameters": parameters, "tokens": tokens, "compute": 6.0 * parameters * tokens}


def analyse(runs: list[dict[str, Any]], grid: SweepGrid, config_run: dict[str, Any], seed: int) -> dict[str, Any]:
    """Approach 3's law with bootstrap intervals, its predictions of the held-out largest budgets, approach 2's
    frontier, and the compute-optimal split of a few budgets."""
    usable = [run for run in runs if run.get("eval_loss") is not None and math.isfinite(run["eval_loss"])
              and run["steps"] >= grid.fit_min_steps]
    sizes, budgets = {r["non_embedding_parameters"] for r in usable}, sorted({r["compute"] for r in usable})
    analysis: dict[str, Any] = {"config_run": dict(config_run),
                                "left_out_of_fit": [run["name"] for run in runs if run not in usable]}
    profiles = isoflop_profiles(usable)
    frontier = [(p.compute, p.optimal_parameters) for p in profiles if p.optimal_parameters]
    fitted_frontier = power_law_through([c for c, _ in frontier], [n for _, n in frontier])
    analysis["isoflop"] = {
        "profiles": [{"compute": p.compute, "optimal_parameters": p.optimal_parameters, "reason": p.reason,
                      "points": p.points} for p in profiles],
        "parameters_exponent": fitted_frontier[0] if fitted_frontier else None,
        "parameters_coefficient": fitted_frontier[1] if fitted_frontier else None}
    if len(usable) < 6 or len(sizes) < 2 or len(budgets) < 2:
        analysis["law"] = None
        analysis["law_reason"] = (f"{len(usable)} runs over {len(sizes)} sizes and {len(budgets)} budgets: the law "
                                  f"has 5 parameters and needs at least 6 runs, 2 sizes and 2 budgets")
        return analysis
    arrays = [np.array([r[key] for r in usable], dtype=float) for key in ("non_embedding_parameters", "tokens",
                                                                              "eval_loss")]
    law, objective = fit_loss_law(*arrays)
    analysis["law"] = {**law.as_dict(), "huber_objective": objective,
                       "intervals_90": bootstrap_intervals(*arrays, law, grid.bootstrap, seed),
                       "runs": len(usable)}
    analysis["law"]["optimal_parameters_exponent"] = law.beta / (law.alpha + law.beta)
    analysis["holdout"] = holdout_prediction(usable, budgets, grid.holdout_budgets)
    run = analysis["config_run"]
    run["predicted_loss"] = law.loss(run["non_embedding_parameters"], run["tokens"])
    # What 45 minutes of pretraining buys here, at the rate (6ND per wall-clock second, evaluation and saving
    # included) of the largest size trained: the quality preset's budget for the whole pipeline is 45 minutes.
    largest = max(sizes)
    rates = [6 * r["non_embedding_parameters"] * r["tokens"] / r["wall_time_s"] for r in usable
             if r["non_embedding_parameters"] == largest and r.get("wall_time_s")]
    analysis["flops_per_second"] = float(np.median(rates)) if rates else None
    analysis["compute_in_45_minutes"] = 2700 * analysis["flops_per_second"] if rates else None
    choices = sorted(set(budgets) | {run["compute"]} | ({analysis["compute_in_45_minutes"]} if rates else set()))
    analysis["compute_optimal"] = [dict(zip(("compute", "non_embedding_parameters", "tokens"),
                                            (c, *law.compute_optimal(c))), predicted_loss=law.loss(*law.compute_optimal(c)))
                                   for c in choices]
    return analysis


def holdout_prediction(runs: list[dict[str, Any]], budgets: list[float], held: int) -> dict[str, Any] | None:
    """Fit without the `held` largest budgets and predict their runs: the fit's claim to extrapolate."""
    if held == 0 or len(budgets) - held < 2:
        return None
    cut = budgets[-held]
    seen = [r for r in runs if r["compute"] < cut]
    unseen = [r for r in runs if r["compute"] >= cut]
    if len(seen) < 6 or len({r["non_embedding_parameters"] for r in seen}) < 2:
        return None
    law, _ = fit_loss_law(*[np.array([r[key] for r in seen], dtype=float)
                            for key in ("non_embedding_parameters", "tokens", "eval_loss")])
    predictions = [{"name": r["name"], "eval_loss": r["eval_loss"],
                    "predicted": law.loss(r["non_embedding_parameters"], r["tokens"])} for r in unseen]
    errors = [abs(p["predicted"] - p["eval_loss"]) / p["eval_loss"] for p in predictions]
    return {"fitted_below_compute": cut, "fitted_runs": len(seen), "law": law.as_dict(), "predictions": predictions,
            "mean_relative_error": float(np.mean(errors)), "max_relative_error": float(np.max(errors))}


def machine() -> str:
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores, {processor}"


def available_cores() -> int:
    """The cores this process may run on: `taskset -c 0 rlhf sweep ...` leaves the other core to another job."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- the command
def run_sweep(sweep: Sweep, restart: bool = False) -> Path:
    """Train and probe every point (resuming), fit, and write results.json and scaling.html; returns the page."""
    from pipeline.scaling.page import write_page

    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_atomically(sweep.base_file, yaml.safe_dump(sweep.raw, sort_keys=False))
    corpus = prepare_corpus(sweep)
    points = sweep.plan.points
    launcher = None if sweep.config.run.accelerate_config else LocalStageLauncher(sweep.config).start()
    threads = max(1, available_cores() // sweep.grid.parallel)
    records: dict[str, dict[str, Any]] = {}
    began = datetime.datetime.now()
    with tqdm(total=len(points), desc="sweep", unit="point") as progress:
        def train(point: SweepPoint) -> None:
            records[point.name] = train_point(sweep, point, corpus, launcher, threads, restart)
            progress.set_postfix(last=point.name, loss=f"{records[point.name]['eval_loss']:.3f}")
            progress.update(1)

        # Smallest budgets first: the first points of the fit arrive soon, and a sweep cut short has the cheap ones.
        order = sorted(points, key=lambda p: (p.compute, p.steps))
        with ThreadPoolExecutor(sweep.grid.parallel) as pool:
            for future in [pool.submit(train, point) for point in order]:
                future.result()
    for point in tqdm(points, desc="reading probe", unit="point", disable=not corpus.builtin or not sweep.grid.probe_steps):
        records[point.name]["reading_probe"] = probe_point(sweep, point, corpus)
    runs = [records[point.name] for point in points]
    results = {
        "date": began.strftime("%Y-%m-%d"), "machine": machine(),
        "seconds": round((datetime.datetime.now() - began).total_seconds()), "threads_per_point": threads,
        "config": sweep.config.source, "quick": sweep.quick, "corpus": {"builtin": corpus.builtin, "rows": corpus.rows,
                                                                       "tokens_per_row": corpus.tokens_per_row},
        "tokens_per_step": tokens_per_step(sweep.config),
        "grid": {**asdict(sweep.grid), "sizes": [asdict(s) for s in sweep.grid.sizes]},
        "runs": runs,
        "too_short": [{"name": p.name, "steps": p.steps, "compute": p.compute} for p in sweep.plan.too_short],
        **analyse(runs, sweep.grid, sweep.config_run, sweep.config.run.seed)}
    write_json_atomically(sweep.directory / "results.json", results)
    return write_page(sweep.directory, results)


def law_of(results: dict[str, Any]) -> LossLaw | None:
    law = results.get("law")
    return LossLaw(**{k: law[k] for k in ("E", "A", "alpha", "B", "beta")}) if law else None
