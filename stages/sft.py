"""Stage 2, supervised fine-tuning: teach the pretrained model to answer in dialogue, with TRL's SFTTrainer.

    accelerate launch -m stages.sft --config configs/default.yaml [sft.max_steps=100 ...]

Reads, top to bottom: config → data (dialogues, checked row by row) → model (LoRA optional) → SFTTrainer →
final/. Every field of the `sft` section goes to TRL's `SFTConfig` (max_steps, learning_rate, packing, ...);
ours are `peft` (LoRA: r, lora_alpha, lora_dropout, target_modules), `save_adapter_only` and `sample_prompts`.
The run directory decides output_dir, seed and checkpoint pruning.

Data: the built-in task's dialogues, or any `messages` / prompt-completion dataset (`data.sft.path=...`, a
local file or a hub id). Prompt-completion rows become two-message dialogues, so every dataset trains the
same way: through the tokenizer's chat template, with the loss on the assistant's tokens only
(`sft.assistant_only_loss`, on by default): each assistant turn's content and its end-of-turn token, found by
rendering the conversation's prefixes (data/assistant_masks.py), so any template that keeps earlier turns
unchanged works, with or without {% generation %} markers; the stage hands TRL token ids and masks, never
the template. A template that cannot be masked is refused in one line by `rlhf run`'s preflight, before anything
is written (and by this stage before training, when it is launched alone). A row longer than `sft.max_length`
after templating is a bad row (`data.on_bad_rows`), not silently cut mid-answer.

At each evaluation: the held-out loss, and greedy answers to `sft.sample_prompts` held-out prompts, written
to metrics.jsonl and the log. Resume is HF Trainer's, bit-exact on CPU. final/ is a full model that
`AutoModelForCausalLM` loads (a LoRA adapter merged in), unless `save_adapter_only: true` keeps the adapter
alone (it then names the input model by absolute path as its base).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from tqdm.auto import tqdm
from trl import SFTTrainer

from data.assistant_masks import assistant_token_masks
from data.builtin_datasets import stage_splits
from data.formats import dialogues_from_rows
from data.tokenizer import load_tokenizer
from pipeline.config.schema import PipelineConfig
from pipeline.generation.sampling import generate_with_config, sampling_config
from pipeline.run.manifests import MetricsLog
from pipeline.train.engines import engine_of
from pipeline.train.entry import run_stage_main, seed_everything, stage_input_model
from pipeline.train.final_save import save_final_model
from pipeline.train.models import attention_for_precision, count_parameters, load_causal_lm
from pipeline.train.trainer import TrainerStage

STAGE = "sft"
SAMPLE_TOKENS = 64  # new tokens per sample answer at evaluation


# ---------------------------------------------------------------- data
def dialogue_splits(config: PipelineConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, eval) dialogues as {"messages": [...]}, every row checked (length included) before training."""
    return stage_splits(config, STAGE, partial(dialogues_from_rows, tokenizer=tokenizer,
                                               max_length=config.sft.get("max_length")))


def training_dataset(dialogues: list[dict], tokenizer, assistant_only_loss: bool, model_name: str) -> Dataset:
    """What SFTTrainer trains on: token ids with the assistant-token mask (TRL builds -100 labels from it and
    applies no template), or, without assistant-only loss, the dialogues for TRL to template whole."""
    if not assistant_only_loss:
        return Dataset.from_list(dialogues)
    return Dataset.from_list(assistant_token_masks(tokenizer, (d["messages"] for d in dialogues), model_name))


# ---------------------------------------------------------------- samples at evaluation
class SampleAnswers(TrainerCallback):
    """Greedy answers to a few held-out prompts at each evaluation: progress a person can read."""

    def __init__(self, tokenizer, prompts: list[list[dict]], metrics_log: MetricsLog, sharded: bool):
        self.tokenizer, self.prompts, self.metrics_log = tokenizer, prompts, metrics_log
        # Under FSDP2 or ZeRO-3 the model holds only this process's shard, and decoding on it alone would wait
        # for the other processes in a collective per token: no samples there.
        self.sharded = sharded

    @torch.no_grad()
    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not self.prompts or model is None or self.sharded:
            return
        was_training = model.training
        model.eval()
        samples = []
        for prompt in self.prompts:
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True).to(model.device)
            greedy = sampling_config(SAMPLE_TOKENS, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                     greedy=True)
            output = generate_with_config(model, ids["input_ids"], ids["attention_mask"], greedy)
            answer = self.tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            samples.append({"prompt": prompt[-1]["content"], "response": answer})
            tqdm.write(f"[sft] step {state.global_step} sample: {prompt[-1]['content'][-70:]!r} -> {answer!r}")
        self.metrics_log.write(state.global_step, {"samples": samples})
        model.train(was_training)


# ---------------------------------------------------------------- the stage
def run_sft(config: PipelineConfig, restart: bool = False) -> Path:
    """Fine-tune the input model on dialogues; return the directory of the final model."""
    stage = TrainerStage(config, STAGE, restart)  # the launched engine, or a one-line error, before any write
    if stage.already_finished:
        return stage.final_dir
    seed_everything(config.run.seed)  # LoRA's initial weights come from torch's generator
    section = config.sft
    input_model = stage_input_model(config, STAGE)
    if Path(input_model).is_dir():  # an adapter saved alone must find its base from anywhere
        input_model = str(Path(input_model).resolve())
    tokenizer = load_tokenizer(input_model, config.model.trust_remote_code)
    train, evaluation = dialogue_splits(config, tokenizer)
    train_dataset, eval_dataset = (training_dataset(dialogues, tokenizer, section["assistant_only_loss"], input_model)
                                   for dialogues in (train, evaluation))
    stage.print(f"{len(train)} dialogues, {len(evaluation)} held out; from {input_model}")

    model = load_causal_lm(input_model, tokenizer, config.model.trust_remote_code)
    peft_config = None
    if section.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**section["peft"], task_type="CAUSAL_LM")
    # The masks are in the data already: TRL's own assistant_only_loss would re-template, and refuse templates
    # without {% generation %} markers.
    arguments = stage.arguments(has_eval=bool(evaluation), assistant_only_loss=False)
    attention_for_precision(model, arguments.bf16, arguments.device)
    sample_prompts = [dialogue["messages"][:-1] for dialogue in evaluation[: section["sample_prompts"]]]
    trainer = SFTTrainer(
        model=model, args=arguments, train_dataset=train_dataset,
        eval_dataset=eval_dataset if evaluation else None, processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=stage.callbacks(SampleAnswers(tokenizer, sample_prompts, stage.metrics_log,
                                                engine_of(stage.accelerator).shards_weights)))
    stage.train(trainer, input_model)

    # The DeepSpeed engine (model_wrapped) is what gathers ZeRO-3's partitions.
    save_final_model(trainer.accelerator, trainer.model_wrapped, tokenizer, stage.final_dir,
                     adapter_only=peft_config is not None and section["save_adapter_only"])
    manifest = {}
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        history = stage.metrics_log.read()
        losses = [m["loss"] for m in history if "loss" in m]
        evals = [m["eval_loss"] for m in history if "eval_loss" in m]
        manifest = {"train_dialogues": len(train), "eval_dialogues": len(evaluation),
                    "parameters": count_parameters(trained),
                    "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trained.parameters()
                                                if p.requires_grad),
                    "metrics": {"train_loss": losses[-1] if losses else None,
                                "eval_loss": evals[-1] if evals else None}}
    return stage.finish(trainer, **manifest)


def main(argv: list[str] | None = None) -> None:
    run_stage_main(STAGE, run_sft, argv)


if __name__ == "__main__":
    main()
