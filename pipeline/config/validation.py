"""Checks on a typed run config: values that are well typed but impossible, and combinations that cannot work.

They run once, in `load_config`, before any stage starts, and stop at the first problem with a ConfigError
naming the key. Also here: how to tell a local path from a hub id, which decides whether a path must exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.parsing import ConfigError, unknown_key_message

if TYPE_CHECKING:  # pipeline.config imports this module to validate what it loads
    from pipeline.config.schema import ModelSection, PipelineConfig, PPOSection


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".gz")


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def validate(config: PipelineConfig, known_stages: tuple[str, ...]) -> None:
    """Check values that are well typed but impossible, and combinations that cannot work; `run.stages` may name
    only `known_stages`."""
    run, model, tokenizer, pretrain = config.run, config.model, config.tokenizer, config.pretrain
    require(bool(run.name) and "/" not in run.name and run.name not in (".", ".."),
            f"run.name: must be a plain directory name, got {run.name!r}")
    require(bool(run.stages), "run.stages: must name at least one stage")
    for i, stage in enumerate(run.stages):
        require(stage in known_stages,
                unknown_key_message(f"run.stages[{i}]", stage, list(known_stages)).replace("key", "stage"))
    require(run.keep_last_checkpoints >= 1, "run.keep_last_checkpoints: must be at least 1")
    if run.accelerate_config is not None:
        require(Path(run.accelerate_config).is_file(), f"run.accelerate_config: file {run.accelerate_config} does not exist")
    if run.machine_rank is not None:
        require(run.machine_rank >= 0, f"run.machine_rank: must not be negative, got {run.machine_rank}")
    for key in ("machine_rank", "main_process_ip"):
        require(getattr(run, key) is None or run.accelerate_config is not None,
                f"run.{key}: only with run.accelerate_config (a multi-machine Accelerate config)")
    positive = {
        "model.num_hidden_layers": model.num_hidden_layers, "model.hidden_size": model.hidden_size,
        "model.num_attention_heads": model.num_attention_heads, "model.intermediate_size": model.intermediate_size,
        "model.max_position_embeddings": model.max_position_embeddings, "tokenizer.vocab_size": tokenizer.vocab_size,
        "model.initializer_range": model.initializer_range,
        "tokenizer.training_texts": tokenizer.training_texts,
        **{f"pretrain.{k}": getattr(pretrain, k) for k in (
            "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "seq_length", "eval_steps", "eval_batches", "logging_steps", "save_steps")},
    }
    for key, value in positive.items():
        require(value > 0, f"{key}: must be positive, got {value}")
    require(model.hidden_size % model.num_attention_heads == 0,
            f"model.hidden_size: {model.hidden_size} is not divisible by model.num_attention_heads={model.num_attention_heads}")
    require(tokenizer.vocab_size >= 300, f"tokenizer.vocab_size: must be at least 300 (256 bytes + special tokens), got {tokenizer.vocab_size}")
    require(pretrain.seq_length <= model.max_position_embeddings,
            f"pretrain.seq_length: {pretrain.seq_length} exceeds model.max_position_embeddings={model.max_position_embeddings}")
    require(pretrain.learning_rate > 0, f"pretrain.learning_rate: must be positive, got {pretrain.learning_rate}")
    require(0 <= pretrain.min_learning_rate_ratio <= 1, "pretrain.min_learning_rate_ratio: must be within [0, 1]")
    require(pretrain.warmup_steps >= 0, f"pretrain.warmup_steps: must not be negative, got {pretrain.warmup_steps}")
    require(pretrain.max_grad_norm > 0, f"pretrain.max_grad_norm: must be positive, got {pretrain.max_grad_norm}")
    validate_trainer_sections(config)
    validate_ppo(config.ppo, model)
    for name in ("pretrain", "sft", "reward", "ppo"):
        source = getattr(config.data, name)
        if source is not None:
            require(0 < source.eval_fraction < 1, f"data.{name}.eval_fraction: must be within (0, 1)")
            require(source.max_rows is None or source.max_rows > 0,
                    f"data.{name}.max_rows: must be positive, got {source.max_rows}")
            if looks_like_local_path(source.path):
                require(Path(source.path).exists(), f"data.{name}.path: file {source.path} does not exist")
    try:
        config.data.builtin.validate()
    except ValueError as error:
        raise ConfigError(f"data.builtin.{error}") from None
    if model.name_or_path is not None and looks_like_local_path(model.name_or_path):
        require(Path(model.name_or_path).is_dir(), f"model.name_or_path: directory {model.name_or_path} does not exist")
    if tokenizer.name_or_path is not None and looks_like_local_path(tokenizer.name_or_path):
        require(Path(tokenizer.name_or_path).is_dir(), f"tokenizer.name_or_path: directory {tokenizer.name_or_path} does not exist")


def validate_trainer_sections(config: PipelineConfig) -> None:
    """The values of the `sft` and `reward` sections (their keys and types were checked as they were built)."""
    for stage in ("sft", "reward"):
        section = getattr(config, stage)
        for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length"):
            if section.get(key) is not None and key in section:
                require(section[key] > 0 or (key == "max_steps" and section[key] == -1),
                        f"{stage}.{key}: must be positive, got {section[key]}")
        require(section.get("learning_rate", 1) > 0, f"{stage}.learning_rate: must be positive")
        if section.get("max_length") is not None:
            require(section["max_length"] <= config.model.max_position_embeddings or config.model.name_or_path is not None,
                    f"{stage}.max_length: {section['max_length']} exceeds model.max_position_embeddings="
                    f"{config.model.max_position_embeddings}")
        if stage == "reward":
            require(section["normalization_samples"] > 0, "reward.normalization_samples: must be positive")
            require(section["margin"] >= 0, "reward.margin: must not be negative")


def validate_ppo(ppo: PPOSection, model: ModelSection) -> None:
    """The values of the `ppo` section, and its response length against the built model's context."""
    for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length", "logging_steps",
                "save_steps", "sample_steps", "kl_horizon"):
        require(getattr(ppo, key) > 0, f"ppo.{key}: must be positive, got {getattr(ppo, key)}")
    for key in ("temperature", "learning_rate", "value_learning_rate", "max_grad_norm"):
        require(getattr(ppo, key) > 0, f"ppo.{key}: must be positive, got {getattr(ppo, key)}")
    for key in ("cliprange", "cliprange_value"):
        require(0 < getattr(ppo, key) < 1, f"ppo.{key}: must be within (0, 1), got {getattr(ppo, key)}")
    for key in ("gamma", "lam"):
        require(0 <= getattr(ppo, key) <= 1, f"ppo.{key}: must be within [0, 1], got {getattr(ppo, key)}")
    require(ppo.kl_coef >= 0, f"ppo.kl_coef: must not be negative, got {ppo.kl_coef}")
    require(ppo.weight_decay >= 0, f"ppo.weight_decay: must not be negative, got {ppo.weight_decay}")
    require(ppo.vf_coef > 0, f"ppo.vf_coef: must be positive, got {ppo.vf_coef}")
    if ppo.target_kl is not None:
        require(ppo.target_kl > 0, f"ppo.target_kl: must be positive, got {ppo.target_kl}")
    if ppo.policy_snapshot_steps is not None:
        require(ppo.policy_snapshot_steps >= 1,
                f"ppo.policy_snapshot_steps: must be at least 1 (or null for none), got {ppo.policy_snapshot_steps}")
    if model.name_or_path is None:
        require(ppo.response_length < model.max_position_embeddings,
                f"ppo.response_length: {ppo.response_length} leaves no room for a prompt in "
                f"model.max_position_embeddings={model.max_position_embeddings}")


def looks_like_local_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; a leading ./ or / , more parts, a data file's suffix, or an existing
    path is local. A dot alone does not make a path: `Qwen/Qwen2.5-0.5B-Instruct` is a hub id."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix.lower() in DATA_FILE_SUFFIXES
            or Path(text).exists())
