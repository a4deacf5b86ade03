"""The figures of a comparison, computed from its samples: means, per-prompt win rates with Wilson intervals, the
exact best-of-N table, the over-optimisation curve's points, and per task family, the prompts PPO loses."""

from __future__ import annotations

from pipeline.evaluation.samples import POOL, Comparison, Sample

import math
from typing import Any
from data.builtin_task import TASK_FAMILIES, prompt_family
from pipeline.config.parsing import ConfigError
from pipeline.evaluation.best_of_n import best_of_n_kl, expected_best_of_n


LOSSES_SHOWN = 3  # prompts per task family where PPO loses to SFT, side by side


def win_rate(first: list[float], second: list[float]) -> dict[str, float]:
    """Share of prompts where `first` beats `second` (ties count half), with a 95% Wilson interval."""
    n = len(first)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(first, second))
    p = wins / n if n else float("nan")
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n) if n else float("nan")
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n) if n else float("nan")
    ties = sum(a == b for a, b in zip(first, second))
    return {"win_rate": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "prompts": n, "ties": ties}


def best_of_sizes(best_of) -> tuple[int, ...]:
    """The best-of-N sizes asked for, ascending: none, or 0 alone, turns the baselines off."""
    sizes = sorted(set(int(n) for n in best_of or ()) - {0})
    if any(n < 1 for n in sizes):
        raise ConfigError(f"rlhf compare: --best-of takes sample counts of at least 1 (0 alone: off), got "
                          f"{' '.join(str(n) for n in best_of)}")
    return tuple(sizes)


def curve_sizes(best_of: tuple[int, ...], pool_size: int) -> list[int]:
    """The best-of-N sizes to estimate: those asked for, and the powers of two up to the pool size for the
    over-optimisation curve."""
    powers = [2 ** k for k in range(pool_size.bit_length()) if 2 ** k <= pool_size]
    return sorted(set(powers) | set(best_of))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def policy_means(samples: list[Sample], policy: str, builtin: bool) -> dict[str, float]:
    """Mean reward (normalised), length, gold score (built-in task) and KL to SFT (non-SFT) of a policy's samples."""
    mine = [s for s in samples if s.policy == policy]
    means = {"reward": mean(s.reward for s in mine), "length": mean(s.length for s in mine)}
    if builtin:
        means["gold"] = mean(s.gold for s in mine)
    if mine and mine[0].kl_to_sft is not None:
        means["kl_to_sft"] = mean(s.kl_to_sft for s in mine)
    return means


def per_prompt_means(samples: list[Sample], policy: str, metric: str, prompts: int) -> list[float]:
    """A policy's mean `metric` ("reward", "gold") over its samples of each prompt, in prompt order."""
    totals, counts = [0.0] * prompts, [0] * prompts
    for s in samples:
        if s.policy == policy:
            totals[s.prompt_index] += getattr(s, metric)
            counts[s.prompt_index] += 1
    return [total / count if count else float("nan") for total, count in zip(totals, counts)]


def pools_by_prompt(samples: list[Sample], prompts: int) -> list[list[Sample]]:
    """Each prompt's best-of-N pool: its SFT samples, then its POOL samples, in the order drawn."""
    pools: list[list[Sample]] = [[] for _ in range(prompts)]
    for policy in ("sft", POOL):
        for s in samples:
            if s.policy == policy:
                pools[s.prompt_index].append(s)
    return pools


def best_of_n_table(pools: list[list[Sample]], sizes: list[int], builtin: bool) -> dict[str, dict[str, Any]]:
    """For each N: best-of-N's expected reward-model score (normalised) and gold score per prompt (the pool's
    unbiased estimate, pipeline/evaluation/best_of_n.py), their means over prompts, and its analytic KL to SFT."""
    table = {}
    for n in sizes:
        per_prompt = {"reward": [expected_best_of_n([s.reward for s in pool], [s.reward for s in pool], n)
                                 for pool in pools]}
        if builtin:
            per_prompt["gold"] = [expected_best_of_n([s.reward for s in pool], [s.gold for s in pool], n)
                                  for pool in pools]
        table[str(n)] = {"n": n, "pool_size": min(len(pool) for pool in pools), "kl_to_sft": best_of_n_kl(n),
                         **{metric: mean(values) for metric, values in per_prompt.items()}, "per_prompt": per_prompt}
    return table


