"""Stage 3, the reward model: learn human preferences from ranked responses, with TRL's RewardTrainer.

    accelerate launch -m stages.reward --config configs/default.yaml [reward.max_steps=100 ...]

The backbone comes from the SFT model, the scalar head is new. Data: chosen/rejected pairs (standard or
conversational, explicit or implicit prompt, HH-RLHF transcripts) or ranked lists of K responses, which
expand to all K·(K−1)/2 pairs as in InstructGPT. The pairs of one prompt form one batch element, so a
prompt with many comparisons does not dominate an epoch: `reward.per_device_train_batch_size` counts prompts.
With `reward.margin` > 0, a pair's margin is that value times the rank gap between its two responses.

After training: held-out pairwise accuracy against the annotator's labels and (built-in task) against the
gold judge, saved in the manifest; and the mean/std of scores on SFT samples, saved beside the weights
(reward_normalization.json) so PPO starts from rewards around 0.

Real data: `rlhf run configs/default.yaml data.reward.path=../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`
(or `data.reward.path=Anthropic/hh-rlhf data.reward.eval_split=test run.offline=false` from the hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import RewardTrainer

from data.builtin_task import gold_score, write_builtin_task
from data.formats import PreferencePair, preference_pairs_from_rows, prompts_from_rows
from data.loading import DataError, load_source, read_rows
from data.tokenizer import load_tokenizer
from pipeline.checkpoints import atomic_directory, write_manifest
from pipeline.config import PipelineConfig
from pipeline.hf_trainer import PipelineCallback, metrics_log_for, train_with_resume, trainer_arguments
from pipeline.models import load_causal_lm
from pipeline.stage import plan_stage_start, run_stage_main, stage_input_model
from reward_model import (
    RewardNormalization, encode_dialogue, load_reward_model, pairwise_accuracy, score_responses)

STAGE = "reward"


def preference_splits(config: PipelineConfig, is_main: bool) -> tuple[list[PreferencePair], list[PreferencePair], bool]:
    """(train, eval) pairs and whether they come from the built-in task (so the gold judge applies)."""
    if config.data.reward is None:
        data_dir = config.run_dir / "data"
        if is_main:
            write_builtin_task(config.data.builtin, data_dir)
        train_rows, eval_rows = read_rows(data_dir / "ranked_train.jsonl"), read_rows(data_dir / "ranked_eval.jsonl")
        where, builtin = str(data_dir / "ranked_train.jsonl"), True
    else:
        train_rows, eval_rows = load_source(config.data.reward, "data.reward", config.run.seed)
        where, builtin = f"data.reward ({config.data.reward.path})", False
    train = preference_pairs_from_rows(train_rows, where, config.data.on_bad_rows)
    evaluation = preference_pairs_from_rows(eval_rows, where + " eval split", config.data.on_bad_rows) if eval_rows else []
    return train, evaluation, builtin


def grouped_examples(pairs: list[PreferencePair], tokenizer, max_length: int | None, margin: float, where: str,
                     on_bad_rows: str) -> list[dict[str, Any]]:
    """One example per prompt group: the token ids of all its chosen and rejected responses."""
    groups: dict[int, dict[str, list]] = {}
    for pair in pairs:
        chosen, rejected = encode_dialogue(tokenizer, pair.prompt, pair.chosen), encode_dialogue(tokenizer, pair.prompt,
                                                                                                 pair.rejected)
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            if on_bad_rows == "error":
                raise DataError(f"{where} row {pair.group + 1}: {max(len(chosen), len(rejected))} tokens after "
                                f"templating, more than reward.max_length={max_length} (set data.on_bad_rows=skip)")
            continue
        group = groups.setdefault(pair.group, {"chosen_ids": [], "rejected_ids": [], "margin": []})
        group["chosen_ids"].append(chosen)
        group["rejected_ids"].append(rejected)
        group["margin"].append(margin * pair.rank_gap)
    return list(groups.values())


@dataclass
class GroupedPreferenceCollator:
    """Flattens prompt groups into RewardTrainer's layout: all chosen sequences, then all rejected ones."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        chosen = [ids for example in examples for ids in example["chosen_ids"]]
        rejected = [ids for example in examples for ids in example["rejected_ids"]]
        sequences = chosen + rejected
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        margins = [m for example in examples for m in example["margin"]]
        if any(margins):
            batch["margin"] = torch.tensor(margins, dtype=torch.float)
        return batch


