"""The PPO benchmark's work, built the same way for our PPO (bench/ppo_step.py) and TRL 0.19.1's PPOTrainer
(bench/trl_ppo_step.py), so that the two time identical work: one tokenizer, one Llama shape with the same
initial weights, the same fixed-length random prompts, batch split and response length.

The defaults are the anchor setup of issue 13 (../shared/bench/ppo_side_by_side.py): vocabulary 4096, 4 layers
× 128 wide, 2 heads, FFN 320, batch 64, 24-token prompts, 48-token responses, 4 PPO epochs of one minibatch
in 4 micro-batches, fp32. The prompts are random ids as there: what matters for time is their length.

This module needs only torch, tokenizers and transformers, because it runs in both virtual environments
(ours has transformers 5, TRL 0.19.1's has transformers 4.53). Summarise the JSON lines of both benches:

    python bench/side_by_side.py summary < results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

# Issue 13: our PPO step at most this share of TRL 0.19.1's, on identical work.
GOAL_RATIO = {"fp32": 0.75, "bf16": 0.6}


@dataclass(frozen=True)
class PPOBenchShape:
    """Everything that decides a PPO step's work; both implementations get exactly these."""

    vocab_size: int = 4096
    layers: int = 4
    hidden_size: int = 128
    heads: int = 2
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as heads
    ffn: int = 320  # the SwiGLU intermediate size
    prompt_length: int = 24
    batch: int = 64  # prompts per rollout
    response_length: int = 48  # max new tokens
    epochs: int = 4  # PPO epochs over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch
    micro_batches: int = 4  # gradient-accumulation steps per minibatch
    dtype: str = "fp32"  # fp32, or bf16 autocast
    steps: int = 5  # timed steps; one more runs first as warm-up

    @property
    def micro_batch_size(self) -> int:
        return self.batch // (self.minibatches * self.micro_batches)

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads


# Shapes to run instead of the anchor's (`--preset NAME`; flags given as well still override). smollm2: issue 13's
# real-model setup, SmolLM2-135M-Instruct's architecture (30 layers × 576, 9 heads sharing 3 key/value heads, FFN
# 1536, 49,152-token vocabulary, tied embeddings) at batch 8 with 32-token responses; the weights are random, as
# on the anchor, so that both sides sample full-length responses and do exactly the same work.
PRESETS = {"smollm2": dict(vocab_size=49152, layers=30, hidden_size=576, heads=9, kv_heads=3, ffn=1536,
                           batch=8, response_length=32, micro_batches=4, steps=2)}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and one flag per PPOBenchShape field; a flag left unset takes the preset's value, else the anchor's."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named shape instead of issue 13's anchor")
    for name, value in asdict(PPOBenchShape()).items():
        flag = "--" + name.replace("_", "-")
        if name == "dtype":
            parser.add_argument(flag, choices=["fp32", "bf16"], default=None, help=f"default {value}")
        else:
            parser.add_argument(flag, type=int, default=None, help=f"default {value}")


def shape_from_arguments(arguments: argparse.Namespace) -> PPOBenchShape:
    """The shape the flags ask for; a shape that cannot run exits 2 with a one-line message naming the flag."""
    values = {**asdict(PPOBenchShape()), **PRESETS.get(getattr(arguments, "preset", None), {})}
    values.update({name: getattr(arguments, name) for name in values if getattr(arguments, name, None) is not None})
    shape = PPOBenchShape(**values)
    problem = shape_problem(shape)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return shape


def shape_problem(shape: PPOBenchShape) -> str | None:
    """What is wrong with a shape, naming the flag, or None."""
    for name, value in asdict(shape).items():
        if name not in ("dtype", "kv_heads") and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    if shape.vocab_size < 3:
        return "--vocab-size must be at least 3 (pad, EOS and one ordinary token)"
    if shape.hidden_size % shape.heads:
        return f"--hidden-size {shape.hidden_size} is not a multiple of --heads {shape.heads}"
    if shape.heads % shape.key_value_heads:
        return f"--heads {shape.heads} is not a multiple of --kv-heads {shape.kv_heads}"
    if shape.batch % (shape.minibatches * shape.micro_batches):
        return (f"--batch {shape.batch} does not split into --minibatches {shape.minibatches} × --micro-batches "
                f"{shape.micro_batches} equal micro-batches")
    return None


