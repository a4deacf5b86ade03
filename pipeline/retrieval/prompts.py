"""Retrieved passages into the prompt, in the form the model knows, cut to fit its context.

- "story": the built-in task's story-question template the pipeline's own policies learned
  ("Read the story and answer the question.\\nStory: ...\\nQuestion: ..."), the passages as the story.
- "chat": one user message for any chat model: the passages, numbered with their sources, then the question.
A checkpoint of a stage that trained on the built-in task (its manifest records no configured dataset: the
default run, or configs/smollm2.yaml's run of a real chat model) gets "story"; any other model gets "chat".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.builtin_task import QA_PREFIX
from pipeline.retrieval.index import Retrieved

TEMPLATES = ("auto", "story", "chat")


@dataclass
class AugmentedPrompt:
    """The user message to answer, the passages it holds, and how many retrieved passages had to be cut."""

    message: str
    passages: list[Retrieved]
    cut: int = 0  # passages left out or shortened so that prompt and answer fit the model's context


def template_for(checkpoint: str | Path) -> str:
    """"story" for a checkpoint of a stage trained on the built-in task (its stage manifest records the stage's
    data settings, and no dataset among them), else "chat"."""
    manifest = Path(checkpoint) / ".." / "manifest.json"
    try:
        config = json.loads(manifest.read_text())["config"]  # the stage's identity: {"data.ppo": ..., ...}
    except (OSError, ValueError, KeyError, TypeError):
        return "chat"
    if not isinstance(config, dict) or "data.builtin" not in config:
        return "chat"
    datasets = [config.get(f"data.{stage}") for stage in ("pretrain", "sft", "reward", "ppo")]
    return "story" if all(dataset is None for dataset in datasets) else "chat"


def render(question: str, passages: list[Retrieved], template: str) -> str:
    if template == "story":
        return f"{QA_PREFIX}{' '.join(r.passage.text for r in passages)}\nQuestion: {question}"
    numbered = "\n".join(f"[{n}] ({r.passage.label}) {r.passage.text}" for n, r in enumerate(passages, 1))
    return f"Answer the question using these passages.\n\n{numbered}\n\nQuestion: {question}"


def augmented_prompt(question: str, retrieved: list[Retrieved], template: str, tokenizer,
                     max_prompt_tokens: int) -> AugmentedPrompt:
    """The question with as many of the retrieved passages (best first) as fit in `max_prompt_tokens` once templated;
    the last one that fits only in part is shortened by words. The question itself is never cut."""
    def length(passages: list[Retrieved]) -> int:
        messages = [{"role": "user", "content": render(question, passages, template)}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])

    kept: list[Retrieved] = []
    for item in retrieved:
        if length(kept + [item]) <= max_prompt_tokens:
            kept.append(item)
            continue
        words = item.passage.text.split()
        low, high = 0, len(words)  # the most words of this passage that still fit
        while low < high:
            middle = (low + high + 1) // 2
            if length(kept + [shortened(item, words[:middle])]) <= max_prompt_tokens:
                low = middle
            else:
                high = middle - 1
        if low:
            kept.append(shortened(item, words[:low]))
        break
    cut = len(retrieved) - sum(1 for a, b in zip(kept, retrieved) if a.passage.text == b.passage.text)
    return AugmentedPrompt(render(question, kept, template), kept, cut)


def shortened(item: Retrieved, words: list[str]) -> Retrieved:
    from dataclasses import replace

    return Retrieved(replace(item.passage, text=" ".join(words)), item.score)
