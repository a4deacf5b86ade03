"""Building and loading causal LMs the same way in every stage."""

from __future__ import annotations

from collections.abc import Iterable

import logging
import re
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config.schema import ModelSection, PeftSection


def build_llama_from_config(section: ModelSection, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A fresh Llama-style decoder sized by the config, its vocabulary matching the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_hidden_layers,
        num_attention_heads=section.num_attention_heads,
        num_key_value_heads=section.num_attention_heads,
        max_position_embeddings=section.max_position_embeddings,
        rope_theta=section.rope_theta,
        initializer_range=section.initializer_range,
        tie_word_embeddings=True,  # a third of a small model's parameters would otherwise be a second embedding
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    configure_generation(model, tokenizer)
    return model


def load_causal_lm(name_or_path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    """Load an HF causal LM in float32 (safetensors only) and make its embeddings fit the tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=torch.float32)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        configure_generation(model, tokenizer)
    return model


def configure_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make `generate` stop at our EOS and pad with our pad token, in the saved generation config too."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None


def with_lora_adapter(model: PreTrainedModel, lora: PeftSection) -> torch.nn.Module:
    """The causal LM with a LoRA adapter (peft) on `lora.target_modules`: only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def count_parameters(model: torch.nn.Module) -> int:
    # A ZeRO-3 partitioned parameter is empty on every process; ds_numel is its whole size (FSDP2's DTensor
    # reports its whole size already).
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def save_hf_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                  merge_adapter: bool = False) -> None:
    """Weights as safetensors plus the tokenizer: a directory plain `transformers` loads.

    merge_adapter folds a LoRA adapter into the weights (in place: only for a model that trains no more)."""
    if merge_adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def attention_for_precision(model: torch.nn.Module, bf16: bool, device: torch.device | str) -> torch.nn.Module:
    """Under bf16 autocast on CPU, attention as plain matmuls ("eager"), not PyTorch's fused SDPA kernel.

    The CPU flash-attention kernel is about 6x slower in bf16 than in fp32 (its backward above all), while
    bf16 matmuls run on AMX: with SDPA, bf16 training of a 4x128 Llama is no faster than fp32; with eager
    attention it is 1.3x faster (bench/ppo_step.py, bench/pretrain_throughput.py). GPUs keep their kernels."""
    if not bf16 or torch.device(device).type != "cpu":
        return model
    pretrained = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if pretrained is not None and pretrained.config._attn_implementation == "sdpa":
        pretrained.set_attn_implementation("eager")
    return model


# transformers 5 renamed gradient checkpointing to activation checkpointing; TRL 1.16 and PEFT 0.21 still read the
# old names inside Trainer and get_peft_model, whatever the user's config says.
RENAMED_ATTRIBUTE_WARNINGS = (r"`(is_)?gradient_checkpointing` is deprecated",)


SHARED_TENSOR_NOTICE = re.compile(r"Removed shared tensor \{(.*)\} while saving")


def keep_unless_tied_output_embedding_notice(record: logging.LogRecord) -> bool:
    """A logging filter: drop Accelerate's notice that it saved a tied output embedding (lm_head.weight) once, with
    the input embedding. Resuming re-ties it (the resume tests check the weights bit for bit), so the notice asks
    the user to verify what is already verified. A shared tensor of any other name is reported as before."""
    match = SHARED_TENSOR_NOTICE.search(record.getMessage())
    return not (match and all(name.strip(" '\"").endswith("lm_head.weight") for name in match.group(1).split(",")))


def quiet_library_warnings() -> None:
    """Hide the library notices on saving and training that a user of the pipeline cannot act on, and only those."""
    for message in RENAMED_ATTRIBUTE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    # A module-level filter: adding it again (every stage calls this) does not add it twice.
    logging.getLogger("accelerate.utils.other").addFilter(keep_unless_tied_output_embedding_notice)


def weight_decay_groups(parameters: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups that decay weight matrices only: biases and norm gains keep their scale (GPT-2's
    and TRL's practice). Either group may be empty."""
    parameters = list(parameters)
    return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
