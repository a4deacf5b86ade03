"""Stage 3, the reward model: learn which responses people prefer, with TRL's RewardTrainer.

    accelerate launch -m stages.reward --config configs/default.yaml [reward.max_steps=100 ...]

Reads, top to bottom: config → data (preference rows → prompt groups) → model (the SFT model's backbone, a
new scalar head) → RewardTrainer → held-out accuracy → reward normalisation → final/. Every field of the
`reward` section goes to TRL's `RewardConfig`; ours are `peft` (LoRA), `margin` and `normalization_samples`.

Data: the built-in task's ranked lists (K responses per prompt, best first, from a simulated annotator), or
any dataset in TRL's preference format: chosen/rejected pairs, standard or conversational, with an explicit
prompt or an implicit one (HH-RLHF's whole "\\n\\nHuman: …\\n\\nAssistant: …" transcripts, which share the
prompt and differ in the last assistant turn, become a conversation and its two last replies), or our ranked
lists (`prompt`, `ranked_completions`). A ranked list gives all K·(K−1)/2 pairs, as in InstructGPT, and they
stay together: one prompt is one batch element, each of its K responses goes through the model once, and
its pairs' losses are averaged, so a prompt weighs the same whatever its K and never dominates an epoch
(`reward.per_device_train_batch_size` counts prompts). `reward.margin` > 0 asks the chosen score to lead by
that margin times the rank gap between the two responses (Llama 2's margin loss).

After training, on the held-out rows: pairwise accuracy against the annotator's labels and, on the built-in
task, against the hidden gold judge's ordering, both in the manifest's `metrics`. Then the mean/std of the
scores of responses sampled from the SFT policy (the model this stage started from) on the prompts PPO will
see, stored as final/reward_normalization.json: PPO's rewards then start around 0 with unit spread.

Real data, e.g. Anthropic's HH-RLHF (a local copy, or the hub dataset):

    python -m stages.reward --config configs/default.yaml \\
        data.reward.path=../shared/data/hh-rlhf/harmless-base-test.jsonl.gz data.reward.eval_fraction=0.05
    python -m stages.reward --config configs/default.yaml run.offline=false \\
        data.reward.path=Anthropic/hh-rlhf data.reward.eval_split=test

Its dialogues are long for the default model's 256-token context: rows longer than `reward.max_length` after
templating stop the stage unless `data.on_bad_rows=skip` counts and leaves them out (with the default
tokenizer, 43% of harmless-base-test's 2312 rows fit; a few more are skipped because their two transcripts
differ before the last turn). With a dataset of your own, normalisation samples its held-out prompts unless
`data.ppo` names PPO's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import RewardTrainer

from data.builtin_datasets import stage_splits
from data.formats import (
    Messages, PreferencePair, ids_of_responses, preference_pairs_from_rows, prompt_token_ids,
    prompts_from_rows)
from data.builtin_task import prompt_family
from data.gold_judge import gold_score, judged_correct
from data.loading import load_source, read_rows
from data.tokenizer import load_tokenizer
from pipeline.config.schema import PipelineConfig
from pipeline.generation.padding import pad_sequences
from pipeline.generation.sampling import sample_token_ids, sampling_config
from pipeline.train.entry import run_stage_main, seed_everything, stage_input_model
from pipeline.train.final_save import save_final_model, zero3_init_lifted
from pipeline.train.models import attention_for_precision, load_causal_lm
from pipeline.train.trainer import TrainerStage
from reward_model.calibration import preference_calibration
from reward_model.losses import pairwise_accuracy, pairwise_loss
from reward_model.model import classifier_scores, load_reward_model, reward_scores, score_responses
from reward_model.normalization import RewardNormalization

STAGE = "reward"


# ---------------------------------------------------------------- data
def preference_splits(config: PipelineConfig, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval) pairs, every row checked (length included) before training starts."""
    return stage_splits(config, STAGE, partial(preference_pairs_from_rows, tokenizer=tokenizer,
                                               max_length=config.reward.get("max_length")))


def prompt_groups(pairs: list[PreferencePair], tokenizer, margin: float) -> list[dict[str, Any]]:
    """One training example per prompt: its distinct responses, tokenized once, and its pairs as
    (better, worse) indices into them with their margins."""
    groups: dict[int, dict[str, Any]] = {}
    for pair in pairs:
        group = groups.setdefault(pair.group, {"prompt": pair.prompt, "responses": {}, "better": [], "worse": [],
                                               "margin": []})
        for key, response in (("better", pair.chosen), ("worse", pair.rejected)):
            group[key].append(group["responses"].setdefault(response, len(group["responses"])))
        group["margin"].append(margin * pair.rank_gap)
    return [{"response_ids": ids_of_responses(tokenizer, group["prompt"], list(group["responses"])),
             "better": group["better"], "worse": group["worse"], "margin": group["margin"]}
            for group in groups.values()]