def over_optimisation_points(means: dict[str, dict[str, float]], snapshot_means: dict[int, dict[str, float]],
                             final_step: int, best_of_n: dict[str, dict[str, Any]], samples_per_prompt: int,
                             snapshot_samples_per_prompt: int) -> list[dict[str, Any]]:
    """Gold and proxy (normalised reward-model) score against KL to SFT: PPO from step 0 (the SFT policy itself)
    through its snapshots to its final policy, and best-of-N at its analytic KL. Without a gold judge the points
    carry the proxy only."""
    def point(method: str, kl: float, scores: dict[str, Any], **where: Any) -> dict[str, Any]:
        return {"method": method, **where, "kl_to_sft": kl, "proxy": scores["reward"], "gold": scores.get("gold")}

    points = [point("ppo", 0.0, means["sft"], step=0, samples_per_prompt=samples_per_prompt)]
    points += [point("ppo", m["kl_to_sft"], m, step=step, samples_per_prompt=snapshot_samples_per_prompt)
               for step, m in sorted(snapshot_means.items())]
    points.append(point("ppo", means["ppo"]["kl_to_sft"], means["ppo"], step=final_step,
                        samples_per_prompt=samples_per_prompt))
    points += [point("best_of_n", row["kl_to_sft"], row, n=row["n"], pool_size=row["pool_size"])
               for row in sorted(best_of_n.values(), key=lambda row: row["n"])]
    return points


def family_figures(comparison: Comparison, shown: int = LOSSES_SHOWN) -> dict[str, dict[str, Any]]:
    """Per task family of the built-in task: PPO's gold win rate over SFT and over each best-of-N, and the
    `shown` prompts where PPO loses to SFT on gold by the most, each with PPO's lowest-gold sample beside SFT's
    highest-gold one."""
    prompts = len(comparison.prompts)
    ppo = per_prompt_means(comparison.samples, "ppo", "gold", prompts)
    sft = per_prompt_means(comparison.samples, "sft", "gold", prompts)
    families = [prompt_family(text) for text in comparison.prompts]
    figures = {}
    for family in TASK_FAMILIES:
        members = [i for i in range(prompts) if families[i] == family]
        if not members:
            continue
        rates = {"gold_vs_sft": win_rate([ppo[i] for i in members], [sft[i] for i in members])}
        for key, row in comparison.best_of_n.items():
            if int(key) in comparison.settings.get("best_of", ()):
                rates[f"gold_vs_best_of_{key}"] = win_rate([ppo[i] for i in members],
                                                           [row["per_prompt"]["gold"][i] for i in members])
        losing = sorted((i for i in members if ppo[i] < sft[i]), key=lambda i: ppo[i] - sft[i])[:shown]
        losses = []
        for i in losing:
            worst = min((s for s in comparison.samples if s.policy == "ppo" and s.prompt_index == i),
                        key=lambda s: s.gold)
            best = max((s for s in comparison.samples if s.policy == "sft" and s.prompt_index == i),
                       key=lambda s: s.gold)
            losses.append({"prompt_index": i, "prompt": comparison.prompts[i], "ppo_mean_gold": ppo[i],
                           "sft_mean_gold": sft[i], "ppo_response": worst.response, "ppo_gold": worst.gold,
                           "sft_response": best.response, "sft_gold": best.gold})
        figures[family] = {"prompts": len(members), "ppo_mean_gold": mean(ppo[i] for i in members),
                           "sft_mean_gold": mean(sft[i] for i in members), "win_rates": rates,
                           "losses_to_sft": sum(ppo[i] < sft[i] for i in members), "losses": losses}
    return figures
