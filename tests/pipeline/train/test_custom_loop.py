"""pipeline/train/custom_loop.py: the skeleton pretraining and PPO share, driven by a toy loop."""

import torch

from pipeline.config.loading import load_config
from pipeline.run.manifests import read_manifest
from pipeline.train.custom_loop import CustomLoop
from tests.helpers import SMOKE


def toy_run(config, steps_before_stop: int | None = None):
    """A loop of "training" steps that scale a weight; returns (loop, weight, last step)."""
    loop = CustomLoop(config, "pretrain", config.pretrain)
    if loop.already_finished:
        return loop, None, None
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = loop.accelerator.prepare(model, optimizer)
    step, state = loop.resume()
    log = loop.begin(max_steps=config.pretrain.max_steps, parameters=6)
    while step < config.pretrain.max_steps:
        if step == steps_before_stop:
            return loop, model, step
        with torch.no_grad():
            model.weight.mul_(2.0)
        step += 1
        log.write(step, {"loss": float(step)})
        if loop.checkpoint_due(step):
            loop.save_checkpoint(step, {"note": f"at {step}"})
    (loop.final_dir).mkdir(parents=True)
    return loop.finish(step, metrics={"train_loss": float(step)}), model, step


def test_a_stopped_loop_resumes_from_its_checkpoint_and_a_finished_one_is_skipped(tmp_path):
    config = load_config(SMOKE, [f"run.output_dir={tmp_path}", "pretrain.max_steps=5", "pretrain.save_steps=2"])
    loop, model, step = toy_run(config, steps_before_stop=3)
    manifest = read_manifest(loop.stage_dir)
    assert manifest["status"] == "running" and manifest["parameters"] == 6 and "config" in manifest  # identity
    assert sorted(p.name for p in loop.stage_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    weight_at_2 = model.weight.detach() / 2  # step 3 doubled it once more

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = CustomLoop(config, "pretrain", config.pretrain)
    model = resumed.accelerator.prepare(torch.nn.Linear(2, 2))
    step, state = resumed.resume()
    assert (step, state["note"], resumed.first_step) == (2, "at 2", 2) and state["elapsed_s"] >= 0
    assert torch.equal(model.weight.detach(), weight_at_2)
    log = resumed.begin(max_steps=5)
    assert [entry["step"] for entry in log.read()] == [1, 2]  # step 3's line, written after the checkpoint, cut

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    final, _, last = toy_run(config)
    assert last == 5 and final == tmp_path / "smoke" / "pretrain" / "final"
    manifest = read_manifest(final.parent)
    assert manifest["status"] == "finished" and manifest["steps"] == 5 and manifest["metrics"]["train_loss"] == 5.0
    assert sorted(p.name for p in final.parent.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    again, model, _ = toy_run(config)
    assert again.already_finished and model is None
