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
import json
import math
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from data.builtin_datasets import write_atomically
from pipeline.config.loading import config_from_mapping, load_config
from pipeline.config.parsing import ConfigError, apply_override, read_yaml_mapping
from pipeline.config.schema import STAGES, PipelineConfig
from pipeline.config.validation import validate
from pipeline.run.files import write_json_atomically
from pipeline.run.launch import LocalStageLauncher, StageFailed, run_stages
from pipeline.run.manifests import read_manifest
from pipeline.run.stage_graph import cached_directory_digest
from pipeline.scaling.analysis import analyse, config_run_point
from pipeline.scaling.corpus import Corpus, prepare_corpus
from pipeline.scaling.grid import (
    QUICK_GRID,
    QUICK_OVERRIDES,
    GridPlan,
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


# ---------------------------------------------------------------- the points
def point_rows(point: SweepPoint, corpus: Corpus) -> int:
    """The first rows of the corpus a point reads: enough for its token budget with a margin, at most all of it."""
    return min(corpus.rows, math.ceil(point.tokens / corpus.tokens_per_row * 1.05) + 64)


def point_overrides(sweep: Sweep, point: SweepPoint, corpus: Corpus) -> list[str]:
    """What makes the base config this point: its shape, steps (warmup and cosine fitted to them, as Hoffmann et
    al. match the schedule to each token budget), its share of the corpus, its run directory."""
    settings = sweep.config.pretrain
    rows = point_rows(point, corpus)
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
    rows = point_rows(point, corpus)
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
    corpus = prepare_corpus(sweep.config, sweep.directory, max(point.tokens for point in sweep.plan.points))
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
