"""One YAML file describes a run: typed sections, `key=value` overrides, validation before any work.

Stage sections that feed a transformers/TRL argument class (`sft` → `SFTConfig`, `reward` → `RewardConfig`)
take that class's field names, so what a user knows about TRL carries over; our own sections (`pretrain`,
`ppo`) borrow the `TrainingArguments` names where one exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.builtin_task import BuiltinTaskConfig

STAGES = ("pretrain", "sft", "reward", "ppo")


class ConfigError(ValueError):
    """A config problem, reported to the user as one line naming the key."""


@dataclass
class RunSection:
    name: str = "default"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    seed: int = 42  # drives python, numpy, torch and data order in every stage
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    accelerate_config: str | None = None  # an Accelerate config file `rlhf run` launches every stage with
    keep_last_checkpoints: int = 2  # complete checkpoints kept per stage; older ones are deleted
    offline: bool = True  # set HF_HUB_OFFLINE so nothing is downloaded unless the config says otherwise


@dataclass
class ModelSection:
    name_or_path: str | None = None  # any HF causal LM (hub id or path); None builds a Llama-style model below
    num_hidden_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    intermediate_size: int = 352  # ~2.75 × width as in Llama's SwiGLU
    max_position_embeddings: int = 256  # the context length
    rope_theta: float = 10000.0
    trust_remote_code: bool = False  # never run code from a checkpoint unless asked to explicitly


@dataclass
class TokenizerSection:
    name_or_path: str | None = None  # load this tokenizer; None trains a byte-level BPE on the pretraining corpus
    vocab_size: int = 2048
    training_texts: int = 20000  # texts of the pretraining corpus the BPE is trained on


@dataclass
class DatasetSource:
    path: str  # a local .jsonl/.json/.parquet/.csv file (optionally .gz) or a hub dataset id
    split: str = "train"
    eval_split: str | None = None  # a split of the same dataset to evaluate on
    eval_fraction: float = 0.05  # held out from `split` when there is no eval_split
    name: str | None = None  # hub dataset configuration name


@dataclass
class DataSection:
    builtin: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)
    # Each stage reads the built-in task unless given a dataset in TRL's standard formats.
    pretrain: DatasetSource | None = None  # text
    sft: DatasetSource | None = None  # messages or prompt-completion
    reward: DatasetSource | None = None  # chosen/rejected or ranked_completions
    ppo: DatasetSource | None = None  # prompt-only
    on_bad_rows: Literal["error", "skip"] = "error"  # stop at the first bad row, or skip bad rows with a count


@dataclass
class PretrainSection:
    max_steps: int = 300  # optimizer steps
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    seq_length: int = 128  # packed block length, at most model.max_position_embeddings
    learning_rate: float = 3e-3
    min_learning_rate_ratio: float = 0.1  # cosine decays to this share of learning_rate
    warmup_steps: int = 30
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # bf16 autocast; None = on where the device supports it
    eval_steps: int = 100
    eval_batches: int = 8  # batches of the held-out split per evaluation
    logging_steps: int = 10
    save_steps: int = 100
    report_to: str = "auto"  # an Accelerate tracker name, "none", or "auto" (tensorboard when installed)


@dataclass
class PeftSection:
    """LoRA adapters via peft; the stage trains only these and, unless told otherwise, saves a merged model."""

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# Our keys inside the `sft` and `reward` sections; every other key goes to TRL's SFTConfig / RewardConfig.
TRAINER_EXTRAS: dict[str, dict[str, Any]] = {
    "sft": {"peft": None, "save_adapter_only": False, "sample_prompts": 3},
    "reward": {"peft": None, "margin": 0.0, "normalization_samples": 64},
}
TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"max_steps": 200, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
            "warmup_steps": 20, "weight_decay": 0.0, "logging_steps": 10, "eval_steps": 100, "save_steps": 100,
            "max_length": 256, "assistant_only_loss": True, "packing": False, "report_to": "none"},
    # reward batches count prompts, each scoring its K responses once (K = 4: 4 sequences, 6 pairs)
    "reward": {"max_steps": 120, "per_device_train_batch_size": 16, "learning_rate": 1e-3,
               "lr_scheduler_type": "cosine", "warmup_steps": 12, "logging_steps": 10, "eval_steps": 60,
               "save_steps": 60, "max_length": 256, "report_to": "none"},
}
# Fields the pipeline sets itself: the run directory decides where things go.
TRAINER_OWNED = ("output_dir", "resume_from_checkpoint", "do_train", "do_eval", "save_total_limit", "push_to_hub",
                 "hub_model_id", "overwrite_output_dir", "logging_dir")


@dataclass
class PPOSection:
    """Our PPO (stages/ppo.py). Field names follow TRL 0.19's PPOConfig where one existed."""

    max_steps: int = 60  # PPO iterations: one rollout batch, then num_ppo_epochs of updates on it
    per_device_train_batch_size: int = 16  # micro-batch of one forward/backward
    gradient_accumulation_steps: int = 4
    num_mini_batches: int = 1  # rollout batch = per_device_train_batch_size × gradient_accumulation_steps × this
    num_ppo_epochs: int = 4
    local_rollout_forward_batch_size: int = 64  # sequences per no-grad forward while scoring rollouts
    response_length: int = 48  # max new tokens per response
    temperature: float = 0.7  # sampling and logprob temperature (no top-k / top-p: the ratio needs π itself)
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of a response that never ended
    learning_rate: float = 3e-5  # policy
    value_learning_rate: float = 1e-4  # critic
    lr_scheduler_type: Literal["linear", "constant"] = "linear"  # TRL's default: decay to 0 over max_steps
    weight_decay: float = 0.0  # AdamW's, on weight matrices; TRL's default (torch's AdamW alone would use 0.01)
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05  # β; the starting value when target_kl is set
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: float | None = None  # set to use Ziegler et al.'s adaptive β
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    critic_init: Literal["reward", "policy"] = "reward"  # the value model's starting weights
    normalize_reward: bool = True  # use the mean/std the reward stage stored with its checkpoint
    peft: PeftSection | None = None  # LoRA policy; the reference is the same model with the adapter off
    bf16: bool | None = None
    logging_steps: int = 1
    save_steps: int = 20
    sample_steps: int = 20  # a table of sample completions every N steps
    report_to: str = "auto"


