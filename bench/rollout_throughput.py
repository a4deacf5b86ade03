"""Rollout tokens/s: transformers' `generate` against pipeline/generation/sampling.py's lean decoding loop (`decode_from_pi`),
on identical work: the same model, prompts, temperature and number of new tokens (a random model rarely emits
EOS, so both decode every step). Runs alternate, one warm-up each first; the median of the timed runs is
reported, in wall-clock and in process CPU seconds (steadier on a shared machine).

The defaults are the default pipeline's policy (configs/default.yaml: Llama, 4 layers × 128 wide, 4 heads, FFN
352, vocabulary 2048) at PPO's rollout size: batch 64, prompts of about 30 tokens (24 to 36, so rows are
left-padded), 48 new tokens.

    python bench/rollout_throughput.py [--runs 7] [--threads N] [--batch 64] [--new-tokens 48] [--device cuda]

Prints a readable line per sampler, then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.generation.padding import pad_sequences
from pipeline.generation.sampling import cut_at_first_eos, decode_from_pi, generate_with_config, sampling_config


def build_policy(arguments: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=arguments.vocab_size, hidden_size=arguments.hidden_size,
                         intermediate_size=arguments.ffn, num_hidden_layers=arguments.layers,
                         num_attention_heads=arguments.heads, num_key_value_heads=arguments.heads,
                         max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if arguments.eos_boost:
        # Responses that end: a constant first embedding coordinate survives into every final hidden state, and
        # EOS's (tied) embedding reads it, so EOS gets a steady share of each step's probability.
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[:, 0] = 1.0
            embeddings[1, 0] = arguments.eos_boost
    return model.to(arguments.device)


def random_prompts(arguments: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(arguments.prompt_length - 6, arguments.prompt_length + 7, (arguments.batch,),
                            generator=generator)
    prompts = [torch.randint(2, arguments.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    queries, query_mask = pad_sequences(prompts, 0, "left")
    return queries.to(arguments.device), query_mask.to(arguments.device)


def timed(function) -> tuple[tuple[float, float], torch.Tensor]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    output = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - wall, time.process_time() - cpu), output.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("runs", 7), ("batch", 64), ("new-tokens", 48), ("prompt-length", 30), ("vocab-size", 2048),
                          ("layers", 4), ("hidden-size", 128), ("heads", 4), ("ffn", 352), ("threads", 0)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--eos-boost", type=float, default=0.0,
                        help="make the random policy end its responses (e.g. 3: about 20 tokens on average); "
                             "0: responses run to --new-tokens")
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    model = build_policy(arguments)
    queries, query_mask = random_prompts(arguments)
    config = sampling_config(arguments.new_tokens, 1, 0, arguments.temperature)
    width = queries.shape[1]
    samplers = {
        "generate": lambda: generate_with_config(model, queries, query_mask, config)[:, width:],
        "lean": lambda: decode_from_pi(model, queries, query_mask, arguments.temperature, arguments.new_tokens, 1, 0),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in samplers}
    lengths: dict[str, list[float]] = {name: [] for name in samplers}
    with torch.no_grad():
        for run in range(arguments.runs + 1):
            for name, sampler in samplers.items():
                measured, responses = timed(sampler)
                if run > 0:  # the first run of each warms up
                    times[name].append(measured)
                    lengths[name].append(cut_at_first_eos(responses, 1, 0)[1].sum(1).float().mean().item())
    # Tokens/s counts the tokens of the responses (up to and including EOS), the same on average for both.
    mean_length = statistics.mean(lengths["generate"] + lengths["lean"])
    tokens = arguments.batch * mean_length
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
              "device": arguments.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "shape": {k: getattr(arguments, k) for k in ("batch", "new_tokens", "prompt_length", "vocab_size",
                                                              "layers", "hidden_size", "heads", "ffn", "eos_boost")},
              "mean_response_length": round(mean_length, 1)}
    for name, measured in times.items():
        wall, cpu = statistics.median(m[0] for m in measured), statistics.median(m[1] for m in measured)
        result[name] = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "tokens_per_s_wall": round(tokens / wall),
                        "tokens_per_s_cpu": round(tokens / cpu), "runs_wall_s": [round(m[0], 3) for m in measured]}
        print(f"{name:9s} median {wall:.3f} s wall ({tokens / wall:,.0f} tokens/s), {cpu:.3f} s CPU "
              f"({tokens / cpu:,.0f} tokens/s); runs {result[name]['runs_wall_s']}")
    result["speedup_wall"] = round(result["generate"]["wall_s"] / result["lean"]["wall_s"], 2)
    result["speedup_cpu"] = round(result["generate"]["cpu_s"] / result["lean"]["cpu_s"], 2)
    print(f"lean / generate: {result['speedup_wall']}x wall, {result['speedup_cpu']}x CPU "
          f"(responses of {mean_length:.1f} tokens on average)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
