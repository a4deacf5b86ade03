"""Which tokens of a templated dialogue the assistant said, for any chat template, by rendering prefixes.

SFT's loss belongs on the assistant's tokens only. TRL finds them through `{% generation %}` markers in the
chat template, which few real templates have (SmolLM2's, Llama 3's, Qwen2.5's, Mistral's do not), and it can
patch only the templates it knows. Here the tokens are found from the template itself: for the assistant turn
at position k, render messages[:k] with the generation prompt (exactly what PPO and generation feed the model)
and messages[:k+1]; the tokens between the two are what the model must produce for that turn.

What is learned of a turn: its content and the end-of-turn token that stops generation (the tokenizer's EOS),
nothing after it. ChatML writes "<|im_end|>\\n": the newline is never generated (sampling stops at <|im_end|>),
so it is not trained on, like the next turn's header.

This needs a template that keeps earlier turns unchanged when a turn is added (each rendered prefix is a
prefix of the whole dialogue's tokens). A template that rewrites earlier turns (Mistral v0.3 moves the system
message to the last user turn; reasoning templates drop earlier thoughts) raises UnmaskableTemplate; so does
one whose assistant turns do not end with EOS, since a model trained on it could never stop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.config.parsing import ConfigError

Messages = list[dict[str, Any]]


class UnmaskableTemplate(ValueError):
    """The chat template does not let the assistant's tokens be found by rendering prefixes."""


def templated_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=True)
    return list(encoded["input_ids"])


def assistant_token_mask(tokenizer, messages: Messages) -> dict[str, list[int]]:
    """{"input_ids": the whole templated dialogue, "assistant_masks": 1 exactly on each assistant turn's content
    and its end-of-turn token (the tokenizer's EOS), 0 elsewhere}; UnmaskableTemplate when that cannot be found."""
    end_of_turn = tokenizer.eos_token_id
    input_ids = templated_ids(tokenizer, messages)
    mask = [0] * len(input_ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = templated_ids(tokenizer, messages[:k], add_generation_prompt=True)
        with_turn = templated_ids(tokenizer, messages[: k + 1])
        if input_ids[: len(with_turn)] != with_turn or with_turn[: len(prompt)] != prompt:
            raise UnmaskableTemplate(
                f"rendering the dialogue up to its message {k} gives tokens that the whole dialogue does not start "
                f"with: the template changes earlier turns when a turn is added")
        turn = with_turn[len(prompt):]
        if end_of_turn not in turn:
            raise UnmaskableTemplate(
                f"the template does not end assistant turns with the EOS token {tokenizer.eos_token!r}, so a model "
                f"trained on it would never stop")
        last = len(turn) - 1 - turn[::-1].index(end_of_turn)
        mask[len(prompt): len(prompt) + last + 1] = [1] * (last + 1)
    return {"input_ids": input_ids, "assistant_masks": mask}


def assistant_token_masks(tokenizer, dialogues: Iterable[Messages], model_name: str) -> list[dict[str, list[int]]]:
    """`assistant_token_mask` of each dialogue; a template that cannot be masked is a ConfigError naming the
    setting and the model (`model_name`), raised by the SFT stage and, before anything is written, by preflight."""
    try:
        return [assistant_token_mask(tokenizer, messages) for messages in dialogues]
    except UnmaskableTemplate as problem:
        raise ConfigError(f"sft.assistant_only_loss: the chat template of {model_name} cannot be masked: {problem}; "
                          f"set sft.assistant_only_loss=false to train on whole dialogues") from None
