"""Pretraining throughput: our stage's training loop vs a minimal hand-written PyTorch loop, same model, batch,
sequence length and dtype, measured in one run; MFU against a matmul peak measured here too. Optionally, a
tinyshakespeare run reporting validation bits per character, to compare with nanoGPT's CPU "baby GPT".

    python bench/pretrain_throughput.py [--steps 60] [--dtype bf16|fp32]
    python bench/pretrain_throughput.py --shakespeare ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loading import read_rows  # noqa: E402
from data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from pipeline.checkpoints import read_manifest  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.models import attention_for_precision, build_llama_from_config  # noqa: E402
from stages.pretrain import packed_blocks, run_pretraining  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a square matmul on this machine: the ceiling MFU is measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - began)


def flops_per_token(model, seq_length: int) -> float:
    """6·N for the weights (forward + backward) plus the attention scores, as in the PaLM appendix."""
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * seq_length


def minimal_loop(config, steps: int, bf16: bool) -> tuple[float, torch.nn.Module]:
    """Tokens/s of the simplest correct loop — AdamW, autocast, clip, step, nothing else — on the stage's own
    tokenizer, model architecture and packed data."""
    tokenizer = load_tokenizer(config.run_dir / "tokenizer")
    texts = [row["text"] for row in read_rows(config.run_dir / "data" / "pretrain_train.jsonl")]
    settings = config.pretrain
    blocks = packed_blocks(texts, tokenizer, settings.seq_length)
    model = attention_for_precision(build_llama_from_config(config.model, tokenizer, seed=0), bf16, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    tokens, elapsed = 0, 0.0
    for step in range(steps):
        began = time.perf_counter()
        batch = blocks[torch.randint(0, len(blocks), (settings.per_device_train_batch_size,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - began
        tokens += batch.numel()
    return tokens / elapsed, model


def fresh_accelerator_state() -> None:
    """Each run_pretraining call builds its own Accelerator; Accelerate keeps one state per process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def stage_loop(steps: int, bf16: bool, output_dir: Path) -> float:
    config = load_config(REPO / "configs" / "default.yaml", [
        f"run.output_dir={output_dir}", f"pretrain.max_steps={steps}", f"pretrain.eval_steps={steps}",
        f"pretrain.save_steps={steps}", f"pretrain.bf16={str(bf16).lower()}", "pretrain.report_to=none",
        "pretrain.warmup_steps=5", "data.builtin.pretrain_stories=4000", "tokenizer.training_texts=4000"])
    fresh_accelerator_state()
    run_pretraining(config)
    return read_manifest(config.run_dir / "pretrain")["train_tokens_per_second"], config


def shakespeare(corpus: Path, output_dir: Path) -> dict:
    """nanoGPT's CPU baby GPT sees 2000 iters × 12 × 64 characters; we give our model the same FLOPs budget."""
    text = corpus.read_text(encoding="utf-8")
    overrides = [f"run.output_dir={output_dir}", "run.name=shakespeare", f"data.pretrain.path={corpus}",
                 "data.pretrain.eval_fraction=0.1", "tokenizer.vocab_size=512", "model.num_hidden_layers=4",
                 "model.hidden_size=128", "model.num_attention_heads=4", "model.intermediate_size=352",
                 "pretrain.seq_length=64", "pretrain.per_device_train_batch_size=12", "pretrain.report_to=none",
                 "pretrain.learning_rate=2e-3", "pretrain.warmup_steps=100", "pretrain.eval_batches=40"]
    config = load_config(REPO / "configs" / "default.yaml", overrides)
    tokenizer = train_bpe_tokenizer([text[:200000]], 512)
    chars_per_token = len(text) / len(tokenizer(text, add_special_tokens=False)["input_ids"])
    baby_parameters = 0.8e6
    model = build_llama_from_config(config.model, tokenizer, 0)
    ours = sum(p.numel() for p in model.parameters())
    # Equal compute: 6·N·tokens. nanoGPT processes 2000·12·64 characters, i.e. that many tokens at char level.
    our_tokens = 6 * baby_parameters * 2000 * 12 * 64 / (6 * ours)
    steps = max(100, round(our_tokens / (12 * 64)))
    config = load_config(REPO / "configs" / "default.yaml", overrides + [f"pretrain.max_steps={steps}",
                                                                        f"pretrain.eval_steps={steps}",
                                                                        f"pretrain.save_steps={steps}"])
    fresh_accelerator_state()
    run_pretraining(config)
    eval_loss = read_manifest(config.run_dir / "pretrain")["metrics"]["eval_loss"]
    nats_per_char = eval_loss / chars_per_token
    return {"steps": steps, "parameters": ours, "chars_per_token": round(chars_per_token, 3),
            "eval_loss_per_token": round(eval_loss, 4), "nats_per_char": round(nats_per_char, 4),
            "bits_per_char": round(nats_per_char / math.log(2), 4), "nanogpt_baby_gpt_nats_per_char": 1.88}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--shakespeare", type=Path, help="path to tinyshakespeare's input.txt")
    arguments = parser.parse_args()
    bf16 = arguments.dtype == "bf16"
    with tempfile.TemporaryDirectory() as scratch:
        ours, config = stage_loop(arguments.steps, bf16, Path(scratch))
        minimal, model = minimal_loop(config, arguments.steps, bf16)
        # Measured twice more, each first, so that neither side profits from a warmer machine.
        minimal = max(minimal, minimal_loop(config, arguments.steps, bf16)[0])
        ours = max(ours, stage_loop(arguments.steps, bf16, Path(scratch) / "again")[0])
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        mfu = ours * flops_per_token(model, config.pretrain.seq_length) / peak
        result = {"dtype": arguments.dtype, "threads": torch.get_num_threads(), "stage_tokens_per_s": round(ours),
                  "minimal_tokens_per_s": round(minimal), "ratio": round(ours / minimal, 3),
                  "matmul_peak_gflops": round(peak / 1e9, 1), "mfu": round(mfu, 4)}
        print(json.dumps(result))
        if arguments.shakespeare:
            print(json.dumps(shakespeare(arguments.shakespeare, Path(scratch))))


if __name__ == "__main__":
    main()
