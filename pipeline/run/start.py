"""Where a stage starts: skip (finished with the same identity), resume (newest complete checkpoint), start
over (`--restart`, or stale inputs, outputs set aside) or refuse (its config changed under its checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PipelineConfig
from pipeline.run.checkpoints import latest_checkpoint, policy_snapshots
from pipeline.run.files import remove_stale_temporaries
from pipeline.run.manifests import read_manifest
from pipeline.run.stage_graph import changed_inputs, config_values, set_aside, stage_identity


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "",
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ between two nested dicts. With `defaults` (the same keys' default values),
    a key that `old` lacks and `new` holds at its default is no difference: it is a setting added to the pipeline
    after `old` was recorded, and the default keeps what the code did before it existed."""
    keys = sorted(set(old) | set(new))
    differences = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        default = (defaults or {}).get(key)
        if defaults is not None and key not in old and key in defaults and b == default:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{prefix}{key}.",
                                              default if isinstance(default, dict) else None)
        elif a != b:
            differences.append(f"{prefix}{key}")
    return differences


@dataclass
class StageStart:
    """Where a stage begins: from scratch, from a checkpoint, or nothing to do because final/ is current.
    `identity` (config values and input digests) goes into the manifest; `set_aside` says where outputs that
    were stale or restarted went, and why."""

    stage_dir: Path
    resume_from: Path | None
    already_finished: bool
    identity: dict[str, Any] = field(default_factory=dict)
    set_aside: tuple[Path, str] | None = None


def plan_stage_start(config: PipelineConfig, stage: str, restart: bool, is_main_process: bool = True) -> StageStart:
    """Decide whether to skip, resume or start a stage, from its identity (config values and the digests of
    the models it reads, pipeline/run/stage_graph.py) against the one its manifest recorded:
    - same identity, finished: skip; same identity, interrupted: resume from the newest complete checkpoint;
    - its own config changed: refuse (a typo must not discard work), `--restart` starts it over;
    - an input model changed: a finished stage is stale, so its outputs are set aside and it starts over; an
      interrupted one is refused like a config change.
    Only the main process moves files; the others reach the same decision from the same manifest."""
    stage_dir = config.run_dir / stage
    identity = stage_identity(config, stage, write_cache=is_main_process)
    if restart:
        moved = set_aside(config.run_dir, stage, "restarted with --restart") if is_main_process else None
        announce_set_aside(stage, moved, "restarted")
        return StageStart(stage_dir, None, False, identity, (moved, "restarted") if moved else None)
    manifest = read_manifest(stage_dir)
    finished = manifest is not None and manifest.get("status") == "finished" and (stage_dir / "final").is_dir()
    # A policy snapshot counts: a resumed run keeps the snapshots it finds, so they must share its identity.
    has_outputs = (latest_checkpoint(stage_dir) is not None or (stage_dir / "final").is_dir()
                   or bool(policy_snapshots(stage_dir)))
    if manifest is not None and has_outputs:
        changed = config_differences(manifest.get("config") or {}, identity["config"],
                                     defaults=config_values(PipelineConfig(), stage))
        if changed:
            raise ConfigError(
                f"{stage}: config changed since this stage's checkpoints were written ({', '.join(changed[:5])}); "
                f"run with --restart {stage} to start it over, or restore the old values")
        inputs_changed = changed_inputs(manifest.get("inputs"), identity["inputs"])
        if inputs_changed and not finished:
            raise ConfigError(
                f"{stage}: {inputs_changed[0]} since this stage's checkpoints were written; run with --restart "
                f"{stage} to start it over from the new input")
        if inputs_changed:
            reason = f"stale: {'; '.join(inputs_changed)}"
            moved = set_aside(config.run_dir, stage, reason) if is_main_process else None
            announce_set_aside(stage, moved, reason)
            return StageStart(stage_dir, None, False, identity, (moved, reason) if moved else None)
    if finished:
        return StageStart(stage_dir, None, True, identity)
    if is_main_process:
        remove_stale_temporaries(stage_dir)
    return StageStart(stage_dir, latest_checkpoint(stage_dir), False, identity)


def announce_set_aside(stage: str, moved: Path | None, reason: str) -> None:
    if moved is not None:
        print(f"[{stage}] {reason}; its earlier outputs are kept in {moved}; starting it over", flush=True)
