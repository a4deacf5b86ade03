"""pipeline/run/preflight.py: an engine that cannot run here, or a chat template SFT cannot mask, is refused
before anything is written (the bad-input corpus covers FSDP1, ZeRO-3 without gathering, a config that is not
a mapping, and every kind of bad dataset row)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.run.preflight import check_accelerate_config, preflight
from tests.helpers import REPO, SMOKE, environment

MISTRAL_TEMPLATE = REPO / "tests" / "data" / "chat_templates" / "mistral-v0.3-abridged.jinja"


def test_deepspeed_asked_for_but_not_installed_is_refused_with_the_install_command(monkeypatch):
    config = load_config(REPO / "configs" / "smoke.yaml",
                         [f"run.accelerate_config={REPO / 'configs' / 'accelerate' / 'cpu_zero3.yaml'}"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match=r'asks for DeepSpeed, which is not installed; install it with pip install '
                                          r'-e "\.\[deepspeed\]"'):
        check_accelerate_config(config)


@pytest.mark.parametrize("name", ["cpu_ddp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml", "cpu_fsdp2.yaml",
                                  "deepspeed_zero3.yaml", "fsdp.yaml", "multi_node.yaml"])
def test_the_shipped_accelerate_configs_pass(name):
    if "zero" in name and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    check_accelerate_config(load_config(REPO / "configs" / "smoke.yaml",
                                        [f"run.accelerate_config={REPO / 'configs' / 'accelerate' / name}"]))


@pytest.fixture
def mistral_like_model(tiny_causal_lm, tmp_path):
    """The tiny model with Mistral v0.3's template, which moves the system message into the last user turn."""
    from data.tokenizer import load_tokenizer

    model_dir = tmp_path / "mistral-like"
    shutil.copytree(tiny_causal_lm, model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = MISTRAL_TEMPLATE.read_text()
    tokenizer.save_pretrained(model_dir)
    return model_dir


def sft_data(tmp_path, with_system: bool):
    system = [{"role": "system", "content": "Be kind."}] if with_system else []
    rows = [{"messages": [*system, {"role": "user", "content": f"Hi {i}!"}, {"role": "assistant", "content": "Hi!"}]}
            for i in range(4)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_only(tmp_path, model_dir, data, *more):
    return load_config(SMOKE, [f"run.output_dir={tmp_path / 'runs'}", f"model.name_or_path={model_dir}",
                               "run.stages=[sft]", f"data.sft.path={data}", "data.sft.eval_fraction=0.5", *more])


def test_a_template_that_cannot_be_masked_is_refused_by_rlhf_run_before_anything_is_written(mistral_like_model,
                                                                                            tmp_path):
    data = sft_data(tmp_path, with_system=True)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(SMOKE), f"run.output_dir={tmp_path / 'runs'}",
                             f"model.name_or_path={mistral_like_model}", "run.stages=[sft]", f"data.sft.path={data}",
                             "data.sft.eval_fraction=0.5"], cwd=REPO, env=environment(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: sft.assistant_only_loss: the chat template of {mistral_like_model} cannot be masked: ")
    assert "changes earlier turns" in errors[0] and "assistant_only_loss=false" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_the_template_check_reads_the_roles_the_data_has_and_the_setting(mistral_like_model, tmp_path):
    # Without a system message Mistral's template keeps earlier turns: nothing to refuse.
    preflight(sft_only(tmp_path, mistral_like_model, sft_data(tmp_path, with_system=False)))
    with pytest.raises(ConfigError, match="cannot be masked"):
        preflight(sft_only(tmp_path, mistral_like_model, sft_data(tmp_path, with_system=True)))
    # Whole-dialogue training masks nothing, so any template will do.
    preflight(sft_only(tmp_path, mistral_like_model, sft_data(tmp_path, with_system=True),
                       "sft.assistant_only_loss=false"))
    assert not (tmp_path / "runs").exists()
