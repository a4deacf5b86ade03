import json
import os
import shutil

import pytest

from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import STAGES
from pipeline.run.checkpoints import mark_checkpoint_complete
from pipeline.run.launch import stage_status
from pipeline.run.manifests import read_manifest, write_manifest
from pipeline.run.stage_graph import (
    DIGEST_CACHE, STAGE_GRAPH, cached_directory_digest, changed_inputs, compared_checkpoints, config_values,
    directory_digest, stage_identity, stale_reason)
from pipeline.run.start import plan_stage_start
from pipeline.train.entry import stage_input_model
from tests.helpers import SMOKE


def smoke_config(tmp_path, *overrides):
    return load_config(SMOKE, [f"run.output_dir={tmp_path}", *overrides])


def finish_stage(config, stage, weights="w"):
    """What a stage leaves when it finishes: final/ and a manifest recording its identity."""
    stage_dir = config.run_dir / stage
    (stage_dir / "final").mkdir(parents=True, exist_ok=True)
    (stage_dir / "final" / "model.safetensors").write_text(f"{stage}:{weights}")
    write_manifest(stage_dir, stage=stage, status="finished", steps=1, **stage_identity(config, stage))


def finished_run(tmp_path, *overrides):
    config = smoke_config(tmp_path, *overrides)
    for stage in STAGES:
        finish_stage(config, stage)
    return config


def test_graph_declares_every_stage_and_its_inputs():
    assert tuple(STAGE_GRAPH) == STAGES
    assert STAGE_GRAPH["pretrain"].input_stages == ()
    assert STAGE_GRAPH["sft"].input_stages == ("pretrain",)
    assert STAGE_GRAPH["reward"].input_stages == ("sft",)
    assert STAGE_GRAPH["ppo"].input_stages == ("sft", "reward")


def test_reward_identity_covers_what_its_normalisation_reads(tmp_path):
    """The reward stage samples the SFT policy at PPO's temperature and length on PPO's prompts."""
    base = config_values(smoke_config(tmp_path), "reward")
    for override in ("ppo.temperature=0.9", "ppo.response_length=16", "ppo.local_rollout_forward_batch_size=8",
                     "data.on_bad_rows=skip"):
        assert config_values(smoke_config(tmp_path, override), "reward") != base, override
    assert config_values(smoke_config(tmp_path, "ppo.kl_coef=0.5"), "reward") == base


def test_directory_digest_follows_content_and_cache_follows_files(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "a.bin").write_bytes(b"one")
    (model / "sub" / "b.json").write_text("{}")
    first = directory_digest(model)
    assert cached_directory_digest(model, tmp_path) == first
    assert str(model.resolve()) in json.loads((tmp_path / DIGEST_CACHE).read_text())
    (model / "a.bin").write_bytes(b"two")
    assert cached_directory_digest(model, tmp_path) == directory_digest(model) != first
    (model / "a.bin").rename(model / "c.bin")  # same bytes under another name is another model
    assert directory_digest(model) != first


def test_finished_stage_whose_input_changed_is_set_aside_and_started_over(tmp_path):
    config = finished_run(tmp_path)
    assert plan_stage_start(config, "reward", restart=False).already_finished
    finish_stage(config, "sft", weights="retrained")  # e.g. `--restart sft` with a new sft config
    start = plan_stage_start(config, "reward", restart=False)
    assert not start.already_finished and start.resume_from is None
    moved, reason = start.set_aside
    assert "sft changed since it was read" in reason
    assert (moved / "reward" / "final" / "model.safetensors").read_text() == "reward:w"  # kept, not deleted
    assert "stale" in (moved / "WHY.txt").read_text()
    assert not (config.run_dir / "reward").exists()
    assert start.identity["inputs"]["model"]["digest"] == directory_digest(config.run_dir / "sft" / "final")


