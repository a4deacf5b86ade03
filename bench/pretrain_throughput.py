"""Pretraining throughput: our stage's training loop vs a minimal hand-written PyTorch loop (same model, batch,
sequence length and dtype), and that minimal loop with the model under `torch.compile` vs eager; MFU against a
matmul peak measured here too. Or, with --shakespeare, a tinyshakespeare run held out as nanoGPT holds it out,
reporting held-out nats and bits per character beside nanoGPT's CPU "baby GPT".

    python bench/pretrain_throughput.py [--steps 60] [--rounds 3] [--dtype fp32|bf16] [--no-compile]
    python bench/pretrain_throughput.py --shakespeare ../shared/data/tinyshakespeare/input.txt

The three loops run alternately, `--rounds` times each, the order rotating each round, and the medians are
reported: on a shared machine one run can be slowed by a neighbour. Prints readable lines and JSON lines;
OMP_NUM_THREADS=1 on a machine that others load (see bench/compare_trl.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import machine_description  # noqa: E402

from data.loading import read_rows  # noqa: E402
from data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from pipeline.config.loading import load_config
from pipeline.run.manifests import read_manifest
from pipeline.train.models import attention_for_precision, build_llama_from_config
from stages.pretrain import packed_blocks, run_pretraining  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The first steps of a compiled model trace and compile it; eager's first steps allocate. Neither is throughput.
WARMUP_STEPS = 3
# nanoGPT's README: the CPU baby GPT on shakespeare_char "gets us a loss of only 1.88" (cross-entropy in nats
# per character, estimated on 20 batches of the last 10% of the text); the GPU config reaches 1.4697.
BABY_GPT_NATS_PER_CHAR = 1.88
BABY_GPT_PARAMETERS = 0.80e6  # nanoGPT's count (position embeddings excluded)
BABY_GPT_CHARACTERS_SEEN = 2000 * 12 * 64  # iterations × batch × block


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


def tokens_per_second(step_seconds: list[float], tokens_per_step: int, skip: int = 0) -> float:
    """Throughput over the steps after the first `skip`."""
    timed = step_seconds[skip:]
    if not timed:
        raise ValueError(f"no steps left to time after skipping {skip} of {len(step_seconds)}")
    return tokens_per_step * len(timed) / sum(timed)


def minimal_loop(config, steps: int, bf16: bool, compiled: bool) -> tuple[list[float], int, torch.nn.Module]:
    """Seconds of each step of the simplest correct loop — AdamW, autocast, clip, step, nothing else — on the
    stage's own tokenizer, model architecture and packed data; and the tokens of one step."""
    tokenizer = load_tokenizer(config.run_dir / "tokenizer")
    texts = [row["text"] for row in read_rows(config.run_dir / "data" / "pretrain_train.jsonl")]
    settings = config.pretrain
    blocks = packed_blocks(texts, tokenizer, settings.seq_length)
    model = attention_for_precision(build_llama_from_config(config.model, tokenizer, seed=0), bf16, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        batch = blocks[torch.randint(0, len(blocks), (settings.per_device_train_batch_size,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - began)
    return seconds, settings.per_device_train_batch_size * settings.seq_length, model


def fresh_accelerator_state() -> None:
    """Each run_pretraining call builds its own Accelerator; Accelerate keeps one state per process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def stage_loop(steps: int, bf16: bool, output_dir: Path, overrides: Sequence[str] = ()):
    """Tokens/s of the pretraining stage itself (its manifest's figure: every optimisation step, the first
    included, without evaluation or saving), and its config; `overrides` change the default config further."""
    config = load_config(REPO / "configs" / "default.yaml", [
        f"run.output_dir={output_dir}", f"pretrain.max_steps={steps}", f"pretrain.eval_steps={steps}",
        f"pretrain.save_steps={steps}", f"pretrain.bf16={str(bf16).lower()}", "pretrain.report_to=none",
        "pretrain.warmup_steps=5", "data.builtin.pretrain_stories=4000", "tokenizer.training_texts=4000",
        *overrides])
    fresh_accelerator_state()
    run_pretraining(config)
    return read_manifest(config.run_dir / "pretrain")["train_tokens_per_second"], config


def throughput(steps: int, rounds: int, bf16: bool, compile_too: bool, scratch: Path,
               overrides: Sequence[str] = ()) -> dict:
    """Stage vs minimal eager loop (every step timed, as the stage times itself), and compiled vs eager minimal
    loop (after WARMUP_STEPS), run alternately; medians over the rounds."""
    runs: dict[str, list[float]] = {"stage": [], "minimal": [], "minimal_eager_warm": [], "minimal_compiled_warm": []}
    compile_seconds: list[float] = []
    order = ["stage", "eager"] + (["compiled"] if compile_too else [])
    config, model = None, None  # the minimal loop reads the tokenizer and data of the stage's first run
    for round_index in range(rounds):
        for job in order[round_index % len(order):] + order[: round_index % len(order)]:
            if job == "stage":
                tokens, config = stage_loop(steps, bf16, scratch / f"stage-{round_index}", overrides)
                runs["stage"].append(tokens)
                continue
            seconds, tokens_per_step, model = minimal_loop(config, steps, bf16, compiled=job == "compiled")
            if job == "eager":
                runs["minimal"].append(tokens_per_second(seconds, tokens_per_step))
                runs["minimal_eager_warm"].append(tokens_per_second(seconds, tokens_per_step, WARMUP_STEPS))
            else:
                runs["minimal_compiled_warm"].append(tokens_per_second(seconds, tokens_per_step, WARMUP_STEPS))
                compile_seconds.append(sum(seconds[:WARMUP_STEPS]))
    median = {name: statistics.median(values) for name, values in runs.items() if values}
    peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    result = {"dtype": "bf16" if bf16 else "fp32", "steps": steps, "rounds": rounds,
              "runs_tokens_per_s": {name: [round(v) for v in values] for name, values in runs.items() if values},
              "stage_tokens_per_s": round(median["stage"]), "minimal_tokens_per_s": round(median["minimal"]),
              "stage_over_minimal": round(median["stage"] / median["minimal"], 3),
              "matmul_peak_gflops": round(peak / 1e9, 1),
              "stage_mfu": round(median["stage"] * flops_per_token(model, config.pretrain.seq_length) / peak, 4)}
    if compile_too:
        result.update(eager_warm_tokens_per_s=round(median["minimal_eager_warm"]),
                      compiled_warm_tokens_per_s=round(median["minimal_compiled_warm"]),
                      compiled_over_eager=round(median["minimal_compiled_warm"] / median["minimal_eager_warm"], 3),
                      compile_warmup_s=round(statistics.median(compile_seconds), 1),
                      compile_first_warmup_s=round(compile_seconds[0], 1),
                      compile_break_even_steps=break_even_steps(
                          compile_seconds[0], tokens_per_step, median["minimal_eager_warm"],
                          median["minimal_compiled_warm"]))
    return result


def break_even_steps(first_warmup_s: float, tokens_per_step: int, eager_tokens_per_s: float,
                     compiled_tokens_per_s: float) -> int | None:
    """After how many training steps the first compile (its warm-up steps included) has paid for itself: the
    extra seconds of warm-up over eager's warm-up steps, divided by the seconds each compiled step saves. None
    when compiled steps are not faster."""
    eager_step_s, compiled_step_s = tokens_per_step / eager_tokens_per_s, tokens_per_step / compiled_tokens_per_s
    if compiled_step_s >= eager_step_s:
        return None
    extra_s = first_warmup_s - WARMUP_STEPS * eager_step_s
    return WARMUP_STEPS + max(0, round(extra_s / (eager_step_s - compiled_step_s)))


# ---------------------------------------------------------------- tinyshakespeare
def nanogpt_split(text: str, held_out_fraction: float = 0.1) -> tuple[str, str]:
    """nanoGPT's shakespeare_char split: the first 90% of the characters train, the last 10% are held out as
    one block (data/shakespeare_char/prepare.py: data[:int(n*0.9)], data[int(n*0.9):]). Held-out lines drawn at
    random would sit between training lines of the same scene, which flatters the held-out loss."""
    cut = int(len(text) * (1 - held_out_fraction))
    return text[:cut], text[cut:]


def characters_per_token_id(tokenizer) -> torch.Tensor:
    """How many characters each token id spells; special tokens (EOS) spell none."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([0 if i in special else len(tokenizer.decode([i])) for i in range(len(tokenizer))])


def nats_per_character(eval_loss: float, blocks: torch.Tensor, tokenizer) -> float:
    """The stage's held-out loss (mean nats per predicted token over `blocks`, every position but each block's
    first) as nats per character: the nats those tokens sum to over the characters they spell."""
    predicted = blocks[:, 1:]
    characters = int(characters_per_token_id(tokenizer)[predicted].sum())
    return eval_loss * predicted.numel() / characters


def write_text_rows(path: Path, text: str) -> Path:
    """One row of a text dataset: the stage then sees one unbroken stream, as nanoGPT does."""
    path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return path


def shakespeare(corpus: Path, output_dir: Path, max_steps: int | None = None, overrides: Sequence[str] = ()) -> dict:
    """Our pretraining stage on tinyshakespeare at the baby GPT's compute (6·N·tokens; or `max_steps`), evaluated
    on the whole held-out 10%. A 512-token BPE instead of characters: equal compute then means more characters
    seen. `overrides` change the config further (tests use a smaller model)."""
    text = corpus.read_text(encoding="utf-8")
    train_text, held_out_text = nanogpt_split(text)
    train_path = write_text_rows(output_dir / "shakespeare_train.jsonl", train_text)
    held_out_path = write_text_rows(output_dir / "shakespeare_held_out.jsonl", held_out_text)
    seq_length, batch = 64, 12
    overrides = [f"run.output_dir={output_dir}", "run.name=shakespeare", f"data.pretrain.path={train_path}",
                 f"data.pretrain.eval_split={held_out_path}", "tokenizer.vocab_size=512",
                 "model.num_hidden_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
                 "model.intermediate_size=352", f"pretrain.seq_length={seq_length}",
                 f"pretrain.per_device_train_batch_size={batch}", "pretrain.report_to=none",
                 "pretrain.learning_rate=2e-3", "pretrain.warmup_steps=100", "pretrain.bf16=false",
                 "pretrain.eval_batches=1000000", *overrides]  # every held-out block, not a sample of them
    config = load_config(REPO / "configs" / "default.yaml", overrides)
    # The stage reuses a tokenizer already in its run directory: it trains on the very one counted with here.
    tokenizer = train_bpe_tokenizer([train_text], config.tokenizer.vocab_size)
    tokenizer.save_pretrained(config.run_dir / "tokenizer")
    parameters = sum(p.numel() for p in build_llama_from_config(config.model, tokenizer, 0).parameters())
    steps = max_steps or max(100, round(BABY_GPT_PARAMETERS * BABY_GPT_CHARACTERS_SEEN / parameters
                                        / (batch * seq_length)))
    config = load_config(REPO / "configs" / "default.yaml", overrides + [
        f"pretrain.max_steps={steps}", f"pretrain.eval_steps={steps}", f"pretrain.save_steps={steps}"])
    fresh_accelerator_state()
    began = time.perf_counter()
    run_pretraining(config)
    seconds = time.perf_counter() - began
    eval_loss = read_manifest(config.run_dir / "pretrain")["metrics"]["eval_loss"]
    held_out_blocks = packed_blocks([held_out_text], tokenizer, seq_length)
    nats = nats_per_character(eval_loss, held_out_blocks, tokenizer)
    train_tokens = len(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    return {"split": "nanoGPT's: first 90% of the characters train, last 10% held out",
            "train_characters": len(train_text), "held_out_characters": len(held_out_text),
            "held_out_predicted_tokens": held_out_blocks[:, 1:].numel(), "steps": steps, "parameters": parameters,
            "characters_seen": round(steps * batch * seq_length * len(train_text) / train_tokens),
            "wall_s": round(seconds, 1), "eval_loss_nats_per_token": round(eval_loss, 4),
            "nats_per_char": round(nats, 4), "bits_per_char": round(nats / math.log(2), 4),
            "baby_gpt_nats_per_char": BABY_GPT_NATS_PER_CHAR,
            "baby_gpt_bits_per_char": round(BABY_GPT_NATS_PER_CHAR / math.log(2), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--shakespeare", type=Path, help="path to tinyshakespeare's input.txt")
    arguments = parser.parse_args()
    if arguments.steps <= WARMUP_STEPS or arguments.rounds < 1:
        parser.error(f"--steps must exceed {WARMUP_STEPS} and --rounds be at least 1")
    if arguments.shakespeare is not None and not arguments.shakespeare.is_file():
        parser.error(f"--shakespeare: no file at {arguments.shakespeare}")
    print(json.dumps({"machine": machine_description()}))
    with tempfile.TemporaryDirectory() as scratch:
        # An empty inductor cache, so that the first compile costs what it costs a user's first run.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor-cache")
        if arguments.shakespeare:
            result = shakespeare(arguments.shakespeare, Path(scratch))
            print(f"tinyshakespeare (last 10% held out): {result['nats_per_char']} nats/char = "
                  f"{result['bits_per_char']} bits/char; nanoGPT's baby GPT ≈{BABY_GPT_NATS_PER_CHAR} nats/char = "
                  f"{result['baby_gpt_bits_per_char']} bits/char")
            print(json.dumps(result))
            return
        result = throughput(arguments.steps, arguments.rounds, arguments.dtype == "bf16", not arguments.no_compile,
                            Path(scratch))
        print(f"pretraining ({result['dtype']}, medians of {result['rounds']} alternating rounds): stage "
              f"{result['stage_tokens_per_s']} tokens/s = {result['stage_over_minimal']}× a minimal loop "
              f"({result['minimal_tokens_per_s']}); MFU {result['stage_mfu']} of {result['matmul_peak_gflops']} "
              f"GFLOP/s")
        if "compiled_over_eager" in result:
            print(f"torch.compile (minimal loop, after {WARMUP_STEPS} warm-up steps): "
                  f"{result['compiled_warm_tokens_per_s']} vs eager {result['eager_warm_tokens_per_s']} tokens/s "
                  f"= {result['compiled_over_eager']}×; warm-up with compilation {result['compile_warmup_s']} s "
                  f"(the first, with an empty inductor cache, {result['compile_first_warmup_s']} s: "
                  + (f"it pays for itself after {result['compile_break_even_steps']} steps)"
                     if result["compile_break_even_steps"] else "compiled steps were not faster, it never pays)"))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
