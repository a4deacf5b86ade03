"""The stage graph, declared once: what each stage reads (config keys, upstream models) and what it writes.

Everything that needs to know how stages depend on one another reads it: a stage's identity (its config
values plus the content digest of every model it reads) decides whether its outputs are current, `rlhf run`
re-runs a finished stage whose inputs changed (keeping the stale outputs aside), `rlhf status` shows stale
stages, and the report names the exact checkpoints it compared.

    pretrain ──▶ sft ──▶ reward
                  │        │
                  └──▶ ppo ◀┘

A stage's starting model is its upstream stage's final/ when that stage is part of the run or has finished,
else `model.name_or_path` (a local directory, hashed like a stage output, or a hub id, known by name only).
Digests are content hashes (SHA-256 over every file's relative path and bytes), cached by each file's size
and modification time in RUN_DIR/.digests.json so a large model is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import STAGES, PipelineConfig
from pipeline.config.validation import looks_like_local_path
from pipeline.run.files import write_json_atomically
from pipeline.run.manifests import read_manifest

DIGEST_CACHE = ".digests.json"


STALE_DIR = "stale"  # RUN_DIR/stale/<stage>-<time>/: outputs set aside, never deleted by the pipeline


EXTERNAL_MODEL = "model.name_or_path"


@dataclass(frozen=True)
class StageNode:
    """One stage: the config keys its result depends on, the models it reads, the run-directory entries it
    writes, and the manifest metric `rlhf run` prints for it."""

    name: str
    config_keys: tuple[str, ...]
    starts_from: str | None  # the upstream stage whose final/ is its starting model (else model.name_or_path)
    also_reads: tuple[str, ...]  # further upstream stages whose final/ it reads, e.g. PPO's reward model
    writes: tuple[str, ...]
    key_metric: str

    @property
    def input_stages(self) -> tuple[str, ...]:
        return ((self.starts_from,) if self.starts_from else ()) + self.also_reads


# The reward stage samples the SFT policy as PPO will (temperature, response length, PPO's prompts, in batches of
# PPO's rollout size, which decide the random draws) to fix its score normalisation, so those PPO keys are part
# of the reward model's identity too.
STAGE_GRAPH: dict[str, StageNode] = {
    "pretrain": StageNode("pretrain", ("run.seed", "model", "tokenizer", "data.builtin", "data.pretrain",
                                       "data.on_bad_rows", "pretrain"),
                          starts_from=None, also_reads=(), writes=("pretrain", "tokenizer"), key_metric="eval_loss"),
    "sft": StageNode("sft", ("run.seed", "model.trust_remote_code", "data.builtin", "data.sft", "data.on_bad_rows",
                             "sft"),
                     starts_from="pretrain", also_reads=(), writes=("sft",), key_metric="eval_loss"),
    "reward": StageNode("reward", ("run.seed", "model.trust_remote_code", "data.builtin", "data.reward", "data.ppo",
                                   "data.on_bad_rows", "reward", "ppo.temperature", "ppo.response_length",
                                   "ppo.local_rollout_forward_batch_size"),
                        starts_from="sft", also_reads=(), writes=("reward",), key_metric="eval_accuracy"),
    "ppo": StageNode("ppo", ("run.seed", "model.trust_remote_code", "data.builtin", "data.ppo", "data.on_bad_rows",
                             "ppo"),
                     starts_from="sft", also_reads=("reward",), writes=("ppo",), key_metric="objective/gold_score"),
}


assert tuple(STAGE_GRAPH) == STAGES


# ---------------------------------------------------------------- digests
def file_signature(directory: Path) -> list[list[Any]]:
    """Relative path, size and modification time of every file: cheap to read, changes when a file does."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return [[p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def directory_digest(directory: Path) -> str:
    """SHA-256 over every file's relative path and content, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def cached_directory_digest(directory: Path, run_dir: Path, write_cache: bool = True) -> str:
    """directory_digest, remembered in RUN_DIR/.digests.json for as long as no file's size or mtime changes."""
    directory, cache_path = Path(directory).resolve(), Path(run_dir) / DIGEST_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    signature = file_signature(directory)
    entry = cache.get(str(directory))
    if entry and entry.get("signature") == signature:
        return entry["digest"]
    digest = directory_digest(directory)
    if write_cache and cache_path.parent.is_dir():
        cache[str(directory)] = {"signature": signature, "digest": digest}
        try:
            write_json_atomically(cache_path, cache)
        except OSError:
            pass  # a read-only run directory: hash again next time
    return digest