def test_interrupted_stage_whose_input_changed_is_refused(tmp_path):
    config = finished_run(tmp_path)
    manifest = read_manifest(config.run_dir / "ppo")
    write_manifest(config.run_dir / "ppo", status="running")
    (config.run_dir / "ppo" / "final").rename(config.run_dir / "ppo" / "checkpoint-3")
    mark_checkpoint_complete(config.run_dir / "ppo" / "checkpoint-3", 3)
    assert plan_stage_start(config, "ppo", restart=False).resume_from.name == "checkpoint-3"
    finish_stage(config, "reward", weights="other")
    with pytest.raises(ConfigError, match=r"ppo: reward changed since it was read .* --restart ppo"):
        plan_stage_start(config, "ppo", restart=False)
    assert manifest["inputs"]["reward"]["digest"] != directory_digest(config.run_dir / "reward" / "final")


def test_changed_own_config_is_refused_and_restart_sets_aside(tmp_path):
    finished_run(tmp_path)
    changed = smoke_config(tmp_path, "ppo.kl_coef=0.3")
    with pytest.raises(ConfigError, match=r"ppo: config changed .*ppo.kl_coef.*--restart ppo"):
        plan_stage_start(changed, "ppo", restart=False)
    start = plan_stage_start(changed, "ppo", restart=True)
    assert start.set_aside[1] == "restarted" and (start.set_aside[0] / "ppo" / "final").is_dir()
    with pytest.raises(ConfigError, match="reward: config changed .*ppo.temperature"):
        plan_stage_start(smoke_config(tmp_path, "ppo.temperature=1.0"), "reward", restart=False)


def test_a_policy_snapshot_alone_binds_the_stage_to_its_config(tmp_path):
    """A run killed after its first policy snapshot but before its first checkpoint: a resumed run keeps the
    snapshots it finds, so another config must be refused as if a checkpoint were there."""
    config = finished_run(tmp_path)
    ppo_dir = config.run_dir / "ppo"
    shutil.rmtree(ppo_dir / "final")
    write_manifest(ppo_dir, status="running")
    (ppo_dir / "policy-step-20").mkdir()
    start = plan_stage_start(config, "ppo", restart=False)
    assert start.resume_from is None and not start.already_finished and (ppo_dir / "policy-step-20").is_dir()
    with pytest.raises(ConfigError, match=r"ppo: config changed .*ppo.kl_coef.*--restart ppo"):
        plan_stage_start(smoke_config(tmp_path, "ppo.kl_coef=0.3"), "ppo", restart=False)


def test_restarting_pretraining_sets_its_tokenizer_aside_too(tmp_path):
    config = finished_run(tmp_path)
    (config.run_dir / "tokenizer").mkdir()
    start = plan_stage_start(config, "pretrain", restart=True)
    assert {p.name for p in start.set_aside[0].iterdir()} == {"pretrain", "tokenizer", "WHY.txt"}


def test_another_input_model_makes_sft_stale(tmp_path):
    """`model.name_or_path` changed in a run whose stages are [sft, reward, ppo]: SFT must not be skipped."""
    first, second = tmp_path / "model-a", tmp_path / "model-b"
    for model, text in ((first, "a"), (second, "b")):
        model.mkdir()
        (model / "model.safetensors").write_text(text)
    stages = "run.stages=[sft,reward,ppo]"
    config = smoke_config(tmp_path, stages, f"model.name_or_path={first}")
    for stage in ("sft", "reward", "ppo"):
        finish_stage(config, stage)
    assert stage_input_model(config, "sft") == str(first)
    assert plan_stage_start(config, "sft", restart=False).already_finished
    moved_to = smoke_config(tmp_path, stages, f"model.name_or_path={second}")
    start = plan_stage_start(moved_to, "sft", restart=False)
    assert not start.already_finished and "input model is now" in start.set_aside[1]
    # the same directory with new contents is another model too
    config = smoke_config(tmp_path / "again", stages, f"model.name_or_path={first}")
    finish_stage(config, "sft")
    (first / "model.safetensors").write_text("a, fine-tuned further")
    os.utime(first / "model.safetensors", ns=(1, 1))
    assert "model.name_or_path changed" in plan_stage_start(config, "sft", restart=False).set_aside[1]


