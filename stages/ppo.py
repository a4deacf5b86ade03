"""Stage 4, RLHF with PPO: optimise the SFT policy against the reward model, with a KL leash to the SFT model.

    accelerate launch -m stages.ppo --config configs/default.yaml [key=value ...]

Each step: sample responses to a batch of prompts (rollout), score them with the reward model and the
reference policy (experience), compute per-token rewards and GAE advantages, then run num_ppo_epochs of
clipped policy and value updates over shuffled minibatches. The details that decide whether PPO works are
listed in ../shared/PPO_NOTES.md; the math lives in pipeline/rl/, the models and the forwards
through them in pipeline/ppo/models.py, the rollout and its scoring in pipeline/ppo/experience.py.

Engines (pipeline/train/engines.py, sharding.py): the policy and the value model train as one PolicyAndValue with one AdamW (policy
and critic learning rates in its parameter groups), because DeepSpeed and FSDP2 prepare one model; its gradient
norm is clipped as one, as DeepSpeed clips. The reference and the reward model are placed as TRL places them,
generation gathers sharded weights, and the final policy is gathered on every process before the main one writes.

Exact resume: checkpoints are taken only between steps, so no rollout buffer is saved. The prompt order and
the minibatch order are pure functions of (seed, step, epoch); sampling uses the global torch RNG, whose
state Accelerate saves per process; β and the step go in trainer_state.json; the learning rates are a function
of the step. A non-finite gradient norm stops the run before its optimizer step, and the weights are checked
finite before every save, so no checkpoint ever holds NaN.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from data.builtin_datasets import builtin_task_files
from data.formats import prompt_token_ids, prompts_from_rows
from data.gold_judge import gold_score
from data.loading import load_source, read_rows
from data.tokenizer import load_tokenizer
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig, PPOSection
from pipeline.generation.padding import pad_sequences
from pipeline.ppo.experience import Experience, generate_rollout, score_rollout
from pipeline.ppo.models import (
    PolicyAndValue, build_critic, build_policy, policy_context_length, prepare_ppo_models, response_logits_and_values)
from pipeline.rl.kl import kl_controller_from_config
from pipeline.rl.logprobs import logprobs_of_tokens
from pipeline.rl.losses import clipped_policy_loss, clipped_value_loss, minibatch_statistics
from pipeline.run.checkpoints import policy_snapshot_dir
from pipeline.train.batches import epoch_order
from pipeline.train.custom_loop import CustomLoop
from pipeline.train.engines import accumulation_boundary, backward, clipped_gradient_norm, engine_of
from pipeline.train.entry import run_stage_main, seed_everything, stage_input_model
from pipeline.train.final_save import save_final_model
from pipeline.train.guards import fault_point, require_finite_gradient_norms, require_finite_weights
from pipeline.train.models import count_parameters
from pipeline.train.sharding import require_fsdp2_internals
from reward_model.model import load_reward_model, require_same_vocabulary
from reward_model.normalization import RewardNormalization

STAGE = "ppo"


# ---------------------------------------------------------------- data
def prompt_conversations(config: PipelineConfig) -> tuple[list[list[dict]], bool]:
    """Prompts to optimise on, as message lists, and whether they come from the built-in task (gold judge)."""
    if config.data.ppo is None:
        data_dir = builtin_task_files(config.data.builtin, config.run_dir / "data")
        rows = read_rows(data_dir / "ppo_prompts.jsonl")
        return prompts_from_rows(rows, str(data_dir / "ppo_prompts.jsonl"), config.data.on_bad_rows), True
    rows, _ = load_source(config.data.ppo, "data.ppo", config.run.seed)
    return prompts_from_rows(rows, f"data.ppo ({config.data.ppo.path})", config.data.on_bad_rows), False


def encode_prompts(conversations: list[list[dict]], tokenizer, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt with the generation prompt; a prompt too long for the context names its row."""
    encoded = [prompt_token_ids(tokenizer, conversation) for conversation in conversations]
    too_long = [i + 1 for i, ids in enumerate(encoded) if len(ids) > max_prompt_tokens]
    if too_long:
        raise ConfigError(f"ppo.response_length: prompt row {too_long[0]} has more than {max_prompt_tokens} tokens, "
                          f"so prompt and response do not fit the model's context; shorten the prompts or the "
                          f"responses")
    return encoded


def rollout_batch_size(settings: PPOSection) -> int:
    return settings.per_device_train_batch_size * settings.gradient_accumulation_steps * settings.num_mini_batches


