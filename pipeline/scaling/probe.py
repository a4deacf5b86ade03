"""The reading probe: can a pretrained model learn to answer a story question from the story?

A base model pretrained on the built-in stories has never seen a question answered (its corpus states each fact
once), so asking it directly measures the format, not reading. The probe instead fine-tunes a copy on story
questions of the training part of the prompt space (story, question, then the right answer sentence; loss on the
answer only) for a fixed number of steps, the same for every sweep point, and asks held-out questions greedily;
the gold judge says whether the answer names the story's value and no other (`story_answer_correct`). What it
measures is what SFT can build on: the default run's reward model and PPO lose most where this fails.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from data.builtin_task import core_response, draw_prompt
from data.gold_judge import story_answer_correct
from data.tokenizer import load_tokenizer
from pipeline.generation.padding import pad_sequences
from pipeline.generation.sampling import sample_token_ids, sampling_config
from pipeline.train.models import load_causal_lm

ANSWER_CUE = "\nAnswer: "


def story_questions(seed: int, count: int, held_out: bool) -> list[tuple[str, str]]:
    """(prompt, right answer sentence) of `count` story_qa prompts of the training or the held-out part."""
    rng = random.Random(seed)
    questions = []
    while len(questions) < count:
        family, prompt = draw_prompt(rng, held_out)
        if family == "story_qa":
            questions.append((prompt, core_response(prompt, rng)[0]))
    return questions


def probe_batches(tokenizer, questions: list[tuple[str, str]], batch_size: int, steps: int, seed: int,
                  context: int):
    """(input_ids, attention_mask, labels) per step: prompt and answer, the loss on the answer and its EOS only."""
    rng = random.Random(seed)
    encoded = []
    for prompt, answer in questions:
        prompt_ids = tokenizer(prompt + ANSWER_CUE, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(answer_ids) <= context:
            encoded.append((prompt_ids, answer_ids))
    for _ in range(steps):
        chosen = rng.sample(encoded, min(batch_size, len(encoded)))
        ids, mask = pad_sequences([p + a for p, a in chosen], tokenizer.pad_token_id, "right")
        labels = torch.full_like(ids, -100)
        for row, (prompt_ids, answer_ids) in enumerate(chosen):
            labels[row, len(prompt_ids): len(prompt_ids) + len(answer_ids)] = torch.tensor(answer_ids)
        yield ids, mask, labels


def reading_probe(model_dir: Path, tokenizer_dir: Path, steps: int, questions: int, seed: int,
                  learning_rate: float = 1e-3, batch_size: int = 16) -> dict:
    """Fine-tune a copy of the model on story questions for `steps` steps, then the share of `questions` held-out
    story questions it answers right (gold judge), with the first few answers to read."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_causal_lm(model_dir, tokenizer)
    context = model.config.max_position_embeddings
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    training = story_questions(seed, max(2000, batch_size * 4), held_out=False)
    for step, (ids, mask, labels) in enumerate(probe_batches(tokenizer, training, batch_size, steps, seed, context)):
        for group in optimizer.param_groups:  # a short warmup: a fresh optimizer's first steps are its largest
            group["lr"] = learning_rate * min(1.0, (step + 1) / 10)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    asked = story_questions(seed + 1, questions, held_out=True)
    prompts = [tokenizer(prompt + ANSWER_CUE, add_special_tokens=False)["input_ids"] for prompt, _ in asked]
    config = sampling_config(16, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    with torch.no_grad():
        responses = sample_token_ids(model, prompts, config, batch_size=64)
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in responses]
    right = [story_answer_correct(prompt, answer) for (prompt, _), answer in zip(asked, answers)]
    return {"accuracy": sum(right) / len(right), "questions": len(right), "steps": steps,
            "final_train_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4) if losses else None,
            "examples": [{"prompt": prompt, "answer": answer, "right": ok}
                         for (prompt, _), answer, ok in list(zip(asked, answers, right))[:3]]}
