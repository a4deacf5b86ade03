"""Checks `rlhf run` makes before any stage starts: every configured dataset row, every input checkpoint and
tokenizer, the chat template SFT will mask. A run that would fail at its third stage on a bad row fails now instead, with the row named, and
before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

from data.assistant_masks import assistant_token_masks
from data.formats import converted_splits, dialogues_from_rows, preference_pairs_from_rows, prompts_from_rows
from data.loading import texts_from_rows
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig
from pipeline.config.validation import looks_like_local_path
from pipeline.run.stage_graph import EXTERNAL_MODEL, starting_model_source, upstream_final_dir

DATASET_CHECKS = {
    "pretrain": lambda rows, where, on_bad: texts_from_rows(rows, where),
    "sft": dialogues_from_rows,
    "reward": preference_pairs_from_rows,
    "ppo": prompts_from_rows,
}


# The built-in task's dialogues: one user turn, one assistant turn.
BUILTIN_DIALOGUE = [{"role": "user", "content": "Write a short story about Mia."},
                    {"role": "assistant", "content": "Mia had a red kite."}]


def check_datasets(config: PipelineConfig) -> dict[str, tuple[list, list]]:
    """Load and convert the dataset of every stage in the run, as the stage itself will; the converted (train,
    eval) rows of each configured dataset by stage."""
    converted = {}
    for stage in config.run.stages:
        source = getattr(config.data, stage)
        if source is None:
            continue
        converted[stage] = converted_splits(source, f"data.{stage}", config.run.seed, config.data.on_bad_rows,
                                            DATASET_CHECKS[stage])
    return converted


def sft_tokenizer_directory(config: PipelineConfig) -> Path | None:
    """The local directory whose tokenizer (and chat template) the SFT stage will train with, where known before
    the run: a finished upstream stage's final/ or a local model.name_or_path. None for a tokenizer that a
    pretraining stage of this run will train (the built-in template) or a hub id."""
    source = starting_model_source(config, "sft")
    if source == EXTERNAL_MODEL:
        path = config.model.name_or_path
    elif source in config.run.stages:
        path = config.tokenizer.name_or_path or config.model.name_or_path
    else:
        path = str(upstream_final_dir(config, "sft", source))
    return Path(path) if path is not None and looks_like_local_path(path) and Path(path).is_dir() else None


def check_chat_template(config: PipelineConfig, sft_dialogues: tuple[list, list] | None) -> None:
    """SFT's assistant-only loss needs a chat template whose assistant turns can be found by rendering prefixes
    (data/assistant_masks.py): one dialogue of each sequence of roles in the SFT data (the built-in task has one)
    goes through the masking SFT will apply, so that a template which cannot be masked is refused now."""
    if "sft" not in config.run.stages or not config.sft.get("assistant_only_loss", False):
        return
    directory = sft_tokenizer_directory(config)
    if directory is None:
        return
    from data.tokenizer import load_tokenizer

    dialogues = [BUILTIN_DIALOGUE]
    if sft_dialogues is not None:
        by_roles = {tuple(m["role"] for m in d["messages"]): d["messages"] for d in sft_dialogues[0] + sft_dialogues[1]}
        dialogues = list(by_roles.values())
    assistant_token_masks(load_tokenizer(directory, config.model.trust_remote_code), dialogues, str(directory))


def check_checkpoint(path: Path, key: str, kind: str = "ForCausalLM", needs_chat_template: bool = True) -> None:
    """A local HF checkpoint directory: a config of the right kind, readable safetensors, a usable tokenizer."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}: {path} has no config.json; is it a checkpoint directory (e.g. runs/<name>/sft/final)?")
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{key}: {config_file} is not valid JSON") from None
    if architectures and not any(a.endswith(kind) for a in architectures):
        raise ConfigError(f"{key}: {path} holds a {architectures[0]}, but this stage needs a *{kind} model "
                          f"(a checkpoint of another stage?)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = ", ".join(sorted(p.name for p in path.glob("*.bin"))) or "none"
        raise ConfigError(f"{key}: {path} has no .safetensors weights (found: {found}); the pipeline loads "
                          f"safetensors only")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                names = list(handle.keys())
                if names:
                    handle.get_slice(names[-1])[:1]
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise ConfigError(f"{key}: {file} is damaged or truncated ({str(error).splitlines()[0]})") from None
    if needs_chat_template:
        from data.tokenizer import load_tokenizer

        try:
            load_tokenizer(path)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None


def check_inputs(config: PipelineConfig) -> None:
    """The checkpoints and tokenizer the run starts from, when they are local."""
    name = config.model.name_or_path
    first = config.run.stages[0]
    if name is not None and looks_like_local_path(name) and first != "pretrain":
        check_checkpoint(Path(name), "model.name_or_path")
    tokenizer = config.tokenizer.name_or_path
    if tokenizer is not None and looks_like_local_path(tokenizer):
        from data.tokenizer import load_tokenizer

        try:
            load_tokenizer(tokenizer)
        except (OSError, ValueError) as error:
            raise ConfigError(f"tokenizer.name_or_path: {str(error).splitlines()[0]}") from None


def check_output_directory(config: PipelineConfig) -> None:
    """The run directory (or the nearest existing folder above it) must be a writable directory."""
    import os
    import tempfile

    existing = config.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.output_dir: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".rlhf-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"run.output_dir: cannot write in {existing} ({os.strerror(error.errno or 0)})") from None


def check_accelerate_config(config: PipelineConfig) -> None:
    """The engine run.accelerate_config names can run here: DeepSpeed installed, ZeRO-3 able to gather final
    weights, FSDP at version 2. (Each stage checks again that Accelerate really gave it that engine.)"""
    import importlib.util

    import yaml

    path = config.run.accelerate_config
    if path is None:
        return
    key = "run.accelerate_config"
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{key}: cannot read {path} ({str(error).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{key}: {path} is not an Accelerate config (a YAML mapping)")
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"{key}: {path} asks for DeepSpeed, which is not installed; install it with "
                              f"pip install -e \".[deepspeed]\" (g++ compiles its first op on the first run)")
        deepspeed = settings.get("deepspeed_config") or {}
        if (int(deepspeed.get("zero_stage", 2)) == 3 and not deepspeed.get("deepspeed_config_file")
                and not deepspeed.get("zero3_save_16bit_model", False)):
            raise ConfigError(f"{key}: {path} runs ZeRO-3 without deepspeed_config.zero3_save_16bit_model: true, "
                              f"so the final weights could not be gathered; set it to true")
    if kind == "FSDP" and int((settings.get("fsdp_config") or {}).get("fsdp_version", 1)) != 2:
        raise ConfigError(f"{key}: {path} asks for FSDP version 1, which the stages do not support; set "
                          f"fsdp_config.fsdp_version: 2")
    if kind == "FSDP" and int(settings.get("num_processes", 1) or 1) < 2:
        # Accelerate would run it as one plain process (it shards over 2 or more only); the stage would refuse.
        raise ConfigError(f"{key}: {path} asks for FSDP on 1 process, which Accelerate runs unsharded; set "
                          f"num_processes to 2 or more, or use configs/accelerate/single_gpu.yaml")


def preflight(config: PipelineConfig) -> None:
    """Raise ConfigError or DataError (one line, naming the key or row) if the run cannot work."""
    check_output_directory(config)
    check_accelerate_config(config)
    check_inputs(config)
    converted = check_datasets(config)
    check_chat_template(config, converted.get("sft"))
