"""Seconds per PPO step, split into rollout / scoring / optimisation, in fp32 and bf16 autocast; and the peak
RSS of PPO next to SFT-style training of the same model, full and LoRA.

The issue's reference setup (2-core CPU): Llama 4 layers × 128 wide, batch 64, 48-token responses, 4 PPO
epochs, one minibatch of 64 in 4 micro-batches of 16. TRL 0.19's PPOTrainer took 3.7 s/step there.

    python bench/ppo_step.py [--steps 5] [--layers 4] [--width 128] [--batch 64] [--response-length 48]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.batches import left_pad  # noqa: E402
from pipeline.models import attention_for_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build(arguments, lora: bool):
    """Tokenizer, policy, reference, critic and reward model of the given size, randomly initialised."""
    from transformers import LlamaForSequenceClassification

    from data.builtin_datasets import prompts
    from data.builtin_task import pretraining_stories
    from data.tokenizer import train_bpe_tokenizer
    from pipeline.config import ModelSection, PeftSection, PPOSection
    from pipeline.models import build_llama_from_config

    tokenizer = train_bpe_tokenizer(pretraining_stories(0, 3000), 2048)
    section = ModelSection(num_hidden_layers=arguments.layers, hidden_size=arguments.width,
                           num_attention_heads=max(1, arguments.width // 32),
                           intermediate_size=int(arguments.width * 2.75))
    policy = build_llama_from_config(section, tokenizer, seed=0)
    reference = None
    if lora:
        from peft import LoraConfig, get_peft_model
        peft = PeftSection()
        policy = get_peft_model(policy, LoraConfig(r=peft.r, lora_alpha=peft.lora_alpha,
                                                   target_modules=peft.target_modules, task_type="CAUSAL_LM"))
    else:
        reference = build_llama_from_config(section, tokenizer, seed=0)
    classifier_config = build_llama_from_config(section, tokenizer, seed=1).config
    classifier_config.num_labels = 1
    critic = __import__("stages.ppo", fromlist=["ValueModel"]).ValueModel(LlamaForSequenceClassification(classifier_config))
    reward_model = LlamaForSequenceClassification(classifier_config).eval()
    settings = PPOSection(per_device_train_batch_size=arguments.batch // 4, gradient_accumulation_steps=4,
                          num_mini_batches=1, num_ppo_epochs=4, response_length=arguments.response_length,
                          local_rollout_forward_batch_size=arguments.batch, missing_eos_penalty=None)
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
             for row in prompts(0, arguments.batch)]
    return tokenizer, policy, reference, critic, reward_model, settings, texts


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ppo_steps(arguments) -> dict:
    from accelerate import Accelerator

    import stages.ppo as ppo
    from reward_model import RewardNormalization

    tokenizer, policy, reference, critic, reward_model, settings, texts = build(arguments, arguments.lora)
    accelerator = Accelerator(mixed_precision="bf16" if arguments.dtype == "bf16" else "no")
    for model in (policy, reference, critic, reward_model):  # as the stage does
        if model is not None:
            attention_for_precision(model, arguments.dtype == "bf16", accelerator.device)
    reward_model = ppo.frozen_on_device(reward_model, accelerator)
    reference = ppo.frozen_on_device(reference, accelerator) if reference is not None else None
    policy_optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-5)
    policy, critic, policy_optimizer, critic_optimizer = accelerator.prepare(policy, critic, policy_optimizer,
                                                                             critic_optimizer)
    queries, query_mask = left_pad(texts, tokenizer.pad_token_id)
    queries, query_mask = queries.to(accelerator.device), query_mask.to(accelerator.device)
    phases = {"rollout": [], "scoring": [], "optimisation": []}
    for step in range(arguments.steps + 1):  # the first step warms up and is not counted
        synchronize()
        began = time.perf_counter()
        policy.eval(), critic.eval()
        rollout = ppo.generate_rollout(policy, tokenizer, queries, query_mask, settings, accelerator)
        synchronize()
        generated = time.perf_counter()
        experience, _ = ppo.score_rollout(rollout, policy, reference, critic, reward_model, RewardNormalization(),
                                         0.05, settings, accelerator)
        synchronize()
        scored = time.perf_counter()
        policy.train(), critic.train()
        ppo.ppo_update(policy, critic, policy_optimizer, critic_optimizer, experience, settings, accelerator,
                       torch.Generator().manual_seed(step))
        synchronize()
        done = time.perf_counter()
        if step > 0:
            for name, seconds in zip(phases, (generated - began, scored - generated, done - scored)):
                phases[name].append(seconds)
    result = {name: round(sum(v) / len(v), 3) for name, v in phases.items()}
    result["seconds_per_step"] = round(sum(result.values()), 3)
    result["response_tokens"] = int(rollout.mask.sum(1).float().mean())
    return result


def sft_steps(arguments) -> dict:
    """SFT-style training of the same policy (micro-batch of 16 prompt+response sequences, AdamW)."""
    tokenizer, policy, _, _, _, settings, texts = build(arguments, arguments.lora)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = attention_for_precision(policy, arguments.dtype == "bf16", device).to(device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    width = max(len(t) for t in texts) + arguments.response_length
    batch = torch.randint(0, len(tokenizer), (settings.per_device_train_batch_size, width), device=device)
    for _ in range(arguments.steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=arguments.dtype == "bf16"):
            loss = policy(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {}


def run_child(arguments, job: str, dtype: str, lora: bool) -> dict:
    command = [sys.executable, __file__, "--child", job, "--dtype", dtype, "--steps", str(arguments.steps),
               "--layers", str(arguments.layers), "--width", str(arguments.width), "--batch", str(arguments.batch),
               "--response-length", str(arguments.response_length)] + (["--lora"] if lora else [])
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=48)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--child", choices=["ppo", "sft"])
    arguments = parser.parse_args()
    if arguments.child:  # one measurement per process: Accelerate's state and ru_maxrss are per process
        result = ppo_steps(arguments) if arguments.child == "ppo" else sft_steps(arguments)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if torch.cuda.is_available():
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
        print(json.dumps(result))
        return
    setup = {"layers": arguments.layers, "width": arguments.width, "batch": arguments.batch,
             "response_length": arguments.response_length, "ppo_epochs": 4, "micro_batches": 4,
             "threads": torch.get_num_threads()}
    print(json.dumps({"setup": setup}))
    for dtype in ("fp32", "bf16"):
        print(json.dumps({"dtype": dtype, **run_child(arguments, "ppo", dtype, lora=False)}))
    for lora in (False, True):
        ppo_rss = run_child(arguments, "ppo", "fp32", lora)["peak_rss_mb"]
        sft_rss = run_child(arguments, "sft", "fp32", lora)["peak_rss_mb"]
        print(json.dumps({"memory": "lora" if lora else "full", "ppo_peak_rss_mb": ppo_rss,
                          "sft_peak_rss_mb": sft_rss, "ratio": round(ppo_rss / sft_rss, 2)}))


if __name__ == "__main__":
    main()