STAGE_SECTIONS: dict[str, type] = {"pretrain": PretrainSection, "ppo": PPOSection}


@dataclass
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    sft: dict[str, Any] = field(default_factory=dict)  # TRL SFTConfig fields, plus TRAINER_EXTRAS["sft"]
    reward: dict[str, Any] = field(default_factory=dict)  # TRL RewardConfig fields, plus TRAINER_EXTRAS["reward"]
    ppo: PPOSection = field(default_factory=PPOSection)
    source: str | None = None  # the YAML file this came from

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config.pop("source")
        return config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML run config, apply `key=value` overrides, and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    config = dataclass_from_dict(PipelineConfig, raw, "")
    for stage in ("sft", "reward"):
        setattr(config, stage, trainer_section(stage, getattr(config, stage)))
    config.source = str(path) if path is not None else None
    validate(config)
    return config


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `true`, `[a, b]`, `null`)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[: depth + 1])} is not a section")
        node = child
    node[leaf] = value


def dataclass_from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a dict, naming the dotted key of the first unknown or mistyped field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for key in raw:
        if key not in known:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", str(key), known))
    values = {key: coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**values)


def unknown_key_message(dotted: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
    return f"{dotted}: unknown key{hint}"


def coerce(hint: Any, value: Any, dotted: str) -> Any:
    """Check `value` against a type hint (dataclasses, unions, Literal, list, scalars); return it typed."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is None:
            raise ConfigError(f"{dotted}: must be a mapping, got null")
        return dataclass_from_dict(hint, value, f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(option, value, dotted)
            except ConfigError as error:
                errors.append(error)
        raise errors[-1] if len(errors) == 1 else ConfigError(f"{dotted}: expected {describe(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{dotted}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(item, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{dotted}: expected {describe(hint)}, got {type(value).__name__} {value!r}")
    return value


def trainer_section(stage: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Check a section meant for TRL's SFTConfig/RewardConfig: known field names, simple types, our extras."""
    arguments_class = trainer_arguments_class(stage)
    hints = typing.get_type_hints(arguments_class)
    known = [f.name for f in dataclasses.fields(arguments_class) if f.init] + list(TRAINER_EXTRAS[stage])
    section = {**TRAINER_EXTRAS[stage], **TRAINER_DEFAULTS[stage]}
    for key, value in raw.items():
        if key in TRAINER_OWNED:
            raise ConfigError(f"{stage}.{key}: set by the pipeline from the run directory; remove it")
        if key not in known:
            raise ConfigError(unknown_key_message(f"{stage}.{key}", str(key), known))
        if key == "peft":
            section[key] = None if value is None else dataclasses.asdict(coerce(PeftSection, value, f"{stage}.peft"))
        elif key in hints:
            section[key] = coerce(hints[key], value, f"{stage}.{key}")
        else:
            section[key] = value
    return section


def trainer_arguments_class(stage: str) -> type:
    from trl import RewardConfig, SFTConfig

    return {"sft": SFTConfig, "reward": RewardConfig}[stage]


def describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: PipelineConfig) -> None:
    """Check values that are well typed but impossible, and combinations that cannot work."""
    run, model, tokenizer, pretrain = config.run, config.model, config.tokenizer, config.pretrain
    require(bool(run.name) and "/" not in run.name and run.name not in (".", ".."),
            f"run.name: must be a plain directory name, got {run.name!r}")
    require(bool(run.stages), "run.stages: must name at least one stage")
    for i, stage in enumerate(run.stages):
        require(stage in STAGES, unknown_key_message(f"run.stages[{i}]", stage, list(STAGES)).replace("key", "stage"))
    require(run.keep_last_checkpoints >= 1, "run.keep_last_checkpoints: must be at least 1")
    if run.accelerate_config is not None:
        require(Path(run.accelerate_config).is_file(), f"run.accelerate_config: file {run.accelerate_config} does not exist")
    positive = {
        "model.num_hidden_layers": model.num_hidden_layers, "model.hidden_size": model.hidden_size,
        "model.num_attention_heads": model.num_attention_heads, "model.intermediate_size": model.intermediate_size,
        "model.max_position_embeddings": model.max_position_embeddings, "tokenizer.vocab_size": tokenizer.vocab_size,
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
    if model.name_or_path is None:
        require(ppo.response_length < model.max_position_embeddings,
                f"ppo.response_length: {ppo.response_length} leaves no room for a prompt in "
                f"model.max_position_embeddings={model.max_position_embeddings}")


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".gz")


def looks_like_local_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; a leading ./ or / , more parts, a data file's suffix, or an existing
    path is local. A dot alone does not make a path: `Qwen/Qwen2.5-0.5B-Instruct` is a hub id."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix.lower() in DATA_FILE_SUFFIXES
            or Path(text).exists())