def test_status_shows_stale_stages_and_why(tmp_path):
    config = finished_run(tmp_path)
    assert all(stale_reason(config.run_dir, stage) is None for stage in STAGES)
    assert stage_status(config.run_dir, "ppo").startswith("done")
    finish_stage(config, "sft", weights="retrained")
    assert stale_reason(config.run_dir, "sft") is None
    assert "sft changed since it was read" in stale_reason(config.run_dir, "reward")
    assert stale_reason(config.run_dir, "ppo").startswith("sft changed")
    assert stage_status(config.run_dir, "reward").startswith("stale")
    write_manifest(config.run_dir / "pretrain", inputs=None)
    assert "not recorded" in stale_reason(config.run_dir, "pretrain")
    assert stale_reason(config.run_dir, "sft") == "its input pretrain is stale"


def test_changed_inputs_names_each_difference():
    old = {"model": {"from": "sft", "path": "r/sft/final", "digest": "a" * 64}}
    assert changed_inputs(old, old) == []
    assert changed_inputs(old, {"model": {**old["model"], "digest": "b" * 64}}) == [
        "sft changed since it was read (aaaaaaaaaaaa → bbbbbbbbbbbb)"]
    assert changed_inputs(None, old) == ["its inputs were not recorded (made by an older version)"]
    assert changed_inputs(old, {}) == ["input model removed"]


def test_compare_names_its_checkpoints_and_refuses_a_stale_ppo(tmp_path):
    config = finished_run(tmp_path)
    checkpoints = compared_checkpoints(config.run_dir)
    assert set(checkpoints) == {"sft", "ppo", "reward", "pretrain"}
    assert checkpoints["sft"]["digest"] == directory_digest(config.run_dir / "sft" / "final")
    assert checkpoints["ppo"]["path"] == str(config.run_dir / "ppo" / "final")
    finish_stage(config, "sft", weights="retrained")
    with pytest.raises(ConfigError, match="the PPO stage is stale .*sft changed"):
        compared_checkpoints(config.run_dir)


def test_a_moved_run_directory_keeps_its_finished_stages_and_compares_what_it_holds(tmp_path):
    config = finished_run(tmp_path / "here")
    shutil.copytree(config.run_dir, tmp_path / "there" / config.run.name)
    moved = smoke_config(tmp_path / "there")
    for stage in STAGES:
        assert plan_stage_start(moved, stage, restart=False).already_finished, stage
        assert stale_reason(moved.run_dir, stage) is None
    checkpoints = compared_checkpoints(moved.run_dir)
    assert checkpoints["sft"]["path"] == str(moved.run_dir / "sft" / "final")
    assert checkpoints["reward"]["path"] == str(moved.run_dir / "reward" / "final")
    # Content still decides: an upstream stage retrained in the moved copy makes its downstream stale there.
    finish_stage(moved, "sft", weights="retrained")
    assert "sft changed since it was read" in plan_stage_start(moved, "reward", restart=False).set_aside[1]


def test_an_external_model_at_another_path_is_another_input():
    old = {"model": {"from": "model.name_or_path", "path": "/models/a", "digest": "a" * 64}}
    new = {"model": {**old["model"], "path": "/models/b"}}
    assert changed_inputs(old, new) == ["input model is now /models/b (was /models/a)"]


def test_a_setting_added_after_a_stage_finished_keeps_it_when_left_at_its_default(tmp_path):
    config = finished_run(tmp_path)
    manifest = read_manifest(config.run_dir / "pretrain")
    del manifest["config"]["pretrain"]["torch_compile"]  # as written before the setting existed
    write_manifest(config.run_dir / "pretrain", **manifest)
    assert plan_stage_start(config, "pretrain", restart=False).already_finished
    with pytest.raises(ConfigError, match=r"pretrain: config changed .*\(pretrain.torch_compile\)"):
        plan_stage_start(smoke_config(tmp_path, "pretrain.torch_compile=true"), "pretrain", restart=False)
