"""The engine tier: every stage of the smoke preset under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 with 2 processes
on a CPU-only machine, through the command a GPU user types (`rlhf run ... run.accelerate_config=...`), and what
each engine must agree on with DDP. Also two machines of one process each on the loopback address, and a SIGKILLed
run resumed under ZeRO-3 and FSDP2 to the weights of an uninterrupted one. `make test` runs it (marker `engines`);
the DeepSpeed cases skip where DeepSpeed is not installed (pip install -e ".[deepspeed]").

Tolerances: fp32 on one CPU, so DDP and FSDP2/ZeRO-2 differ only in the order of their reductions (measured ~1e-8
relative) and ZeRO-3 in its partitioned all-gathers (~3e-7); the bounds (1e-4 for pretraining, 1e-3 of how far PPO
moved the policy) leave room for other CPUs and library versions, and still catch an engine that trains alone
(no gradient sync: ~1e-1) or draws its samples differently (~1e-2).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO, SMOKE, assert_identical_weights, load_weights

pytestmark = [pytest.mark.engines, pytest.mark.slow]

ACCELERATE = REPO / "configs" / "accelerate"
ENGINES = {"ddp": "cpu_ddp.yaml", "zero2": "cpu_zero2.yaml", "zero3": "cpu_zero3.yaml", "fsdp2": "cpu_fsdp2.yaml"}
STAGES = ("pretrain", "sft", "reward", "ppo")
# Tiny steps: what is tested is that every code path of every stage runs, saves and agrees, not what it learns.
TINY = ["pretrain.max_steps=12", "pretrain.save_steps=3", "pretrain.eval_steps=6", "pretrain.logging_steps=3",
        "sft.max_steps=4", "sft.eval_steps=2", "sft.save_steps=2", "sft.logging_steps=2",
        "reward.max_steps=4", "reward.eval_steps=2", "reward.save_steps=2", "reward.logging_steps=2",
        "reward.normalization_samples=4", "ppo.max_steps=3", "ppo.save_steps=1", "ppo.sample_steps=3"]
# ZeRO-3 and FSDP2 fine-tune with LoRA: their SFT must save full merged weights gathered from the shards.
LORA = ["sft.peft={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}"]


def record(test: str, engine: str, **figures) -> None:
    """Append this test's figures to the file RLHF_ENGINE_FIGURES names (the README's engine table is pasted from
    it, bench/results/*-engines-cpu.jsonl); nothing when it is not set."""
    path = os.environ.get("RLHF_ENGINE_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"date": time.strftime("%Y-%m-%d"), "test": test, "engine": engine, **figures})
                         + "\n")


def needs(engine: str) -> None:
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")


def environment() -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    environment.pop("ACCELERATE_USE_CPU", None)  # as a user's shell has it: rlhf run decides
    return environment


def rlhf_run_command(output_dir: Path, name: str, accelerate_config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(SMOKE), f"run.output_dir={output_dir}",
            f"run.name={name}", f"run.accelerate_config={accelerate_config}", *TINY, *overrides, "--no-report"]


def rlhf_run(output_dir: Path, name: str, engine: str, *overrides: str) -> Path:
    command = rlhf_run_command(output_dir, name, ACCELERATE / ENGINES[engine], *overrides)
    began = time.time()
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{engine}: {result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    stages = [s for s in STAGES if f"run.stages=[{s}]" in overrides] or list(STAGES)
    record("rlhf run", engine, stages=stages, lora_sft=any(o.startswith("sft.peft") for o in overrides),
           wall_s=round(time.time() - began, 1))
    return output_dir / name


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def relative_difference(a: dict, b: dict, start: dict | None = None) -> float:
    """|a − b| / |b − start| over the tensors both hold (start: zeros, i.e. relative to b's size)."""
    keys = sorted(set(a) & set(b))
    apart = torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys]).norm()
    scale = torch.cat([(b[k].float() - (start[k].float() if start else 0)).flatten() for k in keys]).norm()
    return (apart / scale).item()


def final_weights(run_dir: Path, stage: str) -> dict:
    return load_weights(run_dir / stage / "final")


def assert_loads_with_plain_transformers(final_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForSequenceClassification if final_dir.parent.name == "reward" else AutoModelForCausalLM
    model = loader.from_pretrained(final_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters()), final_dir
    assert not any("lora" in name for name, _ in model.named_parameters()), f"{final_dir}: adapter not merged"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The whole smoke preset under an engine, run once for the module: `full_run("zero3")` (ZeRO-3 and FSDP2 with
    LoRA SFT)."""
    runs: dict[str, Path] = {}

    def run(engine: str) -> Path:
        needs(engine)
        if engine not in runs:
            runs[engine] = rlhf_run(tmp_path_factory.mktemp("engines"), engine, engine,
                                    *(LORA if engine in ("zero3", "fsdp2") else []))
        return runs[engine]
    return run


@pytest.fixture(scope="module")
def ddp_run(full_run) -> Path:
    """The smoke preset under DDP on 2 processes: what every other engine is compared with."""
    return full_run("ddp")


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_every_stage_runs_under_the_engine_asked_for_and_pretraining_agrees_with_ddp(engine, ddp_run, full_run):
    """The whole pipeline under the engine, every manifest naming it (2 processes, fp32); every final model loads
    with plain transformers (SFT's LoRA adapter merged under ZeRO-3 and FSDP2); pretraining's final weights within
    1e-4 of DDP's."""
    run_dir = full_run(engine)
    for stage in STAGES:
        assert manifest(run_dir, stage)["engine"] == {"engine": engine, "processes": 2, "mixed_precision": "no"}
        assert_loads_with_plain_transformers(run_dir / stage / "final")
    difference = relative_difference(final_weights(run_dir, "pretrain"), final_weights(ddp_run, "pretrain"))
    record("pretraining vs DDP, |w - w_ddp| / |w_ddp|", engine, value=difference)
    assert difference < 1e-4, difference
    assert manifest(ddp_run, "ppo")["engine"]["engine"] == "ddp"


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_ppo_from_the_same_sft_and_reward_models_agrees_with_ddp(engine, ddp_run, tmp_path):
    """PPO alone, from a copy of the DDP run's SFT and reward models: the final policy within 1e-3 of how far
    DDP's PPO moved it from the SFT policy, and the same per-step metrics (re-seeded after the models are built,
    globally whitened advantages: the engines draw and normalise alike)."""
    needs(engine)
    shutil.copytree(ddp_run, tmp_path / engine)
    shutil.rmtree(tmp_path / engine / "ppo")
    run_dir = rlhf_run(tmp_path, engine, engine, "run.stages=[ppo]")
    assert manifest(run_dir, "ppo")["engine"]["engine"] == engine
    difference = relative_difference(final_weights(run_dir, "ppo"), final_weights(ddp_run, "ppo"),
                                     start=final_weights(ddp_run, "sft"))
    record("PPO vs DDP from the same SFT/reward, |w - w_ddp| / |w_ddp - w_sft|", engine, value=difference)
    assert difference < 1e-3, difference
    ours, theirs = ([json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
                    for run in (run_dir, ddp_run))
    assert [m["objective/kl"] for m in ours] == pytest.approx([m["objective/kl"] for m in theirs], rel=1e-3, abs=1e-5)


def test_a_stage_that_does_not_get_the_launched_engine_stops_before_writing_anything(tmp_path):
    """A launch asking for FSDP2 that Accelerate runs as a plain single process (what it does with one process, or
    on CPU without pipeline/train/engine_launch.py): the stage refuses with one line, exit 2, and writes nothing. (`rlhf
    run` refuses that config earlier, in preflight: tests/bad_inputs.)"""
    command = [sys.executable, "-m", "stages.pretrain", "--config", str(SMOKE), f"run.output_dir={tmp_path / 'runs'}"]
    launched_as = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "1"}
    result = subprocess.run(command, cwd=REPO, env={**environment(), **launched_as}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: pretrain: run.accelerate_config asked for fsdp2 on 1 process(es), mixed precision no, but Accelerate "
        "runs single on 1 process(es), mixed precision no; nothing was trained (check the launch config and the "
        "installed accelerate/deepspeed)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_two_machines_on_the_loopback_address_train_as_one_machine_of_two_processes(engine, full_run, tmp_path):
    """configs/accelerate/multi_node*.yaml's path, as two machines of one process each on 127.0.0.1 (the same
    `rlhf run` on each, run.machine_rank 0 and 1, one run directory as shared storage): every stage ends with the
    weights the same engine gives with 2 processes on one machine."""
    needs(engine)
    source = "multi_node.yaml" if engine == "ddp" else "multi_node_zero3.yaml"
    settings = yaml.safe_load((ACCELERATE / source).read_text())
    settings.update(num_processes=2, main_process_ip="127.0.0.1", main_process_port=29581 + (engine == "zero3"),
                    mixed_precision="no")
    settings.pop("gpu_ids", None)
    accelerate_config = tmp_path / source
    accelerate_config.write_text(yaml.safe_dump(settings))
    overrides = LORA if engine == "zero3" else []
    machines = [subprocess.Popen(rlhf_run_command(tmp_path, "two_machines", accelerate_config, *overrides,
                                                  f"run.machine_rank={rank}"),
                                 cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    one_machine = full_run(engine)
    for stage in STAGES:
        assert manifest(tmp_path / "two_machines", stage)["engine"]["engine"] == engine
        difference = relative_difference(final_weights(tmp_path / "two_machines", stage),
                                         final_weights(one_machine, stage))
        record(f"two machines vs one, {stage}, |w - w_one| / |w_one|", engine, value=difference)
        assert difference < 1e-6, (stage, difference)


def kill_process_tree(root: int) -> None:
    """SIGKILL `root` and every process descended from it (torchrun starts its workers in sessions of their own,
    so a process-group kill would leave them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    pending, tree = [root], []
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_run_killed_mid_pretraining_and_mid_ppo_resumes_to_the_weights_of_an_uninterrupted_one(engine, full_run,
                                                                                               tmp_path):
    """`rlhf run` and all its processes SIGKILLed in pretraining (step 8 of 12, newest checkpoint 6) and in PPO
    (step 3 of 3, newest checkpoint 2), then run again: each stage resumes from its checkpoint, sharded optimizer
    states and per-process RNG included, and every final model is bit-identical to the uninterrupted run's."""
    overrides = LORA
    reference = full_run(engine)
    for stage, step in (("pretrain", 8), ("ppo", 2)):
        halted = tmp_path / f"halted-{stage}"
        process = subprocess.Popen(rlhf_run_command(tmp_path, engine, ACCELERATE / ENGINES[engine], *overrides),
                                   cwd=REPO, env={**environment(), "RLHF_HALT_AT": f"{stage}:{step}",
                                                  "RLHF_HALT_FILE": str(halted)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not halted.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert halted.exists(), f"{stage}: the run never reached step {step}: {process.stderr.read()[-3000:]}"
        kill_process_tree(process.pid)
        process.wait()
        assert not (tmp_path / engine / stage / "final").exists()
    resumed = rlhf_run(tmp_path, engine, engine, *overrides)
    for stage in STAGES:
        assert_identical_weights(reference / stage / "final", resumed / stage / "final")
    record("killed in pretraining and PPO, resumed: final weights bit-identical", engine, value=True)
