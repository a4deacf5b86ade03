"""What a sweep's runs say: Hoffmann et al.'s approach 3 law with bootstrap intervals, how well it predicts the
largest budgets it did not see, approach 2's IsoFLOP frontier, and the compute-optimal split of a few budgets."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.config.schema import PipelineConfig
from pipeline.scaling.fit import bootstrap_intervals, fit_loss_law, isoflop_profiles, power_law_through
from pipeline.scaling.grid import ModelSize, SweepGrid, tokens_per_step


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
    analysis["compute_optimal"] = []
    for compute in choices:
        parameters, tokens = law.compute_optimal(compute)
        analysis["compute_optimal"].append({"compute": compute, "non_embedding_parameters": parameters,
                                            "tokens": tokens, "predicted_loss": law.loss(parameters, tokens)})
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
