"""Faults the pipeline must survive without losing work: NaN losses, disk full, read-only output, a save cut
short. The long random-kill version is bench/faults.py; tests/pipeline/test_cli.py kills `rlhf run` once."""

import errno
import shutil

import pytest

from pipeline.checkpoints import COMPLETE_MARKER, OutputWriteError, latest_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.faults import NAN_VARIABLE
from pipeline.preflight import check_output_directory
from tests.helpers import SMOKE, assert_identical_weights, environment, run_stage, stage_command


def last_error(result) -> str:
    """The stage's one-line error (progress bars share stderr, with carriage returns)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr[-2000:]
    return lines[-1]


def run_with_nan(stage, step, *overrides):
    import subprocess
    from tests.helpers import REPO
    return subprocess.run(stage_command(stage, *overrides), cwd=REPO, env={**environment(), NAN_VARIABLE: f"{stage}:{step}"},
                          capture_output=True, text=True, timeout=300)


def test_nan_loss_in_pretraining_stops_keeps_the_last_good_checkpoint_and_resumes(tmp_path):
    broken = run_with_nan("pretrain", 13, f"run.output_dir={tmp_path / 'b'}")
    assert broken.returncode == 1
    assert "error: pretrain: loss became nan at step 15;" in last_error(broken)
    stage_dir = tmp_path / "b" / "smoke" / "pretrain"
    assert latest_checkpoint(stage_dir).name == "checkpoint-10" and not (stage_dir / "final").exists()
    resumed = run_stage("pretrain", f"run.output_dir={tmp_path / 'b'}")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout + resumed.stderr
    assert run_stage("pretrain", f"run.output_dir={tmp_path / 'a'}").returncode == 0
    assert_identical_weights(tmp_path / "a" / "smoke" / "pretrain" / "final", stage_dir / "final")


def test_nan_in_sft_leaves_no_poisoned_checkpoint(smoke_run):
    overrides = [f"run.output_dir={smoke_run}", "sft.max_steps=20", "sft.save_steps=5", "sft.logging_steps=5",
                 "sft.eval_steps=100"]
    broken = run_with_nan("sft", 12, *overrides)
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert last_error(broken).startswith("error: sft: ") and "nan" in last_error(broken).lower()
    stage_dir = smoke_run / "smoke" / "sft"
    assert latest_checkpoint(stage_dir).name == "checkpoint-10"
    resumed = run_stage("sft", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (stage_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_nan_in_ppo_stops_before_saving(smoke_run):
    for stage in ("sft", "reward"):
        shutil.copytree(smoke_run / "smoke" / "pretrain" / "final", smoke_run / "smoke" / stage / "final")
    overrides = [f"run.output_dir={smoke_run}", "run.stages=[ppo]", "ppo.per_device_train_batch_size=4"]
    broken = run_with_nan("ppo", 4, *overrides)
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert last_error(broken).startswith("error: ppo: ")
    assert latest_checkpoint(smoke_run / "smoke" / "ppo").name == "checkpoint-3"
    assert run_stage("ppo", *overrides).returncode == 0


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import pipeline.checkpoints as checkpoints
    from stages.pretrain import run_pretraining

    calls = {"n": 0}
    real = checkpoints.fsync_tree

    def fill_up(root):
        calls["n"] += 1
        if calls["n"] == 3:  # tokenizer, checkpoint-10, then checkpoint-20 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real(root)

    monkeypatch.setattr(checkpoints, "fsync_tree", fill_up)
    with pytest.raises(OutputWriteError, match="No space left on device; the previous checkpoints are intact"):
        run_pretraining(load_config(SMOKE, [f"run.output_dir={tmp_path}"]))
    stage_dir = tmp_path / "smoke" / "pretrain"
    assert latest_checkpoint(stage_dir).name == "checkpoint-10"
    assert sorted(p.name for p in stage_dir.iterdir() if p.name.startswith((".tmp", "checkpoint"))) == ["checkpoint-10"]


def test_output_directory_must_be_writable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="run.output_dir: .* is a file, not a directory"):
        check_output_directory(load_config(SMOKE, [f"run.output_dir={tmp_path / 'file' / 'runs'}"]))
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ConfigError, match="run.output_dir: cannot write in .* \\(Read-only file system\\)"):
        check_output_directory(load_config(SMOKE, [f"run.output_dir={tmp_path}"]))


def test_a_save_cut_short_is_never_resumed_from(tmp_path):
    assert run_stage("pretrain", f"run.output_dir={tmp_path / 'a'}").returncode == 0
    stage_dir = tmp_path / "a" / "smoke" / "pretrain"
    shutil.rmtree(stage_dir / "final")
    (stage_dir / "manifest.json").unlink()
    (stage_dir / "checkpoint-30" / COMPLETE_MARKER).unlink()  # as if killed before the marker was written
    (stage_dir / "checkpoint-30" / "model.safetensors").write_bytes(b"truncated")
    (stage_dir / ".tmp-state-40").mkdir()
    resumed = run_stage("pretrain", f"run.output_dir={tmp_path / 'a'}")
    assert resumed.returncode == 0 and "checkpoint-20" in resumed.stdout + resumed.stderr
    assert not (stage_dir / ".tmp-state-40").exists()
    assert run_stage("pretrain", f"run.output_dir={tmp_path / 'b'}").returncode == 0
    assert_identical_weights(tmp_path / "b" / "smoke" / "pretrain" / "final", stage_dir / "final")
