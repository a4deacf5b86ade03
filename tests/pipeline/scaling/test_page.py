"""The analysis of a sweep's runs and the page drawn from it, on runs made from a known law."""

import numpy as np
import pytest

from pipeline.scaling.fit import LossLaw
from pipeline.scaling.grid import SweepGrid
from pipeline.scaling.page import render_page, summary_sentences
from pipeline.scaling.analysis import analyse

TRUE = LossLaw(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # optimal sizes fall inside the grid


def synthetic_runs(noise: float = 0.002):
    rng = np.random.default_rng(0)
    runs = []
    for n in (5e4, 1e5, 2.3e5, 4.5e5, 8e5, 1.8e6):
        for c in (2.5e11, 5e11, 1e12, 2e12, 4e12):
            d = c / (6 * n)
            runs.append({"name": f"{n:.0e}-{c:.0e}", "layers": 2, "hidden": int(n // 1000), "non_embedding_parameters": n,
                         "tokens": d, "compute": c, "steps": 100, "epochs": 0.5, "wall_time_s": 6 * n * d / 1e10,
                         "eval_loss": TRUE.loss(n, d) * float(np.exp(rng.normal(0, noise))),
                         "reading_probe": {"accuracy": min(1.0, c / 4e12), "questions": 50}})
    return runs


def test_analysis_fits_the_law_predicts_held_out_budgets_and_splits_budgets():
    runs = synthetic_runs()
    # A run still in its warmup transient: drawn, named, not fitted.
    runs.append({**runs[0], "name": "transient", "steps": 10, "eval_loss": 4.0})
    config_run = {"name": "this config's run", "non_embedding_parameters": 8e5, "tokens": 8e5, "compute": 3.84e12}
    analysis = analyse(runs, SweepGrid(sizes=[], compute=[], bootstrap=10, holdout_budgets=1), config_run, seed=0)
    law = analysis["law"]
    assert law["alpha"] == pytest.approx(TRUE.alpha, abs=0.03) and law["beta"] == pytest.approx(TRUE.beta, abs=0.03)
    assert set(law["intervals_90"]) == {"E", "A", "alpha", "B", "beta"} and law["runs"] == 30
    assert analysis["left_out_of_fit"] == ["transient"]
    holdout = analysis["holdout"]
    assert holdout["fitted_below_compute"] == 4e12 and len(holdout["predictions"]) == 6
    assert holdout["mean_relative_error"] < 0.02
    assert analysis["config_run"]["predicted_loss"] == pytest.approx(TRUE.loss(8e5, 8e5), rel=0.02)
    budgets = [c["compute"] for c in analysis["compute_optimal"]]
    assert 3.84e12 in budgets and analysis["compute_in_45_minutes"] == pytest.approx(2700 * 1e10)
    frontier = analysis["isoflop"]["parameters_exponent"]
    assert frontier == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.1)

    results = {"date": "2026-12-06", "machine": "2 CPU cores", "seconds": 1, "config": "x.yaml",
               "corpus": {"builtin": True}, "grid": {"min_steps": 20, "fit_min_steps": 100}, "runs": runs,
               "too_short": [{"name": "big-2.5e11", "steps": 11, "compute": 2.5e11}], **analysis}
    page = render_page(results)
    assert page.count("<svg") == 5
    assert "Hoffmann et al. 2022, approach 3" in page and f"{law['alpha']:.3g}" in page
    assert "big-2.5e11: 11 steps" in page
    sentences = summary_sentences(results)
    assert any("held-out runs with a mean error" in s for s in sentences)
    assert any("left out of the fits: transient" in s for s in sentences)
