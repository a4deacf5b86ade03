"""Faults the pipeline must survive without losing work: NaN losses and gradients, disk full, read-only output, a
save cut short. The long random-kill version is bench/faults.py; tests/pipeline/cli/test_cli.py kills `rlhf run` once."""

import errno
import shutil

import pytest

from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.run.checkpoints import COMPLETE_MARKER, latest_checkpoint
from pipeline.run.files import OutputWriteError
from pipeline.run.preflight import check_output_directory
from pipeline.train.guards import require_finite_gradient_norms, require_finite_weights
from tests.faults.injection import NAN_GRADIENT_VARIABLE, NAN_VARIABLE, poison_gradients_if_requested
from tests.helpers import SMOKE, assert_identical_weights, environment, run_stage, stage_command


def last_error(result) -> str:
    """The stage's one-line error (progress bars share stderr, with carriage returns)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr[-2000:]
    return lines[-1]


def run_with_nan(stage, step, *overrides, variable=NAN_VARIABLE):
    import subprocess

    from tests.helpers import REPO
    return subprocess.run(stage_command(stage, *overrides), cwd=REPO, env={**environment(), variable: f"{stage}:{step}"},
                          capture_output=True, text=True, timeout=300)


def stand_in_for_sft_and_reward(run) -> None:
    """The pretrained smoke model as the finished SFT and reward stages' output, for PPO to start from."""
    from pipeline.run.manifests import write_manifest

    for stage in ("sft", "reward"):
        shutil.copytree(run / "smoke" / "pretrain" / "final", run / "smoke" / stage / "final")
        write_manifest(run / "smoke" / stage, stage=stage, status="finished")


def assert_finite_checkpoint(checkpoint) -> None:
    """Every tensor of every safetensors file of a checkpoint (Accelerate's state, and an HF model/ inside) is finite."""
    import torch
    from safetensors.torch import load_file

    files = sorted(checkpoint.rglob("*.safetensors"))
    assert files, f"no weights in {checkpoint}"
    for path in files:
        bad = [name for name, tensor in load_file(str(path)).items() if not torch.isfinite(tensor).all()]
        assert not bad, f"{path}: non-finite {bad[:3]}"


def test_finite_guards_name_the_model_and_the_step(monkeypatch):
    import torch
    from accelerate import Accelerator

    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    monkeypatch.setenv(NAN_GRADIENT_VARIABLE, "pretrain:4")
    poison_gradients_if_requested("pretrain", 3, model)  # another step: nothing happens
    poison_gradients_if_requested("ppo", 4, model)  # another stage: nothing happens
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    poison_gradients_if_requested("pretrain", 4, model)
    assert torch.isnan(model.weight.grad).all() and torch.isfinite(model.weight).all()

    require_finite_gradient_norms({"policy": torch.tensor(3.0), "critic": 1.0}, "ppo", 5, "ppo.learning_rate")
    with pytest.raises(FloatingPointError, match=r"^ppo: the gradient norm of the critic became inf at step 5; the "
                                                 r"optimizer step was skipped .*\(lower ppo.learning_rate and resume\)$"):
        require_finite_gradient_norms({"policy": torch.tensor(3.0), "critic": torch.tensor(float("inf"))}, "ppo", 5,
                                      "ppo.learning_rate")
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    try:
        require_finite_weights({"model": model}, "pretrain", 7, accelerator)
        with torch.no_grad():
            model.bias[1] = float("nan")
        with pytest.raises(FloatingPointError, match=r"^pretrain: the model's weights are not finite at step 7; "
                                                     r"nothing was saved"):
            require_finite_weights({"other": torch.nn.Linear(2, 2), "model": model}, "pretrain", 7, accelerator)
    finally:  # Accelerate's state is process-wide; the stages run in-process later build their own
        AcceleratorState._reset_state(reset_partial_state=True)