@dataclass
class PromptGroupCollator:
    """Prompt groups → every response of the batch right-padded in one tensor, plus each pair's two row
    indices, margin and weight (1 / its group's pairs / the groups: each prompt weighs the same)."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, better, worse, margin, weight = [], [], [], [], []
        for example in examples:
            offset, pairs = len(sequences), len(example["better"])
            sequences += example["response_ids"]
            better += [offset + i for i in example["better"]]
            worse += [offset + i for i in example["worse"]]
            margin += example["margin"]
            weight += [1 / pairs / len(examples)] * pairs
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id, "right")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "better": torch.tensor(better),
                "worse": torch.tensor(worse), "margin": torch.tensor(margin), "pair_weight": torch.tensor(weight)}


class PromptGroupedRewardTrainer(RewardTrainer):
    """RewardTrainer on prompt groups: each response scored once, then the Bradley–Terry loss on every pair.
    TRL's own layout (one pair per element, chosen half then rejected half) would score a response of a
    K = 4 list in three pairs three times, and spread a prompt's pairs over several batches."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized by prompt_groups

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["response_ids", "better", "worse", "margin"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # At the last real token (the EOS), found from the attention mask as score_token_ids does: the
        # classifier's own pooling looks for the pad token, and misses the EOS when pad == EOS.
        scores = classifier_scores(model, inputs["input_ids"], inputs["attention_mask"])
        chosen, rejected = scores[inputs["better"]], scores[inputs["worse"]]
        loss = pairwise_loss(chosen, rejected, inputs["margin"], weights=inputs["pair_weight"])
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean(scores ** 2)
        with torch.no_grad():
            accuracy = (chosen > rejected).float().mean()
            for name, value in (("accuracy", accuracy), ("margin", (chosen - rejected).mean()),
                                ("mean_reward", scores.mean())):
                self._metrics[mode][name].append(self.accelerator.reduce(value, reduction="mean").item())
        return (loss, {"scores": scores}) if return_outputs else loss


# ---------------------------------------------------------------- after training
@torch.no_grad()
def held_out_accuracy(model, tokenizer, pairs: list[PreferencePair], builtin: bool) -> dict[str, Any]:
    """Pairwise accuracy and calibration (reward_model.preference_calibration) against the annotator's labels,
    and on the built-in task against the gold judge (on the pairs the judge does not score equal), with how
    often the annotator agrees with the judge."""
    if not pairs:
        return {}
    keys = list(dict.fromkeys((p.group, r) for p in pairs for r in (p.chosen, p.rejected)))
    prompts = {p.group: p.prompt for p in pairs}
    scores = dict(zip(keys, score_responses(model, tokenizer, [prompts[g] for g, _ in keys], [r for _, r in keys]).tolist()))
    chosen = torch.tensor([scores[(p.group, p.chosen)] for p in pairs])
    rejected = torch.tensor([scores[(p.group, p.rejected)] for p in pairs])
    calibration = preference_calibration(chosen, rejected)
    metrics = {"eval_accuracy": pairwise_accuracy(chosen, rejected), "eval_pairs": len(pairs),
               "eval_calibration_error": calibration["expected_calibration_error"],
               "eval_calibration": calibration["bins"]}
    if builtin:
        gold = [(gold_score(p.prompt[-1]["content"], p.chosen), gold_score(p.prompt[-1]["content"], p.rejected))
                for p in pairs]
        ordered = [i for i, (a, b) in enumerate(gold) if a != b]
        gold_prefers_chosen = torch.tensor([gold[i][0] > gold[i][1] for i in ordered])
        agrees_with_gold = (chosen[ordered] > rejected[ordered]) == gold_prefers_chosen
        metrics.update(eval_gold_accuracy=agrees_with_gold.float().mean().item(),
                       annotator_gold_agreement=gold_prefers_chosen.float().mean().item(),
                       eval_gold_pairs=len(ordered),
                       eval_gold_accuracy_by_kind=gold_accuracy_by_kind([pairs[i] for i in ordered],
                                                                        agrees_with_gold.tolist()))
        gold_calibration = preference_calibration(chosen[ordered], rejected[ordered], gold_prefers_chosen)
        metrics.update(eval_gold_calibration_error=gold_calibration["expected_calibration_error"],
                       eval_gold_calibration=gold_calibration["bins"])
    return metrics


def gold_accuracy_by_kind(pairs: list[PreferencePair], agrees: list[bool]) -> dict[str, dict[str, float]]:
    """Agreement with the gold judge per kind of pair: the prompt's family, and whether the judge finds one response
    correct and the other not (which on story_qa and write_story takes reading the prompt) or both alike (then the
    order rests on politeness, length and repetition). {"story_qa, correctness differs": {"accuracy", "pairs"}}."""
    kinds: dict[str, list[bool]] = {}
    for pair, agreed in zip(pairs, agrees):
        text = pair.prompt[-1]["content"]
        differs = judged_correct(text, pair.chosen) != judged_correct(text, pair.rejected)
        kind = f"{prompt_family(text)}, {'correctness differs' if differs else 'same correctness'}"
        kinds.setdefault(kind, []).append(agreed)
    return {kind: {"accuracy": sum(values) / len(values), "pairs": len(values)} for kind, values in sorted(kinds.items())}


def normalization_prompts(config: PipelineConfig, eval_pairs: list[PreferencePair]) -> list[Messages]:
    """The prompts PPO will answer: data.ppo's, else the built-in task's, else the reward data's held-out ones."""
    count = config.reward["normalization_samples"]
    if config.data.ppo is not None:
        rows, _ = load_source(config.data.ppo, "data.ppo", config.run.seed)
        return prompts_from_rows(rows[:count], f"data.ppo ({config.data.ppo.path})", "skip")
    if config.data.reward is None:
        path = config.run_dir / "data" / "ppo_prompts.jsonl"
        return prompts_from_rows(read_rows(path)[:count], str(path), "skip")
    held_out = {pair.group: pair.prompt for pair in eval_pairs}
    return list(held_out.values())[:count]


@torch.no_grad()
def normalization_from_policy_samples(config: PipelineConfig, policy_path: str, reward_model, tokenizer,
                                      prompts: list[Messages]) -> RewardNormalization:
    """Sample one response per prompt from the policy as PPO's rollouts will (temperature, length, stop at
    EOS), score the token ids as PPO will, and keep the scores' mean and std."""
    if not prompts:
        print("[reward] no prompts to sample for reward normalisation: PPO will use raw scores")
        return RewardNormalization()
    policy = load_causal_lm(policy_path, tokenizer, config.model.trust_remote_code).eval()
    torch.manual_seed(config.run.seed)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    sampling = sampling_config(config.ppo.response_length, tokenizer.eos_token_id, tokenizer.pad_token_id,
                               config.ppo.temperature)
    responses = sample_token_ids(policy, prompt_ids, sampling, config.ppo.local_rollout_forward_batch_size,
                                 description="[reward] sampling for normalisation")
    reward_model.eval()
    scores = reward_scores(reward_model, prompt_ids, responses, tokenizer.pad_token_id,
                           description="[reward] scoring for normalisation")
    return RewardNormalization.from_scores(scores)


# ---------------------------------------------------------------- the stage
def run_reward(config: PipelineConfig, restart: bool = False) -> Path:
    """Train the reward model; return the directory of the final checkpoint."""
    stage = TrainerStage(config, STAGE, restart)  # the launched engine, or a one-line error, before any write
    if stage.already_finished:
        return stage.final_dir
    seed_everything(config.run.seed)  # the new head's initial weights come from torch's generator
    section = config.reward
    input_model = stage_input_model(config, STAGE)
    tokenizer = load_tokenizer(input_model, config.model.trust_remote_code)
    train_pairs, eval_pairs = preference_splits(config, tokenizer)
    train, evaluation = (prompt_groups(pairs, tokenizer, section["margin"]) for pairs in (train_pairs, eval_pairs))
    stage.print(f"{len(train_pairs)} pairs from {len(train)} prompts, {len(eval_pairs)} held-out pairs from "
                f"{len(evaluation)} prompts; from {input_model}")

    model, _ = load_reward_model(input_model, config.model.trust_remote_code)
    peft_config = None
    if section.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**section["peft"], task_type="SEQ_CLS")  # SEQ_CLS also trains the new head
    arguments = stage.arguments(has_eval=bool(evaluation), remove_unused_columns=False)
    attention_for_precision(model, arguments.bf16, arguments.device)
    trainer = PromptGroupedRewardTrainer(
        model=model, args=arguments, train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation) if evaluation else None, processing_class=tokenizer,
        data_collator=PromptGroupCollator(tokenizer.pad_token_id), peft_config=peft_config,
        callbacks=stage.callbacks())
    stage.train(trainer, input_model)

    final_dir = stage.final_dir
    # The DeepSpeed engine (model_wrapped) is what gathers ZeRO-3's partitions; a LoRA adapter is merged.
    save_final_model(trainer.accelerator, trainer.model_wrapped, tokenizer, final_dir)
    manifest = {}
    if trainer.is_world_process_zero():
        # Measured on the saved weights, as loaded by PPO and the report, by this process alone: under ZeRO-3
        # transformers would build the models partitioned, a collective the other processes are not in.
        with zero3_init_lifted():
            saved, _ = load_reward_model(str(final_dir), config.model.trust_remote_code)
            metrics = held_out_accuracy(saved, tokenizer, eval_pairs, builtin=config.data.reward is None)
            normalization = normalization_from_policy_samples(config, input_model, saved, tokenizer,
                                                              normalization_prompts(config, eval_pairs))
        normalization.save(final_dir)
        manifest = {"train_pairs": len(train_pairs), "train_prompts": len(train), "metrics": metrics,
                    "normalization": {"mean": normalization.mean, "std": normalization.std}}
        gold = f", {metrics['eval_gold_accuracy']:.3f} vs the gold judge" if "eval_gold_accuracy" in metrics else ""
        if metrics:
            stage.print(f"held-out pairwise accuracy {metrics['eval_accuracy']:.3f} vs the annotator{gold}")
    return stage.finish(trainer, **manifest)


def main(argv: list[str] | None = None) -> None:
    run_stage_main(STAGE, run_reward, argv)


if __name__ == "__main__":
    main()
