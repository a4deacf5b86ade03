import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.cli.main import main
from pipeline.run.launch import run_directory_lock, stage_status
from tests.helpers import REPO, SMOKE, assert_identical_weights, environment


def rlhf(*arguments, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *arguments], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    assert main(["run", str(SMOKE), f"run.output_dir={tmp_path}", "ppo.cliprange=2"]) == 2
    assert capsys.readouterr().err.strip() == "error: ppo.cliprange: must be within (0, 1), got 2.0"
    assert not any(tmp_path.iterdir())


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, capsys):
    with run_directory_lock(tmp_path / "smoke"):
        assert main(["run", str(SMOKE), f"run.output_dir={tmp_path}"]) == 2
    assert "is in use by rlhf run (pid" in capsys.readouterr().err


def test_status_of_stages(smoke_run, capsys):
    assert main(["status", str(smoke_run / "smoke")]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["pretrain"].startswith("done") and lines["sft"] == "pending"
    assert lines["pretrain"].endswith("on single × 1")  # the engine the stage recorded it trained on
    (smoke_run / "smoke" / "sft").mkdir()
    (smoke_run / "smoke" / "sft" / "manifest.json").write_text(json.dumps({"status": "running", "max_steps": 40}))
    assert stage_status(smoke_run / "smoke", "sft") == "in progress step 0 of 40 (newest complete checkpoint)"
    assert main(["status", str(smoke_run / "nothing")]) == 2


def test_generate_and_compare_two_checkpoints(smoke_run, capsys):
    final = str(smoke_run / "smoke" / "pretrain" / "final")
    assert main(["generate", final, "--prompt", "Write a short story about Mia.", "--greedy", "--max-new-tokens", "8",
                 "--compare", final]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Write a short story about Mia.")
    first, second = [line for line in out.splitlines() if line.startswith("[")]
    assert first.split("] ", 1)[1] == second.split("] ", 1)[1]  # greedy: the same model answers the same
    assert main(["generate", final, "--prompt", "x", "--top-p", "0"]) == 2


def test_chat_keeps_the_conversation(smoke_run, capsys):
    from argparse import Namespace

    from pipeline.cli.generate import chat_command
    said = iter(["Hello", "Tell me more", ""])
    arguments = Namespace(checkpoint=str(smoke_run / "smoke" / "pretrain" / "final"), greedy=False, temperature=0.7,
                          top_k=5, top_p=0.9, max_new_tokens=6, seed=0, docs=None)
    assert chat_command(arguments, read=lambda prompt: next(said)) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


@pytest.mark.slow
def test_run_end_to_end_then_skip_finished_stages(tmp_path):
    result = rlhf("run", str(SMOKE), f"run.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (tmp_path / "smoke" / stage / "final" / "model.safetensors").is_file()
    report = tmp_path / "smoke" / "report"
    assert (report / "index.html").is_file() and json.loads((report / "report.json").read_text())["win_rates"]["gold"]
    assert "PPO beats SFT on the hidden gold judge in" in result.stdout
    again = rlhf("run", str(SMOKE), f"run.output_dir={tmp_path}", "--no-report")
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4
    changed = rlhf("run", str(SMOKE), f"run.output_dir={tmp_path}", "ppo.kl_coef=0.1")
    assert changed.returncode == 2 and "config changed" in changed.stderr and "--restart ppo" in changed.stderr
    # A new SFT policy makes the reward model and PPO trained from the old one stale: both run again.
    retrained = rlhf("run", str(SMOKE), f"run.output_dir={tmp_path}", "sft.max_steps=20", "--restart", "sft",
                     "--no-report")
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert "pretrain: finished earlier, skipped" in retrained.stdout
    for stage in ("sft", "reward", "ppo"):
        assert f"==== {stage}: starting over, earlier outputs kept in" in retrained.stdout, stage
    assert "[reward] stale: sft changed since it was read" in retrained.stdout
    stale = sorted(p.name.split("-")[0] for p in (tmp_path / "smoke" / "stale").iterdir())
    assert stale == ["ppo", "reward", "sft"]
    assert all(line.split()[1] == "done" for line in rlhf("status", str(tmp_path / "smoke")).stdout.splitlines())


def metrics_reached(stage_dir, step):
    path = stage_dir / "metrics.jsonl"
    return path.is_file() and any(json.loads(line).get("step", 0) >= step
                                  for line in path.read_text().splitlines() if line.strip().endswith("}"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """`rlhf run` (the whole process group) SIGKILLed once inside every stage: pretraining, SFT and the reward
    model just after a checkpoint, PPO in the middle of a step (its step 4 logged, step 5 under way); each
    restart resumes, and every stage's final weights equal those of an uninterrupted run."""
    reference = rlhf("run", str(SMOKE), f"run.output_dir={tmp_path / 'a'}", "--no-report")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "b" / "smoke"
    kill_points = {
        "pretrain": lambda: (run_dir / "pretrain" / "checkpoint-10" / "checkpoint_complete.json").is_file(),
        "sft": lambda: (run_dir / "sft" / "checkpoint-20" / "checkpoint_complete.json").is_file(),
        "reward": lambda: (run_dir / "reward" / "checkpoint-10" / "checkpoint_complete.json").is_file(),
        "ppo": lambda: metrics_reached(run_dir / "ppo", 4),
    }
    for stage, reached in kill_points.items():
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(SMOKE),
                                    f"run.output_dir={tmp_path / 'b'}", "--no-report"], cwd=REPO, env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 300
        while not reached() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, f"the run ended before the kill point in {stage}: {process.stderr.read()[-2000:]}"
        os.killpg(process.pid, 9)  # rlhf run and the stage it launched
        process.wait()
        assert not (run_dir / stage / "final").exists(), f"{stage} finished before it was killed"
    status = rlhf("status", str(run_dir))
    assert "ppo       in progress step 3 of 6" in status.stdout, status.stdout
    resumed = rlhf("run", str(SMOKE), f"run.output_dir={tmp_path / 'b'}", "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ppo: resuming from checkpoint-3" in resumed.stdout
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert_identical_weights(tmp_path / "a" / "smoke" / stage / "final", tmp_path / "b" / "smoke" / stage / "final")
    assert (run_dir / "ppo" / "metrics.jsonl").read_text() == (tmp_path / "a" / "smoke" / "ppo" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_sft_reward_and_ppo_with_two_processes(smoke_run):
    """DDP over gloo: `rlhf run` with the two-process CPU Accelerate config."""
    result = rlhf("run", str(SMOKE), f"run.output_dir={smoke_run}", "run.stages=[sft,reward,ppo]",
                  "run.accelerate_config=configs/accelerate/cpu_ddp.yaml", "sft.max_steps=10",
                  "reward.max_steps=4", "ppo.max_steps=2", "ppo.save_steps=2", "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[ppo] run" in result.stdout and "on 2 process(es)" in result.stdout
    for stage in ("sft", "reward", "ppo"):
        assert (smoke_run / "smoke" / stage / "final" / "model.safetensors").is_file()
    assert (smoke_run / "smoke" / "ppo" / "checkpoint-2" / "random_states_1.pkl").is_file()  # one RNG state per rank
