"""The long fault run: SIGKILL `rlhf run` (the whole process group) at random moments across all four stages
and the report, resume, and check that the final weights of every stage equal an uninterrupted run's.

    python bench/faults.py --count 20 [--config configs/smoke.yaml] [--kills-per-run 2]

Prints one line per trial and `N/N identical` at the end; exits non-zero if any trial differs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "reward", "ppo")


def rlhf_run(config: Path, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(config), f"run.output_dir={output_dir}"]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def identical(a: Path, b: Path) -> list[str]:
    """The stages whose final weights differ between two run directories."""
    differing = []
    for stage in STAGES:
        first, second = load_file(str(a / stage / "final" / "model.safetensors")), load_file(
            str(b / stage / "final" / "model.safetensors"))
        if first.keys() != second.keys() or any(not torch.equal(first[k], second[k]) for k in first):
            differing.append(stage)
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "smoke.yaml")
    parser.add_argument("--kills-per-run", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        began = time.time()
        subprocess.run(rlhf_run(arguments.config, scratch / "reference"), cwd=REPO, env=environment(), check=True,
                       capture_output=True)
        duration = time.time() - began
        name = next((scratch / "reference").iterdir()).name
        good = 0
        for trial in range(arguments.count):
            output = scratch / f"trial-{trial}"
            moments = sorted(rng.uniform(1, duration) for _ in range(arguments.kills_per_run))
            for moment in moments:
                process = subprocess.Popen(rlhf_run(arguments.config, output), cwd=REPO, env=environment(),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                try:
                    process.wait(timeout=moment)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            finished = subprocess.run(rlhf_run(arguments.config, output), cwd=REPO, env=environment(),
                                      capture_output=True, text=True)
            differing = ["(run failed: " + finished.stderr.strip().splitlines()[-1] + ")"] if finished.returncode else \
                identical(scratch / "reference" / name, output / name)
            good += not differing
            kills = ", ".join(f"{m:.1f}s" for m in moments)
            print(f"trial {trial + 1}: killed at {kills}: " + ("identical" if not differing else
                                                               f"DIFFERENT in {', '.join(differing)}"), flush=True)
            subprocess.run(["rm", "-rf", str(output)])
        print(f"{good}/{arguments.count} identical")
        raise SystemExit(0 if good == arguments.count else 1)


if __name__ == "__main__":
    main()
