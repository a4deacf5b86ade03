"""Stage 2, supervised fine-tuning: teach the pretrained model to answer in dialogue, with TRL's SFTTrainer.

    accelerate launch -m stages.sft --config configs/default.yaml [sft.max_steps=100 ...]

Every field of the `sft` config section goes to TRL's `SFTConfig`; ours are `peft` (LoRA), `save_adapter_only`
and `sample_prompts`. The loss covers assistant tokens only (the chat template marks them with
{% generation %}). Data: the built-in task's dialogues, or any `messages` / prompt-completion dataset.
Resume is HF Trainer's, which is bit-exact on CPU; final/ is a full model (LoRA merged) unless
save_adapter_only is set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTTrainer

from data.builtin_task import write_builtin_task
from data.formats import dialogues_from_rows
from data.loading import DataError, load_source, read_rows
from data.tokenizer import load_tokenizer
from pipeline.checkpoints import atomic_directory, write_manifest
from pipeline.config import PipelineConfig
from pipeline.hf_trainer import PipelineCallback, metrics_log_for, train_with_resume, trainer_arguments
from pipeline.models import load_causal_lm, save_hf_model
from pipeline.stage import plan_stage_start, run_stage_main, stage_input_model

STAGE = "sft"


def dialogue_splits(config: PipelineConfig, is_main: bool) -> tuple[list[dict], list[dict]]:
    """(train, eval) dialogues as {"messages": [...]}, every row checked before training starts."""
    if config.data.sft is None:
        data_dir = config.run_dir / "data"
        if is_main:
            write_builtin_task(config.data.builtin, data_dir)
        train_rows, eval_rows = read_rows(data_dir / "sft_train.jsonl"), read_rows(data_dir / "sft_eval.jsonl")
        where = str(data_dir / "sft_train.jsonl")
    else:
        train_rows, eval_rows = load_source(config.data.sft, "data.sft", config.run.seed)
        where = f"data.sft ({config.data.sft.path})"
    return (dialogues_from_rows(train_rows, where, config.data.on_bad_rows),
            dialogues_from_rows(eval_rows, where + " eval split", config.data.on_bad_rows) if eval_rows else [])


def drop_too_long(dialogues: list[dict], tokenizer, max_length: int | None, where: str, on_bad_rows: str) -> list[dict]:
    """Dialogues longer than max_length after templating would be cut mid-answer: report or skip them."""
    if max_length is None:
        return dialogues
    kept = []
    for number, dialogue in enumerate(dialogues, start=1):
        length = len(tokenizer.apply_chat_template(dialogue["messages"], tokenize=True, return_dict=True)["input_ids"])
        if length <= max_length:
            kept.append(dialogue)
        elif on_bad_rows == "error":
            raise DataError(f"{where} row {number}: {length} tokens after templating, more than sft.max_length="
                            f"{max_length} (set data.on_bad_rows=skip to skip such rows)")
    if len(kept) < len(dialogues):
        print(f"[data] {where}: skipped {len(dialogues) - len(kept)} rows longer than {max_length} tokens")
    return kept


class SampleGenerations(TrainerCallback):
    """A few answers to held-out prompts at each evaluation: progress a person can read."""

    def __init__(self, tokenizer, prompts: list[list[dict]], metrics_log):
        self.tokenizer, self.prompts, self.metrics_log = tokenizer, prompts, metrics_log

    @torch.no_grad()
    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not self.prompts or model is None:
            return
        was_training = model.training
        model.eval()
        samples = []
        for prompt in self.prompts:
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True).to(model.device)
            output = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                    eos_token_id=self.tokenizer.eos_token_id)
            answer = self.tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            samples.append({"prompt": prompt[-1]["content"], "response": answer})
            print(f"[sft step {state.global_step}] {prompt[-1]['content'][-60:]!r} -> {answer!r}", flush=True)
        self.metrics_log.write(state.global_step, {"samples": samples})
        model.train(was_training)


def run_sft(config: PipelineConfig, restart: bool = False) -> Path:
    """Fine-tune on dialogues; return the directory of the final model."""
    from accelerate import PartialState

    is_main = PartialState().is_main_process
    start = plan_stage_start(config, STAGE, restart, is_main)
    if start.already_finished:
        print(f"[sft] already finished: {start.stage_dir / 'final'}")
        return start.stage_dir / "final"
    section = config.sft
    input_model = stage_input_model(config, STAGE)
    tokenizer = load_tokenizer(input_model, config.model.trust_remote_code)
    train, evaluation = dialogue_splits(config, is_main)
    PartialState().wait_for_everyone()
    train = drop_too_long(train, tokenizer, section.get("max_length"), "sft train", config.data.on_bad_rows)
    evaluation = drop_too_long(evaluation, tokenizer, section.get("max_length"), "sft eval", config.data.on_bad_rows)
    print(f"[sft] {len(train)} dialogues ({len(evaluation)} held out), from {input_model}")

    model = load_causal_lm(input_model, tokenizer, config.model.trust_remote_code)
    peft_config = None
    if section.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**section["peft"], task_type="CAUSAL_LM")
    arguments = trainer_arguments(config, STAGE, start.stage_dir, bool(evaluation))
    metrics_log = metrics_log_for(start, is_main)
    samples_log = metrics_log_for(start, is_main, "samples.jsonl")
    callbacks = [PipelineCallback(start.stage_dir, config.run.keep_last_checkpoints, metrics_log),
                 SampleGenerations(tokenizer, [d["messages"][:-1] for d in evaluation[: section["sample_prompts"]]],
                                   samples_log)]
    trainer = SFTTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    wall_time = train_with_resume(trainer, start, config, STAGE, input_model)
    evaluated = [m for m in metrics_log.read() if "eval_loss" in m]
    evaluation_metrics = evaluated[-1] if evaluated else (trainer.evaluate() if evaluation else {})

    final_dir = start.stage_dir / "final"
    if trainer.is_world_process_zero():
        with atomic_directory(final_dir) as staging:
            trained = trainer.accelerator.unwrap_model(trainer.model)
            if section.get("save_adapter_only") and hasattr(trained, "peft_config"):
                trained.save_pretrained(staging)  # adapter only: load it with peft on top of the input model
                tokenizer.save_pretrained(staging)
            else:
                save_hf_model(trained, tokenizer, staging, merge_adapter=True)
        history = metrics_log.read()
        write_manifest(start.stage_dir, status="finished", steps=trainer.state.global_step,
                       wall_time_s=round(wall_time, 1),
                       metrics={"train_loss": next((m["loss"] for m in reversed(history) if "loss" in m), None),
                                "eval_loss": evaluation_metrics.get("eval_loss")})
    trainer.accelerator.wait_for_everyone()
    print(f"[sft] done: {final_dir}")
    return final_dir


def main(argv: list[str] | None = None) -> None:
    run_stage_main(STAGE, run_sft, argv)


if __name__ == "__main__":
    main()
