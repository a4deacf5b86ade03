"""Sampling from any stage checkpoint: `rlhf generate` and `rlhf chat`, with or without retrieval from a folder of
documents (`--docs DIR`: pipeline/retrieval/)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, TextStreamer

from data.tokenizer import load_tokenizer
from pipeline.config.parsing import ConfigError
from pipeline.generation.sampling import generate_with_config, sampling_config
from pipeline.train.models import load_causal_lm


@dataclass
class SamplingSettings:
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def validate(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"--temperature: must be positive, got {self.temperature} (use --greedy instead)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k: must not be negative, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: must be within (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max-new-tokens: must be positive, got {self.max_new_tokens}")

    def generation_config(self, tokenizer) -> GenerationConfig:
        """These settings and nothing from the checkpoint's generation_config (see pipeline/generation/sampling.py)."""
        return sampling_config(self.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, self.temperature,
                               self.top_k, self.top_p, greedy=self.greedy)


def load_for_sampling(checkpoint: str):
    """A checkpoint's model and tokenizer, in eval mode."""
    try:
        tokenizer = load_tokenizer(checkpoint)
        model = load_causal_lm(checkpoint, tokenizer)
    except (OSError, ValueError) as error:
        raise ConfigError(f"checkpoint {checkpoint}: cannot be loaded as a causal LM ({str(error).splitlines()[0]})")
    return model.eval(), tokenizer


class Retrieval:
    """`--docs`: the folder's passage index, and each question turned into a prompt holding its best passages."""

    def __init__(self, arguments: argparse.Namespace, checkpoint: str, model, tokenizer, settings: SamplingSettings):
        from pipeline.retrieval.index import build_index
        from pipeline.retrieval.prompts import template_for

        if arguments.passages is not None and arguments.passages < 1:
            raise ConfigError(f"--passages: must be at least 1, got {arguments.passages}")
        self.template = template_for(checkpoint) if arguments.rag_template == "auto" else arguments.rag_template
        self.passages = arguments.passages or (1 if self.template == "story" else 3)
        self.tokenizer = tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = context - settings.max_new_tokens
        self.index, report = build_index(Path(arguments.docs), arguments.embedding, model, tokenizer, checkpoint,
                                         Path(arguments.index_dir) if arguments.index_dir else None)
        print(f"[docs] {report.summary()}", file=sys.stderr)

    def prompt(self, question: str):
        """The augmented prompt (pipeline/retrieval/prompts.py) of a question."""
        from pipeline.retrieval.prompts import augmented_prompt

        return augmented_prompt(question, self.index.search(question, self.passages), self.template, self.tokenizer,
                                self.max_prompt_tokens)


def sources_lines(augmented) -> list[str]:
    """What the answer was read from, one line a passage, and a note when passages were cut to fit."""
    lines = [f"  [{n}] {r.passage.label} (similarity {r.score:.2f})" for n, r in enumerate(augmented.passages, 1)]
    if augmented.cut:
        lines.append(f"  ({augmented.cut} retrieved passage(s) cut or left out to fit the model's context)")
    return ["sources:", *lines] if augmented.passages else ["sources: none fit the model's context"]


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], settings: SamplingSettings, streamer=None) -> list[str]:
    """Answer each user message with the chat template; the same seed gives the same answers."""
    torch.manual_seed(settings.seed)
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        output = generate_with_config(model, ids["input_ids"], ids["attention_mask"],
                                      settings.generation_config(tokenizer), streamer)
        answers.append(tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def settings_from(arguments: argparse.Namespace) -> SamplingSettings:
    settings = SamplingSettings(arguments.greedy, arguments.temperature, arguments.top_k, arguments.top_p,
                                arguments.max_new_tokens, arguments.seed)
    settings.validate()
    return settings


def generate_command(arguments: argparse.Namespace) -> int:
    settings = settings_from(arguments)
    checkpoints = [arguments.checkpoint] + ([arguments.compare] if arguments.compare else [])
    answers, sources = {}, {}
    for checkpoint in checkpoints:
        model, tokenizer = load_for_sampling(checkpoint)
        messages = arguments.prompt
        if arguments.docs:
            retrieval = Retrieval(arguments, checkpoint, model, tokenizer, settings)
            augmented = [retrieval.prompt(question) for question in arguments.prompt]
            messages = [a.message for a in augmented]
            sources[checkpoint] = [sources_lines(a) for a in augmented]
        answers[checkpoint] = generate_responses(model, tokenizer, messages, settings)
    for index, prompt in enumerate(arguments.prompt):
        print(f"### {prompt}")
        for checkpoint in checkpoints:
            label = f"[{checkpoint}] " if len(checkpoints) > 1 else ""
            print(f"{label}{answers[checkpoint][index]}")
            for line in sources.get(checkpoint, [[]] * len(arguments.prompt))[index]:
                print(line)
        print()
    return 0


def chat_command(arguments: argparse.Namespace, read=input) -> int:
    """A chat loop with streaming output; each turn sees the whole conversation so far. Empty line or EOF ends it."""
    settings = settings_from(arguments)
    model, tokenizer = load_for_sampling(arguments.checkpoint)
    retrieval = Retrieval(arguments, arguments.checkpoint, model, tokenizer, settings) if arguments.docs else None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    conversation: list[dict[str, str]] = []
    torch.manual_seed(settings.seed)
    print(f"chatting with {arguments.checkpoint}; an empty line ends the chat")
    while True:
        try:
            message = read("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        augmented = retrieval.prompt(message) if retrieval is not None else None
        conversation.append({"role": "user", "content": augmented.message if augmented else message})
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        context = model.config.max_position_embeddings - settings.max_new_tokens
        ids = {k: v[:, -context:] for k, v in ids.items()}  # the oldest turns fall out of a full context
        print("assistant> ", end="", flush=True)
        with torch.no_grad():
            output = generate_with_config(model, ids["input_ids"], ids["attention_mask"],
                                          settings.generation_config(tokenizer), streamer)
        reply = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        conversation.append({"role": "assistant", "content": reply})
        if augmented is not None:
            print("\n".join(sources_lines(augmented)))
    return 0