# ---------------------------------------------------------------- identity
def config_values(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The values of the config keys a stage's result depends on, as JSON."""
    as_dict = config.to_dict()
    values: dict[str, Any] = {}
    for dotted in STAGE_GRAPH[stage].config_keys:
        node: Any = as_dict
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[dotted] = node
    return json.loads(json.dumps(values, default=str))


def starting_model_source(config: PipelineConfig, stage: str) -> str | None:
    """Where a stage's starting model comes from: an upstream stage's name, EXTERNAL_MODEL, or None (a model
    built from the config's architecture, pretraining only)."""
    upstream = STAGE_GRAPH[stage].starts_from
    if upstream is not None and (upstream in config.run.stages or (config.run_dir / upstream / "final").is_dir()):
        return upstream
    if config.model.name_or_path is not None:
        return EXTERNAL_MODEL
    if upstream is None:
        return None
    raise ConfigError(f"{stage}: no input model: add '{upstream}' to run.stages or set model.name_or_path")


def input_record(config: PipelineConfig, stage: str, source: str, write_cache: bool = True) -> dict[str, Any]:
    """{"from", "path", "digest"} of one model a stage reads; a missing upstream output is a ConfigError."""
    if source == EXTERNAL_MODEL:
        name = config.model.name_or_path
        local = looks_like_local_path(name) and Path(name).is_dir()
        return {"from": EXTERNAL_MODEL, "path": str(Path(name).resolve()) if local else name,
                "digest": cached_directory_digest(Path(name), config.run_dir, write_cache) if local else None}
    final_dir = upstream_final_dir(config, stage, source)
    return {"from": source, "path": str(final_dir),
            "digest": cached_directory_digest(final_dir, config.run_dir, write_cache)}


def upstream_final_dir(config: PipelineConfig, stage: str, source: str) -> Path:
    """The final/ of the upstream stage `source` that `stage` reads; a ConfigError when it is not there."""
    final_dir = config.run_dir / source / "final"
    if not final_dir.is_dir():
        raise ConfigError(f"{stage}: needs the {source} stage's model at {final_dir}; run {source} first")
    return final_dir


def stage_inputs(config: PipelineConfig, stage: str, write_cache: bool = True) -> dict[str, dict[str, Any]]:
    """The models a stage reads, by role: "model" (its starting model) and each of `also_reads` by name."""
    inputs = {}
    source = starting_model_source(config, stage)
    if source is not None:
        inputs["model"] = input_record(config, stage, source, write_cache)
    for upstream in STAGE_GRAPH[stage].also_reads:
        inputs[upstream] = input_record(config, stage, upstream, write_cache)
    return inputs


def stage_identity(config: PipelineConfig, stage: str, write_cache: bool = True) -> dict[str, Any]:
    """What a stage's outputs are a function of: {"config": its config values, "inputs": its input models}."""
    return {"config": config_values(config, stage), "inputs": stage_inputs(config, stage, write_cache)}


def changed_inputs(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """One phrase per input that differs from what a stage was trained from (all of them if none was recorded)."""
    if recorded is None:
        return ["its inputs were not recorded (made by an older version)"]
    phrases = []
    for role in sorted(set(recorded) | set(current)):
        old, new = recorded.get(role), current.get(role)
        if old is None or new is None:
            phrases.append(f"input {role} {'added' if old is None else 'removed'}")
        elif old.get("from") != new.get("from") or (new.get("from") not in STAGE_GRAPH
                                                     and old.get("path") != new.get("path")):
            # An upstream stage of this run is RUN_DIR/<stage>/final wherever the run directory is: a run moved
            # or copied elsewhere keeps its stages. Its content decides, below.
            phrases.append(f"input {role} is now {new['path']} (was {old['path']})")
        elif old.get("digest") != new.get("digest"):
            phrases.append(f"{new['from']} changed since it was read ({short(old.get('digest'))} → "
                           f"{short(new.get('digest'))})")
    return phrases


def short(digest: str | None) -> str:
    return digest[:12] if digest else "unhashed"


# ---------------------------------------------------------------- stale outputs
def set_aside(run_dir: Path, stage: str, reason: str) -> Path | None:
    """Move everything a stage wrote into RUN_DIR/stale/<stage>-<time>/ with a note of why; None if nothing
    was there. Nothing a user trained is deleted."""
    present = [entry for entry in STAGE_GRAPH[stage].writes if (run_dir / entry).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    destination = run_dir / STALE_DIR / f"{stage}-{stamp}"
    suffix = 1
    while destination.exists():
        destination = run_dir / STALE_DIR / f"{stage}-{stamp}-{suffix}"
        suffix += 1
    destination.mkdir(parents=True)
    for entry in present:
        (run_dir / entry).rename(destination / entry)
    (destination / "WHY.txt").write_text(f"{stage} set aside at {stamp} UTC: {reason}\n", encoding="utf-8")
    return destination


def stale_reason(run_dir: Path, stage: str) -> str | None:
    """Why a finished stage's outputs no longer match the models it was trained from, or None if they do.
    Needs no config: the inputs recorded in its manifest are compared with what is on disk now."""
    manifest = read_manifest(run_dir / stage) or {}
    recorded = manifest.get("inputs")
    if recorded is None:
        return "its inputs were not recorded (made by an older version)"
    for role, record in recorded.items():
        source = record.get("from")
        if source in STAGE_GRAPH:
            upstream_reason = stale_reason(run_dir, source) if (run_dir / source / "final").is_dir() else None
            if upstream_reason is not None:
                return f"its input {source} is stale"
            final_dir = run_dir / source / "final"
            if not final_dir.is_dir():
                return f"its input {source} is gone ({final_dir})"
            current = cached_directory_digest(final_dir, run_dir, write_cache=False)
        elif record.get("digest") is not None:
            path = Path(record["path"])
            if not path.is_dir():
                return f"its input {role} is gone ({path})"
            current = cached_directory_digest(path, run_dir, write_cache=False)
        else:
            continue  # a hub id: known by name only
        if current != record.get("digest"):
            return f"{source if source in STAGE_GRAPH else role} changed since it was read " \
                   f"({short(record.get('digest'))} → {short(current)})"
    return None


def recorded_input_path(run_dir: Path, record: dict[str, Any]) -> str:
    """Where a recorded input model is now: an upstream stage's final/ in this run directory (which may have moved
    since the record was written), else the path or hub id as recorded."""
    return str(run_dir / record["from"] / "final") if record.get("from") in STAGE_GRAPH else record["path"]


def compared_checkpoints(run_dir: Path) -> dict[str, dict[str, str | None]]:
    """The checkpoints `rlhf compare` reads, {name: {"path", "digest"}}: PPO's final policy, the SFT policy and
    reward model PPO was trained from (as recorded in its manifest), and the pretrained model when present.
    A PPO stage that is stale (its SFT policy or reward model changed since) is refused: comparing it with the
    new SFT policy would measure KL to the wrong reference."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir / "ppo")
    final_dir = run_dir / "ppo" / "final"
    if manifest is None or manifest.get("status") != "finished" or not final_dir.is_dir():
        raise ConfigError(f"{run_dir}: no finished PPO stage to compare (expected {final_dir})")
    reason = stale_reason(run_dir, "ppo")
    if reason is not None:
        raise ConfigError(f"{run_dir}: the PPO stage is stale ({reason}); run `rlhf run` again to retrain it "
                          f"before comparing")
    inputs = manifest["inputs"]
    checkpoints = {"sft": {"path": recorded_input_path(run_dir, inputs["model"]), "digest": inputs["model"]["digest"]},
                   "ppo": {"path": str(final_dir), "digest": cached_directory_digest(final_dir, run_dir)},
                   "reward": {"path": recorded_input_path(run_dir, inputs["reward"]),
                              "digest": inputs["reward"]["digest"]}}
    pretrained = run_dir / "pretrain" / "final"
    if pretrained.is_dir():
        checkpoints["pretrain"] = {"path": str(pretrained), "digest": cached_directory_digest(pretrained, run_dir)}
    return checkpoints
