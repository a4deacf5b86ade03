import json

import pytest

from pipeline.run.checkpoints import (
    COMPLETE_MARKER, complete_checkpoints, latest_checkpoint, mark_checkpoint_complete, policy_snapshot_dir,
    policy_snapshots, prune_checkpoints)
from pipeline.run.files import atomic_directory, remove_stale_temporaries, write_json_atomically
from pipeline.run.manifests import MetricsLog, read_manifest, write_manifest


def make_checkpoint(stage_dir, step, complete=True):
    path = stage_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "weights").write_text(str(step))
    if complete:
        mark_checkpoint_complete(path, step)
    return path


def test_latest_ignores_incomplete_and_orders_numerically(tmp_path):
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 11, complete=False)
    (tmp_path / ".tmp-checkpoint-12").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_newest_complete(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 0, complete=False)
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_policy_snapshots_are_listed_by_step_and_never_pruned(tmp_path):
    for step in (40, 20, 100):
        policy_snapshot_dir(tmp_path, step).mkdir()
    (tmp_path / ".tmp-policy-step-60").mkdir()  # a save killed midway
    (tmp_path / "policy-step-x").mkdir()
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 120)
    prune_checkpoints(tmp_path, keep_last=1)
    assert policy_snapshots(tmp_path) == [(20, tmp_path / "policy-step-20"), (40, tmp_path / "policy-step-40"),
                                          (100, tmp_path / "policy-step-100")]
    assert policy_snapshots(tmp_path / "missing") == []


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "final") as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "final") as staging:
        (staging / "whole").write_text("x")
    assert (tmp_path / "final" / "whole").read_text() == "x"
    with atomic_directory(tmp_path / "final") as staging:
        (staging / "newer").write_text("y")
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["newer"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".tmp-checkpoint-3").mkdir()
    (tmp_path / ".tmp-manifest.json.12").write_text("{")
    make_checkpoint(tmp_path, 2)
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / COMPLETE_MARKER).is_file()


def test_manifest_merges_and_records_versions(tmp_path):
    write_manifest(tmp_path, stage="pretrain", status="running")
    write_manifest(tmp_path, status="finished", steps=3)
    manifest = read_manifest(tmp_path)
    assert manifest["stage"] == "pretrain" and manifest["status"] == "finished" and manifest["steps"] == 3
    assert "torch" in manifest["versions"]
    assert read_manifest(tmp_path / "none") is None


def test_metrics_log_cuts_back_to_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, resume_step=None)
    for step in (1, 2, 3):
        log.write(step, {"loss": 1.0 / step})
    with open(path, "a") as handle:
        handle.write('{"step": 4, "lo')  # cut short by a kill
    resumed = MetricsLog(path, resume_step=2)
    assert [m["step"] for m in resumed.read()] == [1, 2]
    MetricsLog(path, resume_step=None)
    assert not path.exists()


def test_write_json_atomically(tmp_path):
    write_json_atomically(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_training_state_is_safetensors_and_loads_with_weights_only(tmp_path, monkeypatch):
    import random

    import torch
    from accelerate import Accelerator

    from pipeline.run.checkpoints import save_training_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    save_training_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep_last=2)
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("pytorch_model*"))
    expected_python_rng = random.getstate()
    expected_torch_rng = torch.get_rng_state()
    random.random(), torch.rand(3)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    accelerator.load_state(str(checkpoint))
    assert loads and all(weights_only is True for weights_only in loads)
    # the RNG states came back too (Accelerate swallows a failed RNG load, which would break exact resume)
    assert random.getstate() == expected_python_rng and torch.equal(torch.get_rng_state(), expected_torch_rng)
