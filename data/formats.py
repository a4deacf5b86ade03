"""Rows of TRL's standard dataset formats → what a stage needs, each row checked and named when it is bad.

Used by SFT (`dialogues_from_rows`), the reward model (`preference_pairs_from_rows`), PPO and the comparison
report (`prompts_from_rows`), and `rlhf run`'s preflight check. `on_bad_rows="error"` stops at the first bad row
with a DataError naming the file, the row (1-based) and the field; `"skip"` drops bad rows and prints one line
with how many and why. Given a tokenizer and max_length, a row too long after templating is a bad row too:
truncating it would cut the answer the stage learns from.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data.loading import DataError, load_source, read_rows
from pipeline.config.schema import DatasetSource
from pipeline.config.validation import looks_like_local_path

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class BadRow(ValueError):
    """Why one row cannot be used; turned into a DataError with the row number by `convert_rows`.
    `kind` groups rows skipped for the same reason in the summary line (default: the message itself)."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind or message


def convert_rows(rows: list[dict[str, Any]], where: str, on_bad_rows: str,
                 convert: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """Apply `convert` to every row; bad rows stop the stage or are skipped with a count, as configured."""
    converted, skipped = [], Counter()
    for number, row in enumerate(rows, start=1):
        try:
            converted.append(convert(row))
        except BadRow as problem:
            if on_bad_rows == "error":
                raise DataError(f"{where} row {number}: {problem} (set data.on_bad_rows=skip to skip bad rows)") from None
            skipped[problem.kind] += 1
    if skipped:
        reasons = "; ".join(f"{count}× {reason}" for reason, count in skipped.most_common(3))
        print(f"[data] {where}: skipped {sum(skipped.values())} of {len(rows)} rows ({reasons})", file=sys.stderr)
    if not converted:
        raise DataError(f"{where}: no usable rows" + (f" ({len(rows)} skipped)" if rows else " (empty)"))
    return converted


def converted_splits(source: DatasetSource, key: str, seed: int, on_bad_rows: str,
                     convert: Callable[[list[dict[str, Any]], str, str], list[Any]]) -> tuple[list[Any], list[Any]]:
    """A configured dataset's (train, eval) rows through `convert` (e.g. `dialogues_from_rows`), a bad row named
    by its row in the file: the held-out share is drawn before conversion, so a local file is first checked
    whole, in file order, when bad rows stop the stage."""
    if on_bad_rows == "error" and looks_like_local_path(source.path):
        convert(read_rows(source.path, key), f"{key} ({source.path})", "error")
    train, evaluation = load_source(source, key, seed)
    return (convert(train, f"{key} ({source.path})", on_bad_rows),
            convert(evaluation, f"{key} ({source.eval_split or source.path + ', held-out share'})", on_bad_rows)
            if evaluation else [])


# ---------------------------------------------------------------- fields
def text_field(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise BadRow(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(f"'{key}' is empty")
    return value


def messages_field(row: dict[str, Any], key: str) -> Messages:
    if key not in row:
        raise BadRow(f"missing field '{key}'")
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"'{key}' must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRow(f"'{key}'[{index}] must be a message with role one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise BadRow(f"'{key}'[{index}] has empty or non-string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def as_prompt(value: Any, key: str = "prompt") -> Messages:
    """A prompt in standard (string) or conversational (messages) form, as messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": text_field({key: value}, key)}]
    return messages_field({key: value}, key)


def as_completion(value: Any, key: str) -> str:
    """A completion in standard (string) or conversational (one assistant message) form, as text."""
    if isinstance(value, str):
        return text_field({key: value}, key)
    messages = messages_field({key: value}, key)
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"'{key}' must end with an assistant message")
    return messages[-1]["content"]


# ---------------------------------------------------------------- token lengths
def prompt_response_ids(tokenizer, prompt: str | Messages, response: str) -> list[int]:
    """Token ids of the templated prompt (ending with the assistant header), the response, then EOS.

    Built the way PPO builds its sequences (prompt ids + sampled ids, stopped by EOS) rather than by templating
    the whole dialogue: some templates add text after the assistant's end-of-turn token, and the reward model
    must be trained on the layout it will score."""
    return ids_of_responses(tokenizer, prompt, [response])[0]


def prompt_token_ids(tokenizer, prompt: str | Messages) -> list[int]:
    """Token ids of a prompt (a user message or a conversation) through the chat template, ending with the
    generation prompt (the assistant header): where every sampler starts and every scored sequence begins."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def ids_of_responses(tokenizer, prompt: str | Messages, responses: list[str]) -> list[list[int]]:
    """`prompt_response_ids` for several responses to one prompt, which is templated once (the slow part)."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    answers = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [prompt_ids + list(answer) + [tokenizer.eos_token_id] for answer in answers]


def check_length(length: int, max_length: int | None, key: str) -> None:
    if max_length is not None and length > max_length:
        raise BadRow(f"{length} tokens after templating, more than max_length={max_length} ({key})",
                     kind=f"longer than max_length={max_length} after templating")


# ---------------------------------------------------------------- SFT: dialogues
def dialogue_from_row(row: dict[str, Any]) -> dict[str, Messages]:
    """A `messages` or prompt-completion row → {"messages": [...]} ending with an assistant turn."""
    if "messages" in row:
        messages = messages_field(row, "messages")
    elif "prompt" in row and "completion" in row:
        messages = as_prompt(row["prompt"]) + [{"role": "assistant", "content": as_completion(row["completion"], "completion")}]
    else:
        raise BadRow("needs 'messages', or 'prompt' and 'completion'")
    if messages[-1]["role"] != "assistant":
        raise BadRow("the last message must be the assistant's (what SFT learns to say)")
    return {"messages": messages}


def dialogues_from_rows(rows: list[dict[str, Any]], where: str, on_bad_rows: str, tokenizer=None,
                        max_length: int | None = None) -> list[dict[str, Messages]]:
    """Messages or prompt-completion rows → {"messages": [...]}; with a tokenizer, longer than max_length is bad."""
    def convert(row: dict[str, Any]) -> dict[str, Messages]:
        dialogue = dialogue_from_row(row)
        if tokenizer is not None:
            ids = tokenizer.apply_chat_template(dialogue["messages"], tokenize=True, return_dict=True)["input_ids"]
            check_length(len(ids), max_length, "the whole dialogue")
        return dialogue

    return convert_rows(rows, where, on_bad_rows, convert)


# ---------------------------------------------------------------- reward model: preference pairs
@dataclass
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str
    group: int  # pairs from one row (one prompt) share a group: they train as one batch element
    rank_gap: int = 1  # how many places apart the two responses were ranked


def ranked_pairs_from_lists(prompt: Messages, ranked: list[str], group: int) -> list[PreferencePair]:
    """All K·(K−1)/2 (better, worse) pairs of a ranked list, best first (InstructGPT)."""
    return [PreferencePair(prompt, ranked[i], ranked[j], group, j - i)
            for i in range(len(ranked)) for j in range(i + 1, len(ranked))]


def split_hh_transcript(text: str) -> tuple[Messages, str]:
    """HH-RLHF's "\\n\\nHuman: …\\n\\nAssistant: …" transcript → (prompt messages, last assistant reply)."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[-2] != "Assistant":
        raise BadRow("transcript does not end with an '\\n\\nAssistant: ' turn")
    turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
             for role, content in zip(parts[1::2], parts[2::2])]
    if any(not turn["content"] for turn in turns[:-1]):
        raise BadRow("transcript has an empty turn")
    if not turns[-1]["content"]:
        raise BadRow("the last assistant turn of the transcript is empty")
    return turns[:-1], turns[-1]["content"]


def split_shared_prefix(chosen: str, rejected: str) -> tuple[Messages, str, str]:
    """A standard implicit-prompt pair ("The sky is blue." / "The sky is green."): the prompt is the text both
    share, cut back to a word boundary so that neither response starts mid-word."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = max(shared.rfind(" "), shared.rfind("\n"))
    if cut <= 0 or not shared[:cut].strip():
        raise BadRow("'chosen' and 'rejected' share no prompt; add a 'prompt' field (implicit prompts must be "
                     "the text both start with)")
    return [{"role": "user", "content": shared[:cut].strip()}], chosen[cut:].strip(), rejected[cut:].strip()


def pairs_of_row(row: dict[str, Any], group: int) -> list[PreferencePair]:
    """The (better, worse) pairs one row holds: a ranked list, or one chosen/rejected pair in any TRL layout."""
    if "ranked_completions" in row:
        if "prompt" not in row:
            raise BadRow("missing field 'prompt'")
        prompt, ranked = as_prompt(row["prompt"]), row["ranked_completions"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise BadRow("'ranked_completions' must list at least 2 completions, best first")
        texts = [as_completion(c, f"ranked_completions[{i}]") for i, c in enumerate(ranked)]
        if len({t.strip() for t in texts}) < len(texts):
            raise BadRow("'ranked_completions' repeats a completion")
        return ranked_pairs_from_lists(prompt, texts, group)
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("needs 'chosen' and 'rejected', or 'prompt' and 'ranked_completions'")
    if "prompt" in row:  # explicit prompt
        prompt = as_prompt(row["prompt"])
        chosen, rejected = as_completion(row["chosen"], "chosen"), as_completion(row["rejected"], "rejected")
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):  # implicit prompt, standard
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
        if HH_TURN.search(chosen):
            prompt, chosen = split_hh_transcript(chosen)
            rejected_prompt, rejected = split_hh_transcript(rejected)
            if rejected_prompt != prompt:
                raise BadRow("'chosen' and 'rejected' transcripts differ before the last assistant turn")
        else:
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    else:  # implicit prompt, conversational: everything before the last assistant message
        chosen_messages, rejected_messages = messages_field(row, "chosen"), messages_field(row, "rejected")
        if chosen_messages[:-1] != rejected_messages[:-1]:
            raise BadRow("'chosen' and 'rejected' differ before their last message (implicit prompt)")
        prompt = chosen_messages[:-1]
        chosen, rejected = as_completion(chosen_messages, "chosen"), as_completion(rejected_messages, "rejected")
        if not prompt:
            raise BadRow("implicit-prompt pair has no prompt messages")
    if chosen.strip() == rejected.strip():
        raise BadRow("'chosen' and 'rejected' are the same")
    if prompt[-1]["role"] == "assistant":
        raise BadRow("the prompt ends with an assistant message; the response must answer a user")
    return [PreferencePair(prompt, chosen, rejected, group)]


def preference_pairs_from_rows(rows: list[dict[str, Any]], where: str, on_bad_rows: str, tokenizer=None,
                               max_length: int | None = None) -> list[PreferencePair]:
    """Chosen/rejected rows (standard or conversational, explicit or implicit prompt, HH-RLHF transcripts) and
    ranked lists → pairs whose `group` is the row index; with a tokenizer, a response longer than max_length
    after templating makes its row bad."""
    def convert(numbered: tuple[int, dict[str, Any]]) -> list[PreferencePair]:
        index, row = numbered
        pairs = pairs_of_row(row, index)
        if tokenizer is not None:
            responses = list({response: None for pair in pairs for response in (pair.chosen, pair.rejected)})
            longest = max(map(len, ids_of_responses(tokenizer, pairs[0].prompt, responses)))
            check_length(longest, max_length, "prompt and longest response")
        return pairs

    groups = convert_rows(list(enumerate(rows)), where, on_bad_rows, convert)
    return [pair for group in groups for pair in group]


# ---------------------------------------------------------------- PPO and evaluation: prompts
def prompt_from_row(row: dict[str, Any]) -> Messages:
    if "prompt" in row:
        prompt = as_prompt(row["prompt"])
    elif "messages" in row:
        prompt = messages_field(row, "messages")
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
    else:
        raise BadRow("needs 'prompt' (or 'messages')")
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow("the prompt must end with a user message")
    return prompt


def prompts_from_rows(rows: list[dict[str, Any]], where: str, on_bad_rows: str) -> list[Messages]:
    """Prompt-only rows (or dialogues without their last assistant turn) → message lists ending with the user."""
    return convert_rows(rows, where, on_bad_rows, prompt_from_row)