def special_tokens_tokenizer():
    """A tokenizer whose only role is to name pad (id 0) and EOS (id 1), as in the anchor: the prompts are
    random ids and nothing is decoded, so its vocabulary need not match the model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["a b c"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|pad|>", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|endoftext|>")


def llama_models(shape: PPOBenchShape, tokenizer) -> dict[str, torch.nn.Module]:
    """Policy, reference (a copy of the policy), reward model and value model, from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    def config(**extra) -> LlamaConfig:
        return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                           num_key_value_heads=shape.key_value_heads, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           tie_word_embeddings=True, **extra)

    torch.manual_seed(0)
    policy = LlamaForCausalLM(config())
    reference = LlamaForCausalLM(config())
    reference.load_state_dict(policy.state_dict())
    reward = LlamaForSequenceClassification(config(num_labels=1))
    value = LlamaForSequenceClassification(config(num_labels=1))
    return {"policy": policy, "reference": reference, "reward": reward, "value": value}


def random_prompts(shape: PPOBenchShape) -> torch.Tensor:
    """[batch × (steps + 1), prompt_length] ids, never pad or EOS: one batch of prompts per step."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, shape.vocab_size, (shape.batch * (shape.steps + 1), shape.prompt_length),
                         generator=generator)


def machine_description() -> dict:
    """Date, CPU model, cores, the load others put on them, torch threads and library versions: a benchmark
    figure means nothing without them."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers

    try:
        with open("/proc/loadavg", encoding="utf-8") as handle:
            load = float(handle.read().split()[0])
    except OSError:
        load = None
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "nproc": len(os.sched_getaffinity(0)),
            "load_average_1min": load, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def setup_of(record: dict) -> str | None:
    """Which of issue 13's setups a bench result ran: "anchor", a preset's name, or None (any dtype and number of
    timed steps)."""
    setups = {"anchor": asdict(PPOBenchShape()),
              **{name: {**asdict(PPOBenchShape()), **preset} for name, preset in PRESETS.items()}}
    for name, shape in setups.items():
        if all(record.get(key, 0 if key == "kv_heads" else None) == value for key, value in shape.items()
               if key not in ("dtype", "steps")):
            return name
    return None


def median_summary(records: list[dict]) -> dict:
    """Median s/step of each implementation and their ratio ours/TRL, from the benches' JSON lines.

    Medians, not means or minima: on a shared machine one run can be slowed by a neighbour's burst."""
    runs: dict[str, list[float]] = {}
    lengths: dict[str, list[float]] = {}
    for record in records:
        runs.setdefault(record["impl"], []).append(record["sec_per_step"])
        lengths.setdefault(record["impl"], []).append(record["mean_response_tokens"])
    missing = [impl for impl in ("ours", "trl-0.19.1") if impl not in runs]
    if missing:
        raise ValueError(f"no result of {', '.join(missing)} to compare")
    summary = {impl: {"runs": values, "median_sec_per_step": round(statistics.median(values), 3),
                      "mean_response_tokens": round(statistics.mean(lengths[impl]), 2)}
               for impl, values in runs.items()}
    summary["ratio_ours_over_trl"] = round(summary["ours"]["median_sec_per_step"]
                                           / summary["trl-0.19.1"]["median_sec_per_step"], 3)
    ours_length, trl_length = summary["ours"]["mean_response_tokens"], summary["trl-0.19.1"]["mean_response_tokens"]
    # Responses that end early at EOS are cheaper; a ratio over different amounts of work is no comparison.
    summary["same_response_length"] = abs(ours_length - trl_length) <= 0.02 * max(ours_length, trl_length)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise the JSON lines of bench/ppo_step.py and "
                                                 "bench/trl_ppo_step.py read from standard input")
    parser.add_argument("command", choices=["summary"])
    parser.parse_args()
    records = []
    for line in sys.stdin:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the readable lines around the results
            continue
        if isinstance(record, dict) and "impl" in record:
            records.append(record)
    try:
        summary = median_summary(records)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for impl in ("ours", "trl-0.19.1"):
        runs = ", ".join(f"{v:.3f}" for v in summary[impl]["runs"])
        print(f"{impl:>11}: median {summary[impl]['median_sec_per_step']:.3f} s/step (runs: {runs}); "
              f"mean response {summary[impl]['mean_response_tokens']:.2f} tokens")
    dtype = records[0].get("dtype", "fp32")
    print(f"ratio ours/TRL (medians): {summary['ratio_ours_over_trl']:.3f}")
    if not summary["same_response_length"]:
        print("warning: mean response lengths differ by more than 2%: the two did not do the same work")
    elif len({setup_of(r) for r in records}) == 1 and setup_of(records[0]) is not None:
        met = summary["ratio_ours_over_trl"] <= GOAL_RATIO[dtype]
        print(f"issue 13's goal on its {setup_of(records[0])} setup in {dtype}: ≤ {GOAL_RATIO[dtype]}: "
              f"{'met' if met else 'not met'}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
