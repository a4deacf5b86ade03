"""The grid of a scaling sweep: model sizes × compute budgets, read from a config's `sweep:` section and checked
before anything is trained.

Every size trains once per compute budget C on D = C / (6 N) tokens, N its non-embedding parameters (Kaplan et al.
2020 count those: embeddings add parameters but almost no compute per token). Equal budgets across sizes make the
IsoFLOP profiles of Hoffmann et al. 2022 (their approach 2) direct: at each C, loss against N. A point with fewer
than `min_steps` optimizer steps is left out and listed: a few warmup steps measure the schedule, not the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig


@dataclass(frozen=True)
class ModelSize:
    """One Llama-style shape of the sweep; `intermediate` defaults to Llama's ≈ 2.75 × hidden (a multiple of 8)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int = 0
    learning_rate: float | None = None  # None: the config's pretrain.learning_rate

    @property
    def name(self) -> str:
        return f"{self.layers}x{self.hidden}"

    @property
    def mlp_width(self) -> int:
        return self.intermediate or max(8, round(self.hidden * 2.75 / 8) * 8)

    def non_embedding_parameters(self) -> int:
        """Attention (q, k, v, o), the SwiGLU MLP (three matrices) and two RMSNorms per layer, and the final norm."""
        per_layer = 4 * self.hidden * self.hidden + 3 * self.hidden * self.mlp_width + 2 * self.hidden
        return self.layers * per_layer + self.hidden

    def overrides(self) -> list[str]:
        """The run-config overrides that build this shape."""
        return [f"model.num_hidden_layers={self.layers}", f"model.hidden_size={self.hidden}",
                f"model.num_attention_heads={self.heads}", f"model.intermediate_size={self.mlp_width}"]


@dataclass
class SweepGrid:
    sizes: list[ModelSize]
    compute: list[float]  # FLOPs, C = 6 N D
    min_steps: int = 20
    # Runs shorter than this are trained and drawn but left out of the fits: their loss is still the warmup's fast
    # early fall, which no power law of N and D describes (on the default grid, 22–50-step runs of the larger sizes
    # sit at 2.4–4.5 nats where every run of 100 steps or more is below 1.3).
    fit_min_steps: int = 100
    probe_steps: int = 200  # story-question fine-tuning steps of the reading probe (0: no probe)
    probe_questions: int = 100  # held-out story questions the probe asks
    holdout_budgets: int = 1  # the largest compute budgets left out of the fit and predicted by it
    bootstrap: int = 200  # refits on resampled points, for the intervals
    parallel: int = 1  # points trained at once, each on cpu_count / parallel threads (tiny models use one core badly)


@dataclass(frozen=True)
class SweepPoint:
    size: ModelSize
    compute: float
    tokens: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.size.name}-C{self.compute:.2e}".replace("+", "")


# The default grid: 6 sizes spanning 33× in non-embedding parameters (55k to 1.8M) × 5 budgets each a doubling,
# 29 points of at least 20 steps, about 40 minutes on 2 CPU cores (bench/results/). The default run's pretraining,
# 4 × 128 for 400 steps of 2,048 tokens, is C ≈ 4e12: inside the grid.
DEFAULT_GRID = {
    "sizes": [[2, 48, 2], [2, 64, 2], [3, 80, 2], [4, 96, 3], [4, 128, 4], [4, 192, 6]],
    "compute": [2.5e11, 5e11, 1e12, 2e12, 4e12],
}


# `--quick`: 5 sizes spanning 64× × 4 budgets on blocks of 8 × 64 tokens, a short probe; about 3 minutes.
QUICK_GRID = {
    "sizes": [[1, 32, 2], [2, 48, 2], [2, 64, 2], [3, 96, 3], [4, 128, 4]],
    "compute": [1.2e10, 2.4e10, 4.8e10, 9.6e10],
    "min_steps": 10,
    "fit_min_steps": 40,
    "probe_steps": 40,
    "probe_questions": 50,
    "bootstrap": 50,
    "parallel": 2,
}
QUICK_OVERRIDES = ["pretrain.per_device_train_batch_size=8", "pretrain.seq_length=64", "pretrain.eval_batches=4"]


GRID_FIELDS = ("sizes", "compute", "min_steps", "fit_min_steps", "probe_steps", "probe_questions", "holdout_budgets", "bootstrap",
               "parallel")