def prompt_indices(step: int, settings: PPOSection, num_prompts: int, seed: int, process_index: int,
                   num_processes: int) -> torch.Tensor:
    """This process's prompts for a step, read in order from the epoch's seeded permutation of all prompts."""
    local = rollout_batch_size(settings)
    order, start = epoch_order(step, local * num_processes, num_prompts, seed, "ppo.per_device_train_batch_size",
                               "prompts")
    start += process_index * local
    return order[start: start + local]


# ---------------------------------------------------------------- optimisation
def learning_rate_scale(step: int, settings: PPOSection) -> float:
    """The share of the learning rates used at `step` (from 0): TRL's PPOTrainer steps a transformers schedule
    once per PPO iteration; `linear` (its default) decays from 1 at step 0 towards 0 at max_steps, `constant`
    stays at 1. A function of the step, so a resumed run uses exactly the rates an uninterrupted one does."""
    if settings.lr_scheduler_type == "constant":
        return 1.0
    return 1.0 - step / settings.max_steps


# The minibatch statistics, under the names TRL's PPOTrainer logs them with.
LOGGED_NAMES = {"policy_loss": "loss/policy_avg", "value_loss": "loss/value_avg", "clipfrac": "policy/clipfrac_avg",
                "approxkl": "policy/approxkl_avg", "ratio_mean": "val/ratio", "ratio_var": "val/ratio_var",
                "vf_clipfrac": "val/clipfrac_avg"}