def test_nan_gradient_in_pretraining_skips_the_step_and_saves_nothing(tmp_path):
    """A NaN gradient at the step that ends on a save (20) leaves a finite loss: only the gradient norm can stop
    the optimizer from writing NaN weights that checkpoint-20 would keep."""
    broken = run_with_nan("pretrain", 19, f"run.output_dir={tmp_path}", variable=NAN_GRADIENT_VARIABLE)
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert last_error(broken).startswith("error: pretrain: the gradient norm of the model became nan at step 20; "
                                         "the optimizer step was skipped")
    stage_dir = tmp_path / "smoke" / "pretrain"
    assert latest_checkpoint(stage_dir).name == "checkpoint-10"
    assert not (stage_dir / "checkpoint-20").exists() and not (stage_dir / "final").exists()
    assert_finite_checkpoint(stage_dir / "checkpoint-10")


def test_nan_loss_in_pretraining_stops_keeps_the_last_good_checkpoint_and_resumes(tmp_path):
    broken = run_with_nan("pretrain", 13, f"run.output_dir={tmp_path / 'b'}")
    assert broken.returncode == 1
    assert "error: pretrain: the gradient norm of the model became nan at step 14;" in last_error(broken)
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
    stand_in_for_sft_and_reward(smoke_run)
    overrides = [f"run.output_dir={smoke_run}", "run.stages=[ppo]", "ppo.per_device_train_batch_size=4"]
    broken = run_with_nan("ppo", 4, *overrides)
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert last_error(broken).startswith("error: ppo: ")
    assert latest_checkpoint(smoke_run / "smoke" / "ppo").name == "checkpoint-3"
    assert run_stage("ppo", *overrides).returncode == 0


@pytest.mark.slow
def test_nan_gradient_in_ppo_skips_the_step_and_saves_nothing(smoke_run):
    """A NaN gradient in the last step (6, which ends on a checkpoint and the final save): the losses stay finite,
    the gradient norm stops the run, checkpoint-3 stays the newest, with finite weights, and nothing is final."""
    stand_in_for_sft_and_reward(smoke_run)
    overrides = [f"run.output_dir={smoke_run}", "run.stages=[ppo]", "ppo.per_device_train_batch_size=4"]
    broken = run_with_nan("ppo", 5, *overrides, variable=NAN_GRADIENT_VARIABLE)
    assert broken.returncode == 1, broken.stderr[-2000:]
    # One norm for policy and critic together: they train as one model (pipeline/train/engines.py PolicyAndValue).
    assert last_error(broken).startswith("error: ppo: the gradient norm of the policy and critic became nan at step "
                                         "6; the optimizer step was skipped")
    stage_dir = smoke_run / "smoke" / "ppo"
    assert latest_checkpoint(stage_dir).name == "checkpoint-3"
    assert not (stage_dir / "checkpoint-6").exists() and not (stage_dir / "final").exists()
    assert_finite_checkpoint(stage_dir / "checkpoint-3")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import pipeline.run.files as checkpoints

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


def test_fault_points_do_nothing_unless_the_hooks_module_is_named(monkeypatch):
    import torch

    from pipeline.train.guards import FAULT_HOOKS_VARIABLE, fault_point

    model = torch.nn.Linear(2, 2)
    monkeypatch.setenv(NAN_VARIABLE, "pretrain:3")
    monkeypatch.delenv(FAULT_HOOKS_VARIABLE, raising=False)
    fault_point("update", "pretrain", 3, model)  # production: no hooks module, no fault
    assert torch.isfinite(model.weight).all()
    monkeypatch.setenv(FAULT_HOOKS_VARIABLE, "tests.faults.injection")
    fault_point("update", "pretrain", 2, model)  # another step
    assert torch.isfinite(model.weight).all()
    fault_point("update", "pretrain", 3, model)
    assert torch.isnan(model.weight).all()
    with pytest.raises(ValueError, match="unknown fault point 'elsewhere'"):
        fault_point("elsewhere", "pretrain", 3, model)
