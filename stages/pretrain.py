"""Stage 1, pretraining: train a byte-level BPE tokenizer, then a decoder-only model on next-token prediction.

    accelerate launch -m stages.pretrain --config configs/default.yaml [key=value ...]

Reads, top to bottom: config → data (corpus, tokenizer, packed blocks) → model → loop → checkpoint.
The batch order is a pure function of (seed, epoch, step), and the learning rate a pure function of the
step, so resuming needs only the weights, the optimizer state and the step: a run killed at any moment and
started again ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from data.builtin_datasets import builtin_task_files
from data.loading import load_source, read_rows, texts_from_rows
from data.tokenizer import load_tokenizer, train_bpe_tokenizer
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig, PretrainSection
from pipeline.run.files import atomic_directory
from pipeline.train.batches import epoch_order
from pipeline.train.custom_loop import CustomLoop
from pipeline.train.engines import (
    accumulation_boundary, backward, clipped_gradient_norm, configure_deepspeed, engine_of)
from pipeline.train.entry import run_stage_main, seed_everything
from pipeline.train.final_save import full_state_dict, model_holding, save_final_model
from pipeline.train.guards import fault_point, require_finite_gradient_norms, require_finite_weights
from pipeline.train.models import (
    weight_decay_groups, 
    attention_for_precision, build_llama_from_config, count_parameters, load_causal_lm, save_hf_model)

STAGE = "pretrain"


# ---------------------------------------------------------------- data
def corpus_texts(config: PipelineConfig) -> tuple[list[str], list[str]]:
    """(train, eval) texts: the built-in stories, or a text-format dataset from the config."""
    if config.data.pretrain is None:
        data_dir = builtin_task_files(config.data.builtin, config.run_dir / "data")
        return ([row["text"] for row in read_rows(data_dir / "pretrain_train.jsonl")],
                [row["text"] for row in read_rows(data_dir / "pretrain_eval.jsonl")])
    train_rows, eval_rows = load_source(config.data.pretrain, "data.pretrain", config.run.seed)
    return (texts_from_rows(train_rows, f"data.pretrain ({config.data.pretrain.path})"),
            texts_from_rows(eval_rows, f"data.pretrain eval ({config.data.pretrain.path})"))


def prepare_tokenizer(config: PipelineConfig, texts: list[str], accelerator: Accelerator):
    """Load the configured tokenizer, or train one once per run directory and reuse it on resume."""
    if config.tokenizer.name_or_path or config.model.name_or_path:
        return load_tokenizer(config.tokenizer.name_or_path or config.model.name_or_path,
                              config.model.trust_remote_code)
    tokenizer_dir = config.run_dir / "tokenizer"
    if accelerator.is_main_process and not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = train_bpe_tokenizer(texts[: config.tokenizer.training_texts], config.tokenizer.vocab_size)
        with atomic_directory(tokenizer_dir) as temporary:
            tokenizer.save_pretrained(temporary)
    accelerator.wait_for_everyone()
    return load_tokenizer(tokenizer_dir)


def packed_blocks(texts: list[str], tokenizer, seq_length: int) -> torch.Tensor:
    """Concatenate the documents, each ended by EOS, and cut the stream into [blocks, seq_length]."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [token for document in ids for token in (*document, tokenizer.eos_token_id)]
    usable = len(stream) // seq_length * seq_length
    if usable == 0:
        raise ConfigError(f"pretrain.seq_length: the corpus has {len(stream)} tokens, fewer than one block of {seq_length}")
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_length)


def batch_indices(step: int, micro_step: int, settings: PretrainSection, num_blocks: int,
                  seed: int, process_index: int, num_processes: int) -> torch.Tensor:
    """Block indices of one micro-batch of one process, read in order from the epoch's seeded permutation."""
    micro_batch = settings.per_device_train_batch_size
    global_batch = micro_batch * num_processes * settings.gradient_accumulation_steps
    order, start = epoch_order(step, global_batch, num_blocks, seed, "pretrain.per_device_train_batch_size", "blocks")
    start += (micro_step * num_processes + process_index) * micro_batch
    return order[start: start + micro_batch]