def ppo_update(model: PolicyAndValue, optimizer, experience: Experience, settings: PPOSection,
               accelerator: Accelerator, generator: torch.Generator, step: int = 0) -> dict[str, torch.Tensor]:
    """num_ppo_epochs passes of shuffled minibatches, each of gradient_accumulation_steps micro-batches and one
    optimizer step, the gradient norm of policy and critic together clipped to ppo.max_grad_norm. `step` (from 0)
    names the PPO iteration in errors and in fault injection."""
    context_length = experience.sequences.shape[1] - experience.mask.shape[1]
    local_batch = len(experience.sequences)
    minibatch = local_batch // settings.num_mini_batches
    micro = settings.per_device_train_batch_size
    totals: dict[str, list[torch.Tensor]] = {}
    real_lengths = experience.attention_mask.sum(1).cpu()
    for _ in range(settings.num_ppo_epochs):
        order = torch.randperm(local_batch, generator=generator)
        for start in range(0, local_batch, minibatch):
            minibatch_indices = order[start: start + minibatch]
            # Each micro-batch's token sums are divided by the minibatch's valid-token count, so the minibatch's
            # gradient is its token mean whatever the split; hence sequences of similar length can share a
            # micro-batch (less padding to compute on). Under DDP (FSDP2, DeepSpeed) each process divides by its
            # own minibatch's count and the engine averages the processes' gradients: tokens weigh equally within a
            # process and the processes equally, as in TRL and OpenRLHF, without an all-reduce of the count.
            minibatch_indices = minibatch_indices[torch.argsort(real_lengths[minibatch_indices], stable=True)]
            token_count = experience.mask[minibatch_indices].sum()
            shares = []
            for micro_start in range(0, minibatch, micro):
                indices = minibatch_indices[micro_start: micro_start + micro]
                with accumulation_boundary(accelerator, model, last_micro_batch=micro_start + micro >= minibatch):
                    shares.append(micro_batch_loss(model, experience, indices, token_count, context_length,
                                                   settings, accelerator))
            fault_point("gradients", STAGE, step, accelerator.unwrap_model(model))
            grad_norm = clipped_gradient_norm(accelerator, model, settings.max_grad_norm)
            require_finite_gradient_norms({"policy and critic": grad_norm}, STAGE, step + 1, "ppo.learning_rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            statistics = {LOGGED_NAMES[key]: value for key, value in minibatch_statistics(shares).items()}
            statistics["grad_norm"] = grad_norm
            for key, value in statistics.items():
                totals.setdefault(key, []).append(value)
    return {key: torch.stack(values).mean() for key, values in totals.items()}


def micro_batch_loss(model: PolicyAndValue, experience: Experience, indices, token_count: torch.Tensor | int,
                     context_length: int, settings: PPOSection, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Backward of one micro-batch's share of its minibatch's loss (token sums over the minibatch's `token_count`
    valid tokens); returns its shares of the loss terms and statistics (see `minibatch_statistics`)."""
    sequences, attention_mask = experience.sequences[indices], experience.attention_mask[indices]
    mask = experience.mask[indices]
    # Columns that are padding in every row of this micro-batch (prompt padding on the left, response padding
    # on the right) only cost compute: drop them.
    first_real = int(attention_mask.any(0).int().argmax())
    response_width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    sequences = sequences[:, first_real: context_length + response_width]
    attention_mask = attention_mask[:, first_real: context_length + response_width]
    mask = mask[:, :response_width]
    context_length -= first_real
    with accelerator.autocast():  # as in scoring_forwards: the old logprobs came from the same context
        logits, values = response_logits_and_values(model, sequences, attention_mask, context_length)
    logprobs = logprobs_of_tokens(logits, sequences[:, context_length:], settings.temperature)
    width = mask.shape[1]
    policy_loss, policy_stats = clipped_policy_loss(logprobs, experience.old_logprobs[indices, :width],
                                                    experience.advantages[indices, :width], mask, settings.cliprange,
                                                    token_count=token_count)
    value_loss, value_stats = clipped_value_loss(values, experience.old_values[indices, :width],
                                                 experience.returns[indices, :width], mask, settings.cliprange_value,
                                                 token_count=token_count)
    backward(accelerator, policy_loss + settings.vf_coef * value_loss)
    return {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), **policy_stats, **value_stats}


# ---------------------------------------------------------------- the stage
def run_ppo(config: PipelineConfig, restart: bool = False) -> Path:
    """Optimise the SFT policy against the reward model; return the directory of the final policy."""
    settings = config.ppo
    loop = CustomLoop(config, STAGE, settings, restart)
    accelerator = loop.accelerator
    if loop.already_finished:
        return loop.final_dir
    if engine_of(accelerator).fsdp2:
        require_fsdp2_internals()  # generation's, checked before anything trains
    policy_path = stage_input_model(config, STAGE)
    reward_path = config.run_dir / "reward" / "final"
    if not reward_path.is_dir():
        raise ConfigError(f"ppo: needs the reward stage's model at {reward_path}; run the reward stage first")
    # Different processes must sample different responses: offset the seed by the process index.
    seed_everything(config.run.seed + accelerator.process_index)
    loop.print(f"run {config.run_dir} on {accelerator.num_processes} process(es), {accelerator.device}, "
               f"{accelerator.mixed_precision}, engine {engine_of(accelerator).name}; policy {policy_path}, "
               f"reward model {reward_path}")

    tokenizer = load_tokenizer(policy_path, config.model.trust_remote_code)
    conversations, builtin = prompt_conversations(config)
    context_limit = policy_context_length(policy_path, config)
    prompts = encode_prompts(conversations, tokenizer, context_limit - settings.response_length)
    prompt_texts = [c[-1]["content"] for c in conversations]

    policy, reference = build_policy(config, policy_path, tokenizer)
    critic = build_critic(config, policy_path, reward_path, tokenizer)
    reward_model, reward_tokenizer = load_reward_model(str(reward_path), config.model.trust_remote_code)
    require_same_vocabulary(tokenizer, reward_tokenizer, STAGE)
    normalization = RewardNormalization.load(reward_path)
    model, optimizer, reference, reward_scorer = prepare_ppo_models(policy, reference, critic, reward_model, settings,
                                                                    accelerator)
    kl_controller = kl_controller_from_config(settings.kl_coef, settings.target_kl, settings.kl_horizon)
    # Seeded again after the models are built: ZeRO-3 builds them partitioned and draws a different number of
    # random numbers doing so, and sampling must draw alike on every engine (a resumed run loads its RNG state).
    seed_everything(config.run.seed + accelerator.process_index)

    step, state = loop.resume()
    if state:
        kl_controller.load_state_dict(state["kl_controller"])
    metrics_log = loop.begin(input_checkpoint=policy_path, reward_checkpoint=str(reward_path),
                             max_steps=settings.max_steps,
                             parameters=count_parameters(accelerator.unwrap_model(model).policy))
    samples_log = loop.open_log("samples.jsonl")

    progress = tqdm(total=settings.max_steps, initial=step, desc="ppo", disable=not accelerator.is_local_main_process)
    best_eos_share = 0.0
    while step < settings.max_steps:
        fault_point("step", STAGE, step)
        indices = prompt_indices(step, settings, len(prompts), config.run.seed, accelerator.process_index,
                                 accelerator.num_processes)
        queries, query_mask = pad_sequences([prompts[i] for i in indices], tokenizer.pad_token_id, "left")
        queries, query_mask = queries.to(accelerator.device), query_mask.to(accelerator.device)
        model.eval()
        rollout = generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
        experience, rollout_stats = score_rollout(rollout, model, reference, reward_scorer, normalization,
                                                  kl_controller.value, settings, accelerator)
        model.train()
        fault_point("update", STAGE, step, accelerator.unwrap_model(model))
        lr_scale = learning_rate_scale(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_scale
        shuffle = torch.Generator().manual_seed(config.run.seed * 100_003 + step * 101 + accelerator.process_index)
        update_stats = ppo_update(model, optimizer, experience, settings, accelerator, shuffle, step)
        step += 1

        texts = tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
        local = {**rollout_stats, **update_stats}
        if builtin:
            local["objective/gold_score"] = torch.tensor(
                sum(gold_score(prompt_texts[i], t) for i, t in zip(indices.tolist(), texts)) / len(texts))
        metrics = {k: v.item() for k, v in zip(local, accelerator.reduce(
            torch.stack([v.float().to(accelerator.device) for v in local.values()]), reduction="mean"))}
        metrics["objective/kl_coef"], metrics["lr"] = kl_controller.value, settings.learning_rate * lr_scale
        kl_controller.update(metrics["objective/kl"], rollout_batch_size(settings) * accelerator.num_processes)
        check_health(metrics, step, best_eos_share, accelerator)
        best_eos_share = max(best_eos_share, metrics["val/eos_share"])
        if step % settings.logging_steps == 0 or step == settings.max_steps:
            accelerator.log(metrics, step=step)
            metrics_log.write(step, metrics)
        if step % settings.sample_steps == 0 or step == settings.max_steps:
            shown = [{"prompt": prompt_texts[i], "response": t} for i, t in zip(indices.tolist()[:4], texts[:4])]
            samples_log.write(step, {"samples": shown})
            accelerator.print("\n".join(f"[ppo step {step}] {s['prompt']!r} -> {s['response']!r}" for s in shown[:2]))
        progress.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}",
                             **({"gold": f"{metrics['objective/gold_score']:.2f}"} if builtin else {}))
        progress.update(1)
        if settings.policy_snapshot_steps and step % settings.policy_snapshot_steps == 0 and step < settings.max_steps:
            save_policy_snapshot(accelerator, model, tokenizer, policy_snapshot_dir(loop.stage_dir, step), step)
        if loop.checkpoint_due(step):
            require_finite_weights({"policy and critic": model}, STAGE, step, accelerator)
            loop.save_checkpoint(step, {"kl_controller": kl_controller.state_dict()})
    progress.close()

    require_finite_weights({"policy": accelerator.unwrap_model(model).policy}, STAGE, step, accelerator)
    save_final_model(accelerator, model, tokenizer, loop.final_dir, part="policy")
    history = metrics_log.read()
    last = history[-1] if history else {}
    return loop.finish(step, seconds_per_step=round((time.time() - loop.started) / max(step - loop.first_step, 1), 3),
                       metrics={k: last.get(k) for k in ("objective/scores", "objective/kl", "objective/gold_score",
                                                          "val/response_length", "val/eos_share")})


def save_policy_snapshot(accelerator: Accelerator, model: PolicyAndValue, tokenizer, directory: Path,
                         step: int) -> None:
    """Every process calls it: the policy alone, gathered and written as the final one is, for `rlhf compare`'s
    over-optimisation curve. Taken before the step's checkpoint, so a run resumed before that checkpoint finds it
    written (by the same identity: pipeline/run/start.py) and keeps it."""
    # The main process decides: another process could see the directory appear mid-save and skip the gather.
    if broadcast_object_list([directory.is_dir()])[0]:
        return
    require_finite_weights({"policy": accelerator.unwrap_model(model).policy}, STAGE, step, accelerator)
    # Sharded engines gather into a freshly initialised CPU copy, which draws from the CPU RNG: a resumed run that
    # skips the snapshot must go on sampling as the uninterrupted one did.
    with torch.random.fork_rng(devices=[]):
        save_final_model(accelerator, model, tokenizer, directory, part="policy")


def check_health(metrics: dict[str, float], step: int, best_eos_share: float, accelerator: Accelerator) -> None:
    """Stop on NaN/inf before it reaches a checkpoint; warn on the two classic signs of a broken setup."""
    bad = [k for k in ("loss/policy_avg", "loss/value_avg", "objective/scores", "objective/kl")
           if not math.isfinite(metrics[k])]
    if bad:
        raise FloatingPointError(f"ppo: {bad[0]} became {metrics[bad[0]]} at step {step}; stopped before saving, "
                                 f"the last good checkpoint is kept (lower ppo.learning_rate and resume)")
    if metrics["objective/kl"] < -0.5:
        warnings.warn(f"ppo step {step}: KL to the reference is {metrics['objective/kl']:.3f} < 0: the samples do "
                      f"not come from the policy (sampling settings, dropout, or precision mismatch)")
    if best_eos_share >= 0.5 and metrics["val/eos_share"] < 0.5 * best_eos_share:
        warnings.warn(f"ppo step {step}: only {metrics['val/eos_share']:.0%} of responses end with EOS "
                      f"(was {best_eos_share:.0%}); the policy is drifting to over-long outputs")


def main(argv: list[str] | None = None) -> None:
    run_stage_main(STAGE, run_ppo, argv)


if __name__ == "__main__":
    main()
