"""The run's plan: the presets fit, a run that cannot fit is refused in one line (by `rlhf run` before it writes
anything), `rlhf plan` prints the table, and the knobs it suggests fit when recomputed."""

import pytest

from pipeline.cli.main import main
from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.plan.hardware import GIB, Hardware, format_bytes
from pipeline.plan.memory_plan import check_run_fits, config_with_overrides, format_plan, knobs_that_fit, plan_run
from pipeline.plan.model_shape import model_shape
from pipeline.plan.stage_estimates import stage_estimate
from tests.helpers import REPO, SMOKE
from tests.pipeline.plan.memory_plan_examples import BIG, CPU, gpus, smoke


def test_smoke_and_default_presets_fit_this_machine():
    for preset in ("smoke", "default"):
        config = load_config(REPO / "configs" / f"{preset}.yaml")
        check_run_fits(config)
        check_run_fits(config, Hardware("cpu", 1, 24 * GIB))  # a CI machine of this size
        assert all(plan.fits for plan in plan_run(config, Hardware("cpu", 2, 8 * GIB)))


def test_a_run_that_cannot_fit_is_refused_in_one_line():
    config = smoke(*BIG)
    with pytest.raises(ConfigError) as refusal:
        check_run_fits(config, gpus(1, 8))
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("pretrain: needs ") and "more than the 6.3 GiB usable" in message
    with pytest.raises(ConfigError, match=r"^pretrain: needs .* GiB RAM available"):
        check_run_fits(config, Hardware("cpu", 1, 8 * GIB))


def test_rlhf_plan_prints_the_table_and_exits_1_when_a_stage_does_not_fit(capsys):
    assert main(["plan", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Planning for CPU, 1 process") and out.count(" yes") == 4
    assert main(["plan", str(SMOKE), *BIG, "--gpus", "2", "--gpu-memory", "24"]) == 1
    out = capsys.readouterr().out
    assert "pretrain does not fit" in out and "zero3 on 2 GPUs → " in out and "(--engine zero3)" in out
    assert main(["plan", str(SMOKE), "--gpus", "0", "--gpu-memory", "24"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus: must be at least 1, got 0"


def test_rlhf_run_refuses_before_writing_anything(tmp_path, capsys):
    # 24 layers of width 8192: ~20B parameters, 320 GB of weights and AdamW states, on no machine's RAM
    huge = ["model.num_hidden_layers=24", "model.hidden_size=8192", "model.intermediate_size=22016",
            "model.num_attention_heads=64"]
    assert main(["run", str(SMOKE), f"run.output_dir={tmp_path}", *huge]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: pretrain: needs ") and "\n" not in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage, hardware", [
    ("pretrain", gpus(2, 24)), ("sft", gpus(2, 24)), ("sft", gpus(1, 12)), ("reward", gpus(1, 24)),
    ("ppo", gpus(1, 40)), ("ppo", gpus(2, 64)), ("sft", Hardware("cpu", 1, 12 * GIB))])
def test_suggested_knobs_fit_when_recomputed(stage, hardware):
    config = smoke(*BIG, "sft.max_length=256", "reward.max_length=256")
    shape = model_shape(config)
    assert stage_estimate(config, stage, hardware, shape).total > hardware.usable_bytes
    knobs = knobs_that_fit(config, stage, hardware, shape)
    assert knobs, f"no knob for {stage} on {hardware}"
    for knob in knobs:
        changed = config_with_overrides(config, knob.overrides)
        on = Hardware(hardware.kind, knob.devices or hardware.devices, hardware.memory_bytes,
                      knob.engine or hardware.engine)
        recomputed = stage_estimate(changed, stage, on, shape)
        assert recomputed.total == knob.total <= on.usable_bytes, knob.describe()


def test_micro_batch_knob_keeps_the_effective_batch():
    config = smoke(*BIG)
    knobs = knobs_that_fit(config, "sft", gpus(1, 32), model_shape(config))
    (micro,) = [k for k in knobs if k.label.startswith("sft.per_device_train_batch_size")]
    before, after = config.sft, config_with_overrides(config, micro.overrides).sft
    assert after["per_device_train_batch_size"] < before["per_device_train_batch_size"]
    assert (after["per_device_train_batch_size"] * after["gradient_accumulation_steps"]
            == before["per_device_train_batch_size"] * (before.get("gradient_accumulation_steps") or 1))


def test_format_plan_and_bytes():
    assert (format_bytes(3 * GIB // 2), format_bytes(5 * 1024 ** 2), format_bytes(2048)) == ("1.5 GiB", "5 MiB", "2 KiB")
    config = smoke()
    text = format_plan(plan_run(config, CPU), CPU)
    header = text.splitlines()[1].split()
    assert header[:3] == ["stage", "peak", "at"] and header[-2:] == ["total", "fits"]
    assert "ppo: policy 133k trainable + critic 134k trainable + reference 133k + reward 134k" in text
