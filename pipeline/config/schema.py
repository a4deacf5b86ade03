"""One YAML file describes a run: typed sections, `key=value` overrides, validation before any work.

Stage sections that feed a transformers/TRL argument class (`sft` → `SFTConfig`, `reward` → `RewardConfig`)
take that class's field names, so what a user knows about TRL carries over; our own sections (`pretrain`,
`ppo`) borrow the `TrainingArguments` names where one exists.

This module declares what a run config is (its sections and their defaults) and loads one; reading YAML and
typing it is pipeline/config/parsing.py, checking the values is pipeline/config/validation.py.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config.parsing import ConfigError, coerce, unknown_key_message

STAGES = ("pretrain", "sft", "reward", "ppo")


@dataclass
class RunSection:
    name: str = "default"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    seed: int = 42  # drives python, numpy, torch and data order in every stage
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    accelerate_config: str | None = None  # an Accelerate config file `rlhf run` launches every stage with
    # Several machines (README "Several machines"): the same command on each, with its own machine_rank (default: the
    # Accelerate config's) and the address of rank 0 (default: the config's main_process_ip).
    machine_rank: int | None = None
    main_process_ip: str | None = None
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
    # The std of the initial weights. transformers' 0.02 suits wide models; at width 128 it leaves attention nearly
    # uniform for hundreds of steps, and in-context copying (what reading a story needs) emerges late or never
    # within a short pretraining: on a copying task a 4 × 128 model learns it by step ~500 from 0.06 and only
    # after ~1100 from 0.02.
    initializer_range: float = 0.02
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
    max_rows: int | None = None  # read only the first max_rows rows of `split` (a sweep's smaller budgets do)


@dataclass
class BuiltinTaskConfig:
    seed: int = 1234  # every split derives its own seed from this one
    pretrain_stories: int = 20000  # ≈ 45 words ≈ 55 tokens each: ≈ 1.1M tokens; raise it for more
    pretrain_eval_stories: int = 500  # held-out stories for the pretraining eval loss
    sft_dialogues: int = 3000  # demonstrations of mixed quality (see good_demonstration_fraction)
    sft_eval_dialogues: int = 200  # demonstrations on held-out prompts, for the SFT eval loss
    ranked_prompts: int = 1500  # prompts with K ranked responses each, for the reward model
    ranked_eval_prompts: int = 200  # held-out ranked prompts, for reward accuracy against annotator and judge
    completions_per_prompt: int = 4  # K responses ranked per prompt, K(K−1)/2 preference pairs
    annotator_noise: float = 0.5  # temperature of the annotator's Bradley–Terry choices; 0 always agrees with gold
    good_demonstration_fraction: float = 0.6  # SFT demonstrations without a flaw
    ppo_prompts: int = 2000  # prompts PPO optimises on
    eval_prompts: int = 128  # held-out prompts for comparing policies with the gold judge

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        for name in ("pretrain_stories", "pretrain_eval_stories", "sft_dialogues", "sft_eval_dialogues",
                     "ranked_prompts", "ranked_eval_prompts", "completions_per_prompt", "ppo_prompts", "eval_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive whole number, got {value!r}")
        if not 2 <= self.completions_per_prompt <= 16:
            # Beyond 16 some prompts have too few distinct candidate responses to rank.
            raise ValueError(f"completions_per_prompt: a ranking needs 2 to 16 responses, got {self.completions_per_prompt}")
        if self.annotator_noise < 0:
            raise ValueError(f"annotator_noise: must not be negative, got {self.annotator_noise}")
        if not 0 <= self.good_demonstration_fraction <= 1:
            raise ValueError(f"good_demonstration_fraction: must be within [0, 1], got {self.good_demonstration_fraction}")


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
    # torch.compile the training forward. Off by default: on 2 CPU cores the first compile takes ~30 s, more than
    # it saves in the default run's 400 steps (bench/pretrain_throughput.py); not measured on GPU here.
    torch_compile: bool = False
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
    # The advantages' (and whitened rewards') mean and variance over every process's rollouts, as OpenRLHF and verl
    # whiten, or over each process's own, as TRL's PPOTrainer did; the same on one process.
    advantage_whitening: Literal["global", "per_process"] = "global"
    critic_init: Literal["reward", "policy"] = "reward"  # the value model's starting weights
    normalize_reward: bool = True  # use the mean/std the reward stage stored with its checkpoint
    peft: PeftSection | None = None  # LoRA policy; the reference is the same model with the adapter off
    bf16: bool | None = None
    logging_steps: int = 1
    save_steps: int = 20
    sample_steps: int = 20  # a table of sample completions every N steps
    # Write the policy alone (HF format) as ppo/policy-step-<N>/ every N steps, before the final step, for `rlhf
    # compare`'s over-optimisation curve; never pruned. None: no snapshots.
    policy_snapshot_steps: int | None = None
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
    """TRL's argument class behind a trainer section (imported on use: importing this module for ConfigError or
    a section class must not import TRL)."""
    from trl import RewardConfig, SFTConfig

    return {"sft": SFTConfig, "reward": RewardConfig}[stage]