def learning_rate_at(step: int, settings: PretrainSection) -> float:
    """Linear warmup, then cosine (or linear) decay to min_learning_rate_ratio × learning_rate."""
    peak, floor = settings.learning_rate, settings.learning_rate * settings.min_learning_rate_ratio
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    if settings.lr_scheduler_type == "constant":
        return peak
    progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if settings.lr_scheduler_type == "cosine" else 1 - progress
    return floor + (peak - floor) * shape


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, settings: PretrainSection, accelerator: Accelerator) -> float:
    """Mean next-token loss over the first eval_batches batches of the held-out blocks, across processes."""
    model.eval()
    size = settings.per_device_eval_batch_size
    # Equally many blocks on every process: under FSDP2 and ZeRO-3 each forward is a collective.
    per_process = min(len(blocks) // accelerator.num_processes, settings.eval_batches * size)
    shard = blocks[accelerator.process_index:: accelerator.num_processes][:per_process]
    total = torch.zeros(2, device=accelerator.device)
    for start in range(0, len(shard), size):
        batch = shard[start: start + size].to(accelerator.device)
        total += torch.stack([model(input_ids=batch, labels=batch).loss.float() * len(batch),
                              torch.tensor(float(len(batch)), device=accelerator.device)])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


# ---------------------------------------------------------------- the stage
def compiled_training_forward(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The prepared model under torch.compile, for the training steps only: it shares the model's parameters, while
    evaluation (another batch size) and saving keep the plain module, so neither recompiles nor sees `_orig_mod.`
    names. DeepSpeed's engine compiles through its own `engine.compile()`, which this loop does not drive."""
    if engine_of(accelerator).name.startswith("zero"):
        raise ConfigError("pretrain.torch_compile: not supported under DeepSpeed; set it to false or use ddp/fsdp2")
    return torch.compile(model)


def run_pretraining(config: PipelineConfig, restart: bool = False) -> Path:
    """Train the tokenizer and the model; return the directory of the final HF checkpoint."""
    settings = config.pretrain
    loop = CustomLoop(config, STAGE, settings, restart)
    accelerator = loop.accelerator
    if loop.already_finished:
        return loop.final_dir
    seed_everything(config.run.seed)
    loop.print(f"run {config.run_dir} on {accelerator.num_processes} process(es), {accelerator.device}, "
               f"{accelerator.mixed_precision}, engine {engine_of(accelerator).name}")

    train_texts, eval_texts = corpus_texts(config)
    tokenizer = prepare_tokenizer(config, train_texts, accelerator)
    train_blocks = packed_blocks(train_texts, tokenizer, settings.seq_length)
    eval_blocks = packed_blocks(eval_texts, tokenizer, settings.seq_length)

    if config.model.name_or_path:
        model = load_causal_lm(config.model.name_or_path, tokenizer, config.model.trust_remote_code)
    else:
        model = build_llama_from_config(config.model, tokenizer, config.run.seed)
    attention_for_precision(model, accelerator.mixed_precision == "bf16", accelerator.device)
    optimizer = torch.optim.AdamW(weight_decay_groups(model.parameters(), settings.weight_decay),
                                  lr=settings.learning_rate, betas=(settings.adam_beta1, settings.adam_beta2))
    configure_deepspeed(accelerator, settings.per_device_train_batch_size, settings.gradient_accumulation_steps,
                        settings.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    training_forward = compiled_training_forward(model, accelerator) if settings.torch_compile else model

    step, _ = loop.resume()
    metrics_log = loop.begin(input_checkpoint=config.model.name_or_path, max_steps=settings.max_steps,
                             parameters=count_parameters(accelerator.unwrap_model(model)))

    tokens_per_step = (settings.per_device_train_batch_size * settings.gradient_accumulation_steps
                       * accelerator.num_processes * settings.seq_length)
    progress = tqdm(total=settings.max_steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process)
    last_eval, train_seconds = None, 0.0
    model.train()
    while step < settings.max_steps:
        step_began = time.perf_counter()
        fault_point("step", STAGE, step)
        fault_point("update", STAGE, step, model)
        learning_rate = learning_rate_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        step_loss = torch.zeros((), device=accelerator.device)
        for micro_step in range(settings.gradient_accumulation_steps):
            indices = batch_indices(step, micro_step, settings, len(train_blocks), config.run.seed,
                                    accelerator.process_index, accelerator.num_processes)
            batch = train_blocks[indices].to(accelerator.device)
            with accumulation_boundary(accelerator, model, micro_step == settings.gradient_accumulation_steps - 1):
                loss = training_forward(input_ids=batch, labels=batch).loss / settings.gradient_accumulation_steps
                backward(accelerator, loss)
            step_loss += loss.detach()
        fault_point("gradients", STAGE, step, model)
        grad_norm = clipped_gradient_norm(accelerator, model, settings.max_grad_norm)
        # The loss checked below comes from the weights before this update and cannot see a NaN gradient: checked
        # here, or the step writes NaN weights that the next save keeps. One device sync a step.
        require_finite_gradient_norms({"model": grad_norm}, STAGE, step + 1, "pretrain.learning_rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_seconds += time.perf_counter() - step_began

        saving = loop.checkpoint_due(step)
        if saving or step % settings.logging_steps == 0:
            loss_value = accelerator.reduce(step_loss, reduction="mean").item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"pretrain: loss became {loss_value} at step {step}; "
                                         f"the last good checkpoint is kept, lower pretrain.learning_rate and resume")
        if step % settings.logging_steps == 0 or step == settings.max_steps:
            metrics = {"loss": loss_value, "learning_rate": learning_rate, "grad_norm": float(grad_norm),
                       "tokens": step * tokens_per_step}
            if step % settings.eval_steps == 0 or step == settings.max_steps:
                last_eval = evaluate(model, eval_blocks, settings, accelerator)
                metrics.update(eval_loss=last_eval, eval_perplexity=math.exp(min(last_eval, 50)))
            accelerator.log(metrics, step=step)
            metrics_log.write(step, metrics)
            progress.set_postfix(loss=f"{loss_value:.3f}", **({"eval": f"{last_eval:.3f}"} if last_eval else {}))
        progress.update(1)
        if saving:
            require_finite_weights({"model": model}, STAGE, step, accelerator)
            # Gathered on every process (ZeRO-3 and FSDP2 hold shards), written by the main one.
            weights = full_state_dict(accelerator, model)
            loop.save_checkpoint(step, write_extra=lambda staging: save_hf_model(
                model_holding(weights, accelerator.unwrap_model(model), accelerator),
                tokenizer, staging / "model"))
            del weights
    progress.close()

    require_finite_weights({"model": model}, STAGE, step, accelerator)
    save_final_model(accelerator, model, tokenizer, loop.final_dir)
    history = metrics_log.read()
    evals = [m for m in history if "eval_loss" in m]
    return loop.finish(step, metrics={"train_loss": history[-1]["loss"] if history else None,
                                      "eval_loss": evals[-1]["eval_loss"] if evals else None,
                                      "eval_perplexity": evals[-1]["eval_perplexity"] if evals else None},
                       # the optimisation loop alone (no evaluation, logging or saving), for bench/
                       train_tokens_per_second=round((step - loop.first_step) * tokens_per_step
                                                     / max(train_seconds, 1e-9)))


def main(argv: list[str] | None = None) -> None:
    run_stage_main(STAGE, run_pretraining, argv)


if __name__ == "__main__":
    main()