class GroupedRewardTrainer(RewardTrainer):
    """RewardTrainer whose batch elements are prompt groups (already tokenized by us, so no re-processing)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin"]


@torch.no_grad()
def held_out_accuracy(model, tokenizer, pairs: list[PreferencePair], builtin: bool) -> dict[str, float]:
    """Pairwise accuracy against the annotator's labels, and on the built-in task against the gold judge."""
    if not pairs:
        return {}
    model.eval()
    chosen = score_responses(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = score_responses(model, tokenizer, [p.prompt for p in pairs], [p.rejected for p in pairs])
    metrics = {"eval_accuracy": pairwise_accuracy(chosen, rejected), "eval_pairs": len(pairs)}
    if builtin:
        gold = [(gold_score(p.prompt[-1]["content"], p.chosen), gold_score(p.prompt[-1]["content"], p.rejected))
                for p in pairs]
        decided = [i for i, (a, b) in enumerate(gold) if a != b]
        agree = [(chosen[i] > rejected[i]).item() == (gold[i][0] > gold[i][1]) for i in decided]
        metrics["eval_gold_accuracy"] = sum(agree) / len(agree) if agree else float("nan")
        metrics["annotator_gold_agreement"] = sum(gold[i][0] > gold[i][1] for i in decided) / max(len(decided), 1)
    return metrics


@torch.no_grad()
def normalization_from_sft_samples(config: PipelineConfig, input_model: str, model, tokenizer,
                                   count: int) -> RewardNormalization:
    """Score SFT-policy samples on prompts the policy will see in PPO; their mean/std normalise rewards."""
    if config.data.ppo is None:
        rows = read_rows(config.run_dir / "data" / "ppo_prompts.jsonl")
    else:
        rows, _ = load_source(config.data.ppo, "data.ppo", config.run.seed)
    conversations = prompts_from_rows(rows[:count], "reward normalisation prompts", "skip")
    policy = load_causal_lm(input_model, tokenizer, config.model.trust_remote_code).eval()
    torch.manual_seed(config.run.seed)
    responses = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        output = policy.generate(**ids, do_sample=True, temperature=config.ppo.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=config.ppo.response_length, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        responses.append(tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return RewardNormalization.from_scores(score_responses(model, tokenizer, conversations, responses))


def run_reward(config: PipelineConfig, restart: bool = False) -> Path:
    """Train the reward model; return the directory of the final checkpoint."""
    from accelerate import PartialState

    is_main = PartialState().is_main_process
    start = plan_stage_start(config, STAGE, restart, is_main)
    if start.already_finished:
        print(f"[reward] already finished: {start.stage_dir / 'final'}")
        return start.stage_dir / "final"
    section = config.reward
    input_model = stage_input_model(config, STAGE)
    tokenizer = load_tokenizer(input_model, config.model.trust_remote_code)
    train_pairs, eval_pairs, builtin = preference_splits(config, is_main)
    PartialState().wait_for_everyone()
    max_length = section.get("max_length")
    train = grouped_examples(train_pairs, tokenizer, max_length, section["margin"], "reward train",
                             config.data.on_bad_rows)
    evaluation = grouped_examples(eval_pairs, tokenizer, max_length, section["margin"], "reward eval",
                                  config.data.on_bad_rows)
    if not train:
        raise DataError("reward: no training pairs left after filtering")
    print(f"[reward] {len(train_pairs)} pairs from {len(train)} prompts ({len(eval_pairs)} held-out pairs), "
          f"from {input_model}")

    model, _ = load_reward_model(input_model, config.model.trust_remote_code)
    peft_config = None
    if section.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**section["peft"], task_type="SEQ_CLS")
    arguments = trainer_arguments(config, STAGE, start.stage_dir, bool(evaluation), remove_unused_columns=False)
    metrics_log = metrics_log_for(start, is_main)
    trainer = GroupedRewardTrainer(
        model=model, args=arguments, train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation) if evaluation else None, processing_class=tokenizer,
        data_collator=GroupedPreferenceCollator(tokenizer.pad_token_id), peft_config=peft_config,
        callbacks=[PipelineCallback(start.stage_dir, config.run.keep_last_checkpoints, metrics_log)])
    wall_time = train_with_resume(trainer, start, config, STAGE, input_model)

    final_dir = start.stage_dir / "final"
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(trained, "merge_and_unload"):
            trained = trained.merge_and_unload()
        metrics = held_out_accuracy(trained, tokenizer, eval_pairs, builtin)
        normalization = normalization_from_sft_samples(config, input_model, trained, tokenizer,
                                                       section["normalization_samples"])
        with atomic_directory(final_dir) as staging:
            trained.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            normalization.save(staging)
        write_manifest(start.stage_dir, status="finished", steps=trainer.state.global_step,
                       wall_time_s=round(wall_time, 1), metrics=metrics,
                       normalization={"mean": normalization.mean, "std": normalization.std})
        print(f"[reward] held-out accuracy {metrics.get('eval_accuracy', float('nan')):.3f} vs annotator"
              + (f", {metrics['eval_gold_accuracy']:.3f} vs gold" if "eval_gold_accuracy" in metrics else ""))
    trainer.accelerator.wait_for_everyone()
    print(f"[reward] done: {final_dir}")
    return final_dir


def main(argv: list[str] | None = None) -> None:
    run_stage_main(STAGE, run_reward, argv)


if __name__ == "__main__":
    main()
