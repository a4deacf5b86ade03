"""Seconds per step of TRL 0.19.1's PPOTrainer on the same work as bench/ppo_step.py: the models, prompts and
batch split of bench/side_by_side.py, PPO settings as in issue 13's anchor (../shared/bench/ppo_side_by_side.py).

Runs in TRL 0.19.1's own virtual environment, which bench/compare_trl.sh makes (the project's TRL 1.x has no
PPOTrainer):

    .bench-venv-trl/bin/python bench/trl_ppo_step.py [the shape flags of bench/ppo_step.py]

A step is timed from one `on_step_end` callback to the next, so it includes everything the trainer does per
step (rollout, scoring, updates, its metric gathering and logging); the first step warms up and is not timed.
Prints a readable line, then the result as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import (  # noqa: E402
    PPOBenchShape, add_shape_arguments, llama_models, machine_description, random_prompts, shape_from_arguments,
    special_tokens_tokenizer)

TRL_VERSION = "0.19.1"


def trl_ppo_config_fields(shape: PPOBenchShape, output_dir: str, cpu: bool) -> dict:
    """PPOConfig keyword arguments for the shape: TRL's batch = per_device_train_batch_size ×
    gradient_accumulation_steps × num_mini_batches, as in our PPOSection."""
    return dict(output_dir=output_dir, per_device_train_batch_size=shape.micro_batch_size,
                gradient_accumulation_steps=shape.micro_batches, num_mini_batches=shape.minibatches,
                local_rollout_forward_batch_size=shape.batch, num_ppo_epochs=shape.epochs,
                total_episodes=shape.batch * (shape.steps + 1), response_length=shape.response_length,
                stop_token="eos", missing_eos_penalty=1.0, temperature=1.0, kl_coef=0.05,
                bf16=shape.dtype == "bf16", use_cpu=cpu, report_to=[], save_strategy="no",
                num_sample_generations=0, logging_steps=1, seed=0)


def time_trl_steps(shape: PPOBenchShape) -> dict:
    import torch
    import trl
    import trl.trainer.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import TrainerCallback

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"error: trl {trl.__version__} is installed here; this bench is for trl {TRL_VERSION} "
                         f"(run it through bench/compare_trl.sh)")
    tokenizer = special_tokens_tokenizer()
    models = llama_models(shape, tokenizer)
    stamps: list[float] = []
    lengths: list[float] = []

    class StepStamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    # The trainer cuts each response after its stop token with this function; wrapping it reads how long the
    # responses were (the EOS counted, as ours counts it) without changing what is computed.
    truncate_response = ppo_trainer.truncate_response

    def measured_truncate_response(stop_token_id, pad_token_id, responses):
        cut = truncate_response(stop_token_id, pad_token_id, responses)
        lengths.append((cut != pad_token_id).long().cumprod(1).sum(1).float().mean().item())
        return cut

    ppo_trainer.truncate_response = measured_truncate_response
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = trl.PPOConfig(**trl_ppo_config_fields(shape, output_dir, cpu=not torch.cuda.is_available()))
        trainer = trl.PPOTrainer(
            args=arguments, processing_class=tokenizer, model=models["policy"], ref_model=models["reference"],
            reward_model=models["reward"], value_model=models["value"],
            train_dataset=Dataset.from_dict({"input_ids": random_prompts(shape).tolist()}), callbacks=[StepStamps()])
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its metrics; stdout is for results
            trainer.train()
    steps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return {"steps_timed": len(steps), "sec_per_step": round(statistics.mean(steps), 3),
            "mean_response_tokens": round(statistics.mean(lengths), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    shape = shape_from_arguments(parser.parse_args())
    result = {"impl": f"trl-{TRL_VERSION}", **asdict(shape), **machine_description(), **time_trl_steps(shape)}
    print(f"trl-{TRL_VERSION} ({shape.dtype}): {result['sec_per_step']:.3f} s/step; mean response "
          f"{result['mean_response_tokens']:.2f} tokens")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
