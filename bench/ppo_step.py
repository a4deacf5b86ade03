"""Seconds per PPO step of our stage's code path (stages/ppo.py: generate_rollout, score_rollout, ppo_update),
split into rollout / scoring / optimisation; optionally the peak RSS of PPO next to SFT-style training of the
same model, full and LoRA.

The defaults are issue 13's anchor setup, the one bench/trl_ppo_step.py runs with TRL 0.19.1's PPOTrainer
(bench/compare_trl.sh runs both, alternately): vocabulary 4096, Llama 4 layers × 128 wide, 2 heads, FFN 320,
batch 64 random 24-token prompts, 48-token responses, 4 PPO epochs of one minibatch in 4 micro-batches, fp32.
The first step warms up and is not timed.

    python bench/ppo_step.py [--dtype bf16] [--steps 5] [--vocab-size 4096] [--layers 4] [--hidden-size 128]
                             [--heads 2] [--ffn 320] [--prompt-length 24] [--batch 64] [--response-length 48]
                             [--epochs 4] [--minibatches 1] [--micro-batches 4]
    python bench/ppo_step.py --memory        # peak RSS: PPO vs SFT-style training, full and LoRA

Prints a readable line, then the same as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from side_by_side import (  # noqa: E402
    PPOBenchShape, add_shape_arguments, llama_models, machine_description, random_prompts, shape_from_arguments,
    special_tokens_tokenizer)


def ppo_settings(shape: PPOBenchShape):
    """Our PPOSection for the shape, with the anchor's PPO settings (temperature 1, missing-EOS penalty 1)."""
    from pipeline.config.schema import PPOSection

    return PPOSection(per_device_train_batch_size=shape.micro_batch_size,
                      gradient_accumulation_steps=shape.micro_batches, num_mini_batches=shape.minibatches,
                      num_ppo_epochs=shape.epochs, response_length=shape.response_length,
                      local_rollout_forward_batch_size=shape.batch, missing_eos_penalty=1.0, temperature=1.0,
                      kl_coef=0.05, bf16=shape.dtype == "bf16")


def prepared_models(shape: PPOBenchShape, lora: bool, accelerator) -> dict:
    """The four models of bench/side_by_side.py, set up by the stage's own `prepare_ppo_models`: policy and critic
    as one prepared PolicyAndValue with one optimizer, the reward model behind a RewardScorer."""
    from pipeline.ppo.models import ValueModel, prepare_ppo_models
    from pipeline.train.models import configure_generation

    tokenizer = special_tokens_tokenizer()
    models = llama_models(shape, tokenizer)
    policy, reference = models["policy"], models["reference"]
    configure_generation(policy, tokenizer)
    if lora:
        from pipeline.config.schema import PeftSection
        from pipeline.train.models import with_lora_adapter

        policy = with_lora_adapter(policy, PeftSection())
        reference = None  # as in the stage: the policy with its adapter disabled
    settings = ppo_settings(shape)
    model, optimizer, reference, reward_scorer = prepare_ppo_models(
        policy, reference, ValueModel(models["value"]), models["reward"], settings, accelerator)
    return {"tokenizer": tokenizer, "model": model, "optimizer": optimizer, "settings": settings,
            "reward_scorer": reward_scorer, "reference": reference}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ppo_steps(shape: PPOBenchShape, lora: bool = False) -> dict:
    """Mean seconds of each phase over shape.steps PPO steps after one warm-up step, and the mean response
    length (responses that end at EOS early are cheaper, so it must be equal to compare with TRL)."""
    from accelerate import Accelerator

    import stages.ppo as ppo
    from pipeline.ppo.experience import generate_rollout, score_rollout
    from reward_model.normalization import RewardNormalization

    accelerator = Accelerator(mixed_precision="bf16" if shape.dtype == "bf16" else "no")
    parts = prepared_models(shape, lora, accelerator)
    model, optimizer, settings, tokenizer = parts["model"], parts["optimizer"], parts["settings"], parts["tokenizer"]
    prompts = random_prompts(shape).to(accelerator.device)
    torch.manual_seed(0)  # sampling draws from the global generator, as in the stage
    phases: dict[str, list[float]] = {"rollout": [], "scoring": [], "optimisation": []}
    steps, lengths = [], []
    for step in range(shape.steps + 1):
        queries = prompts[step * shape.batch: (step + 1) * shape.batch]
        synchronize()
        began = time.perf_counter()
        model.eval()
        rollout = generate_rollout(model, tokenizer, queries, torch.ones_like(queries), settings, accelerator)
        synchronize()
        generated = time.perf_counter()
        experience, _ = score_rollout(rollout, model, parts["reference"], parts["reward_scorer"],
                                     RewardNormalization(), settings.kl_coef, settings, accelerator)
        synchronize()
        scored = time.perf_counter()
        model.train()
        ppo.ppo_update(model, optimizer, experience, settings, accelerator, torch.Generator().manual_seed(step), step)
        synchronize()
        done = time.perf_counter()
        lengths.append(rollout.mask.sum(1).float().mean().item())
        if step > 0:
            steps.append(done - began)
            for name, seconds in zip(phases, (generated - began, scored - generated, done - scored)):
                phases[name].append(seconds)
    return {"steps_timed": len(steps), "sec_per_step": round(statistics.mean(steps), 3),
            **{name: round(statistics.mean(values), 3) for name, values in phases.items()},
            "mean_response_tokens": round(statistics.mean(lengths), 2)}


