"""Shared by the tests: run a stage in a subprocess, kill it at a chosen moment, compare weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def stage_command(stage: str, *overrides: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", f"stages.{stage}", "--config", str(SMOKE), *overrides]
    # `accelerate launch --cpu` starts a single process whatever --num_processes says (accelerate 1.15); the
    # multi-process launcher with ACCELERATE_USE_CPU=1 (set in environment()) gives real DDP over gloo.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", f"stages.{stage}",
            "--config", str(SMOKE), *overrides]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def run_stage(stage: str, *overrides: str, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(stage, *overrides, processes=processes), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def run_and_kill_when(stage: str, condition, *overrides: str, timeout: float = 300) -> None:
    """Start a stage, SIGKILL it as soon as `condition()` holds; fail if it finishes first."""
    process = subprocess.Popen(stage_command(stage, *overrides), cwd=REPO, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            raise AssertionError(f"{stage} finished before the kill point: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"{stage}: kill point not reached in {timeout}s")


def load_weights(directory: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / name))


def assert_identical_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    first, second = load_weights(a, name), load_weights(b, name)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@torch.no_grad()
def sample_from_pi_by_hand(model, queries: torch.Tensor, query_mask: torch.Tensor, temperature: float,
                           max_new_tokens: int, eos_token_id: int, pad_token_id: int, batch_size: int,
                           draw=None, only_unfinished: bool = False) -> torch.Tensor:
    """The oracle for "samples come from π at the temperature": no cache, no logits processors, a full forward per
    token, softmax(logits / T), one draw per step (`draw(probabilities)`, by default torch.multinomial as
    `generate` draws) over the batch, or over its unfinished rows only as pipeline/generation/sampling.py's loop draws; pad
    after a row's EOS, stop when every row has ended. The same seed must give the same tokens as the sampler."""
    draw = draw or (lambda probabilities: torch.multinomial(probabilities, 1).squeeze(1))
    pieces = []
    for start in range(0, len(queries), batch_size):
        ids, mask = queries[start: start + batch_size], query_mask[start: start + batch_size]
        finished = torch.zeros(len(ids), dtype=torch.bool)
        tokens = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            probabilities = torch.softmax(logits[:, -1].float() / temperature, -1)
            token = torch.full_like(finished, pad_token_id, dtype=torch.long)
            if only_unfinished:
                token[~finished] = draw(probabilities[~finished])
            else:
                token = torch.where(finished, token, draw(probabilities))
            tokens.append(token)
            finished |= token == eos_token_id
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if finished.all():
                break
        piece = torch.stack(tokens, 1)
        pieces.append(torch.nn.functional.pad(piece, (0, max_new_tokens - piece.shape[1]), value=pad_token_id))
    return torch.cat(pieces)