def parse_grid(raw: Any) -> SweepGrid:
    """A SweepGrid from a `sweep:` mapping (DEFAULT_GRID fills what it leaves out); a one-line ConfigError naming
    the key otherwise."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep: must be a mapping of {', '.join(GRID_FIELDS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(GRID_FIELDS))
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}: unknown key; known: {', '.join(GRID_FIELDS)}")
    merged = {**DEFAULT_GRID, **raw}
    sizes = merged["sizes"]
    if not isinstance(sizes, list) or not sizes:
        raise ConfigError("sweep.sizes: the grid is empty; list at least one size as [layers, hidden, heads]")
    compute = merged["compute"]
    if not isinstance(compute, list) or not compute:
        raise ConfigError("sweep.compute: the grid is empty; list at least one compute budget in FLOPs (e.g. 1e12)")
    budgets = []
    for index, value in enumerate(compute):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"sweep.compute[{index}]: must be a positive number of FLOPs, got {value!r}")
        budgets.append(float(value))
    if len(set(budgets)) != len(budgets):
        raise ConfigError("sweep.compute: a budget is listed twice")
    grid = SweepGrid(sizes=[parse_size(entry, index) for index, entry in enumerate(sizes)], compute=sorted(budgets))
    if len({size.name for size in grid.sizes}) != len(grid.sizes):
        raise ConfigError("sweep.sizes: a size (layers x hidden) is listed twice")
    for name in GRID_FIELDS[2:]:
        value = merged.get(name, getattr(grid, name))
        least = 1 if name in ("min_steps", "parallel") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"sweep.{name}: must be a whole number ≥ {least}, got {value!r}")
        setattr(grid, name, value)
    return grid


def parse_size(entry: Any, index: int) -> ModelSize:
    where = f"sweep.sizes[{index}]"
    if isinstance(entry, list):
        if len(entry) != 3:
            raise ConfigError(f"{where}: a size is [layers, hidden, heads], got {entry!r}")
        entry = dict(zip(("layers", "hidden", "heads"), entry))
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a size is [layers, hidden, heads] or a mapping with those keys, got {entry!r}")
    unknown = sorted(set(entry) - {"layers", "hidden", "heads", "intermediate", "learning_rate"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; known: layers, hidden, heads, intermediate, "
                          f"learning_rate")
    for key in ("layers", "hidden", "heads"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key}: must be a positive whole number, got {value!r}")
    layers, hidden, heads = entry["layers"], entry["hidden"], entry["heads"]
    if hidden % heads:
        raise ConfigError(f"{where}: hidden size {hidden} does not divide into {heads} heads")
    if (hidden // heads) % 2:
        raise ConfigError(f"{where}: head size {hidden // heads} (hidden {hidden} / {heads} heads) is odd; rotary "
                          f"position embeddings need an even head size")
    intermediate = entry.get("intermediate", 0)
    if isinstance(intermediate, bool) or not isinstance(intermediate, int) or intermediate < 0:
        raise ConfigError(f"{where}.intermediate: must be a positive whole number, got {intermediate!r}")
    learning_rate = entry.get("learning_rate")
    if learning_rate is not None and (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
                                      or not 0 < learning_rate < 1):
        raise ConfigError(f"{where}.learning_rate: must be a number in (0, 1), got {learning_rate!r}")
    return ModelSize(layers, hidden, heads, intermediate, learning_rate)


def tokens_per_step(config: PipelineConfig) -> int:
    settings = config.pretrain
    return settings.per_device_train_batch_size * settings.gradient_accumulation_steps * settings.seq_length


@dataclass
class GridPlan:
    points: list[SweepPoint]
    too_short: list[SweepPoint] = field(default_factory=list)  # fewer than min_steps steps: not trained


def plan_points(grid: SweepGrid, config: PipelineConfig, processes: int = 1) -> GridPlan:
    """Every (size, budget) with its token budget and steps; a budget under one batch for some size is a
    ConfigError, one under min_steps steps is set aside."""
    batch_tokens = tokens_per_step(config) * processes
    plan = GridPlan([])
    for size in grid.sizes:
        parameters = size.non_embedding_parameters()
        for compute in grid.compute:
            tokens = int(compute / (6 * parameters))
            if tokens < batch_tokens:
                raise ConfigError(
                    f"sweep.compute: budget {compute:.3g} gives size {size.name} ({parameters:,} non-embedding "
                    f"parameters) {tokens:,} tokens, under one batch of {batch_tokens:,} (pretrain batch size × "
                    f"seq_length); raise the budget or shrink pretrain.per_device_train_batch_size")
            steps = tokens // batch_tokens
            point = SweepPoint(size, compute, steps * batch_tokens, steps)
            (plan.points if steps >= grid.min_steps else plan.too_short).append(point)
    if not plan.points:
        raise ConfigError(f"sweep: no point of the grid reaches sweep.min_steps={grid.min_steps} steps; raise "
                          f"sweep.compute or lower sweep.min_steps")
    return plan