def sft_steps(shape: PPOBenchShape, lora: bool) -> torch.nn.Module:
    """SFT-style training of the same policy alone (micro-batches of prompt+response sequences, AdamW, as many
    optimizer steps as the PPO run takes); returns the trained policy."""
    from accelerate import Accelerator

    from pipeline.train.models import attention_for_precision

    accelerator = Accelerator(mixed_precision="bf16" if shape.dtype == "bf16" else "no")
    policy = llama_models(shape, special_tokens_tokenizer())["policy"]
    if lora:
        from pipeline.config.schema import PeftSection
        from pipeline.train.models import with_lora_adapter

        policy = with_lora_adapter(policy, PeftSection())
    attention_for_precision(policy, shape.dtype == "bf16", accelerator.device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(2, shape.vocab_size, (shape.micro_batch_size, shape.prompt_length + shape.response_length),
                          generator=generator).to(accelerator.device)
    for _ in range(shape.steps * shape.epochs * shape.minibatches):
        for _ in range(shape.micro_batches):
            loss = policy(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return accelerator.unwrap_model(policy)


def shape_flags(shape: PPOBenchShape) -> list[str]:
    """Command-line flags that reproduce a shape."""
    return [part for name, value in asdict(shape).items() for part in ("--" + name.replace("_", "-"), str(value))]


def peak_rss_of_child(shape: PPOBenchShape, job: str, lora: bool) -> int:
    """One measurement per process: ru_maxrss and Accelerate's state are per process."""
    command = [sys.executable, __file__, "--child", job, *shape_flags(shape)] + (["--lora"] if lora else [])
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--memory", action="store_true", help="peak RSS of PPO vs SFT-style training instead")
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["ppo", "sft"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    shape = shape_from_arguments(arguments)
    if arguments.child:
        if arguments.child == "ppo":
            time_ppo_steps(shape, arguments.lora)
        else:
            sft_steps(shape, arguments.lora)
        print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
        return
    if arguments.memory:
        for lora in (False, True):
            ppo_rss, sft_rss = peak_rss_of_child(shape, "ppo", lora), peak_rss_of_child(shape, "sft", lora)
            print(json.dumps({"memory": "lora" if lora else "full", **asdict(shape), **machine_description(),
                              "ppo_peak_rss_mb": ppo_rss, "sft_peak_rss_mb": sft_rss,
                              "ratio": round(ppo_rss / sft_rss, 2)}))
        return
    result = {"impl": "ours", **asdict(shape), **machine_description(), **time_ppo_steps(shape)}
    print(f"ours ({shape.dtype}): {result['sec_per_step']:.3f} s/step = rollout {result['rollout']:.3f} + scoring "
          f"{result['scoring']:.3f} + optimisation {result['optimisation']:.3f}; mean response "
          f"{result['mean_response_tokens']:.2f} tokens")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
