"""Every stage, and PPO's invariants, under each engine of configs/accelerate/ on the GPUs present: one GPU (or
DDP over several), FSDP2, DeepSpeed ZeRO-2 and ZeRO-3. Skipped without CUDA, the DeepSpeed ones without deepspeed
installed. bench/gpu_check.sh runs them and tabulates the outcome.

Each engine runs through `rlhf run` with a copy of its Accelerate config whose num_processes is the number of GPUs
(the files say 8; on one GPU that is `accelerate launch --num_processes 1` with that file). What is checked:
- every stage of the smoke preset finishes and writes a final model that plain transformers loads, finite;
- the same with SmolLM2-135M where `make smollm2` has converted it into models/ (LoRA SFT, reward and PPO);
- PPO's first minibatch (one epoch of one minibatch, one step): KL to the reference 0, ratio 1, nothing clipped;
- the same short pretraining and PPO run under DDP and under ZeRO-3 end with weights that differ by a small share
  of how far training moved them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO, SMOKE, load_weights

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.slow]

GPUS = torch.cuda.device_count()
ENGINES = {"ddp": "single_gpu.yaml" if GPUS <= 1 else "multi_gpu.yaml", "fsdp2": "fsdp.yaml",
           "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
STAGES = ("pretrain", "sft", "reward", "ppo")


def skip_without_engine(engine: str) -> None:
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    if engine == "fsdp2" and GPUS < 2:
        # Accelerate runs an FSDP config on one process as a plain single process; the stages refuse it
        # (pipeline/train/engine_launch.py). The CPU engine tier (tests/engines/) runs FSDP2 on 2 processes.
        pytest.skip("FSDP2 needs at least 2 processes: one GPU here")


def accelerate_config(engine: str, directory: Path) -> Path:
    """configs/accelerate/<the engine's file> with num_processes set to the GPUs present."""
    source = REPO / "configs" / "accelerate" / ENGINES[engine]
    settings = yaml.safe_load(source.read_text(encoding="utf-8"))
    if settings["distributed_type"] != "NO":
        settings["num_processes"] = GPUS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ENGINES[engine]
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def rlhf_run(output_dir: Path, engine: str, *overrides: str, config: Path = SMOKE, timeout: float = 1800
             ) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    environment.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), f"run.output_dir={output_dir}",
               f"run.accelerate_config={accelerate_config(engine, output_dir / 'accelerate')}", *overrides,
               "--no-report"]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{engine}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def assert_finished_with_finite_weights(stage_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished", stage_dir
    weights = load_weights(stage_dir / "final")
    assert weights and all(torch.isfinite(w.float()).all() for w in weights.values()), stage_dir
    if stage_dir.name != "reward":
        AutoModelForCausalLM.from_pretrained(stage_dir / "final")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_stage_of_the_smoke_preset_runs_under(engine, tmp_path):
    skip_without_engine(engine)
    rlhf_run(tmp_path, engine)
    for stage in STAGES:
        assert_finished_with_finite_weights(tmp_path / "smoke" / stage)
    metrics = [json.loads(line) for line in (tmp_path / "smoke" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and all(torch.isfinite(torch.tensor(m["objective/kl"])) for m in metrics)


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                    reason="models/SmolLM2-135M-Instruct absent (make smollm2)")
@pytest.mark.parametrize("engine", ENGINES)
def test_smollm2_stages_run_under(engine, tmp_path):
    skip_without_engine(engine)
    rlhf_run(tmp_path, engine, config=REPO / "configs" / "smollm2.yaml")
    for stage in ("sft", "ppo"):
        assert_finished_with_finite_weights(tmp_path / "smollm2" / stage)


@pytest.fixture(scope="module")
def smoke_through_reward(tmp_path_factory) -> Path:
    """Pretrain, SFT and reward of the smoke preset on one GPU, for PPO runs under each engine to start from."""
    root = tmp_path_factory.mktemp("gpu_smoke")
    rlhf_run(root, "ddp", "run.stages=[pretrain,sft,reward]")
    return root


def copy_of(run: Path, directory: Path) -> Path:
    shutil.copytree(run / "smoke", directory / "smoke")
    return directory


@pytest.mark.parametrize("precision, kl_tolerance, ratio_tolerance", [("fp32", 1e-6, 1e-5), ("bf16", 1e-4, 2e-2)])
@pytest.mark.parametrize("engine", ENGINES)
def test_ppo_first_minibatch_has_kl_zero_and_ratio_one_under(engine, precision, kl_tolerance, ratio_tolerance,
                                                             smoke_through_reward, tmp_path):
    """One PPO step of one epoch of one minibatch: what step 1 logs is the first minibatch's. The policy is the
    reference and the sampler, so KL is 0 and the ratio 1 (exactly in fp32 up to kernel differences between the
    scoring and training batch shapes; bf16 rounds those differently)."""
    skip_without_engine(engine)
    run = copy_of(smoke_through_reward, tmp_path)
    rlhf_run(run, engine, "run.stages=[ppo]", "ppo.max_steps=1", "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=1",
             "ppo.save_steps=1", f"ppo.bf16={'true' if precision == 'bf16' else 'false'}")
    first = json.loads((run / "smoke" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert abs(first["objective/kl"]) <= kl_tolerance, first
    assert abs(first["val/ratio"] - 1) <= ratio_tolerance, first
    assert first["policy/approxkl_avg"] <= ratio_tolerance ** 2, first
    assert first["policy/clipfrac_avg"] == 0.0, first


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
                        ) -> float:
    """|a − b| over |a − start|, over all tensors: how much two runs disagree, as a share of how far they moved."""
    keys = sorted(set(a) & set(start))
    assert keys and set(a) == set(b)
    apart = torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys]).norm()
    moved = torch.cat([(a[k].float() - start[k].float()).flatten() for k in keys]).norm()
    assert moved > 0
    return (apart / moved).item()


def test_final_weights_of_the_same_short_run_under_ddp_and_zero3_are_close(smoke_through_reward, tmp_path):
    """fp32, same seed and data order: DeepSpeed's clipping and AdamW on flat partitions against torch's. The
    pretrained model is compared from its random start (the config's seed), the PPO policy from the SFT policy.
    PPO re-seeds after building its models (ZeRO-3's partitioned build draws other random numbers), so both
    engines sample alike: on 2 CPU processes they agree within 3e-7 (tests/engines/)."""
    from data.tokenizer import load_tokenizer
    from pipeline.config.loading import load_config
    from pipeline.train.models import build_llama_from_config

    skip_without_engine("zero3")
    finals = {}
    for engine in ("ddp", "zero3"):
        run = copy_of(smoke_through_reward, tmp_path / engine)
        shutil.rmtree(run / "smoke" / "pretrain")
        rlhf_run(run, engine, "run.stages=[pretrain]", "pretrain.max_steps=10", "pretrain.save_steps=10",
                 "pretrain.bf16=false", "run.keep_last_checkpoints=1")
        finals[f"pretrain {engine}"] = load_weights(run / "smoke" / "pretrain" / "final")
        run = copy_of(smoke_through_reward, tmp_path / f"ppo-{engine}")
        rlhf_run(run, engine, "run.stages=[ppo]", "ppo.max_steps=2", "ppo.save_steps=2", "ppo.bf16=false")
        finals[f"ppo {engine}"] = load_weights(run / "smoke" / "ppo" / "final")
    config = load_config(SMOKE)
    tokenizer = load_tokenizer(smoke_through_reward / "smoke" / "tokenizer")
    initial = build_llama_from_config(config.model, tokenizer, config.run.seed).state_dict()
    sft = load_weights(smoke_through_reward / "smoke" / "sft" / "final")
    assert relative_difference(finals["pretrain ddp"], finals["pretrain zero3"], initial) < 0.05
    assert relative_difference(finals["ppo ddp"], finals["ppo zero3"], sft) < 0.05
