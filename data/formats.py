"""Rows of TRL's standard dataset formats → what a stage needs, each row checked and named when it is bad.

`on_bad_rows="error"` stops at the first bad row with a DataError naming the file, row (1-based) and field;
`"skip"` drops bad rows and prints one line with how many and why.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data.loading import DataError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class BadRow(ValueError):
    """Why one row cannot be used; turned into a DataError with the row number by `convert_rows`."""


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
            skipped[str(problem)] += 1
    if skipped:
        reasons = "; ".join(f"{count}× {reason}" for reason, count in skipped.most_common(3))
        print(f"[data] {where}: skipped {sum(skipped.values())} of {len(rows)} rows ({reasons})", file=sys.stderr)
    if not converted:
        raise DataError(f"{where}: no usable rows" + (f" ({len(rows)} skipped)" if rows else " (empty)"))
    return converted


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


def split_hh_transcript(text: str) -> tuple[Messages, str]:
    """HH-RLHF's "\\n\\nHuman: …\\n\\nAssistant: …" transcript → (prompt messages, last assistant reply)."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[-2] != "Assistant":
        raise BadRow("transcript does not end with an '\\n\\nAssistant: ' turn")
    turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
             for role, content in zip(parts[1::2], parts[2::2])]
    if any(not t["content"] for t in turns[:-1]):
        raise BadRow("transcript has an empty turn")
    return turns[:-1], turns[-1]["content"]


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


def dialogues_from_rows(rows: list[dict[str, Any]], where: str, on_bad_rows: str) -> list[dict[str, Messages]]:
    return convert_rows(rows, where, on_bad_rows, dialogue_from_row)


@dataclass
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str
    group: int  # pairs from one prompt share a group (the row index): they train as one batch element
    rank_gap: int = 1  # how many places apart the two responses were ranked


def ranked_pairs_from_lists(prompt: Messages, ranked: list[str], group: int) -> list[PreferencePair]:
    """All K·(K−1)/2 (better, worse) pairs of a ranked list, best first (InstructGPT)."""
    return [PreferencePair(prompt, ranked[i], ranked[j], group, j - i)
            for i in range(len(ranked)) for j in range(i + 1, len(ranked))]


def preference_pairs_from_row(row: dict[str, Any], group: int) -> list[PreferencePair]:
    if "ranked_completions" in row:
        prompt = as_prompt(row.get("prompt"), "prompt") if "prompt" in row else None
        if prompt is None:
            raise BadRow("missing field 'prompt'")
        ranked = row["ranked_completions"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise BadRow("'ranked_completions' must list at least 2 completions, best first")
        texts = [as_completion(c, f"ranked_completions[{i}]") for i, c in enumerate(ranked)]
        if len(set(texts)) < len(texts):
            raise BadRow("'ranked_completions' repeats a completion")
        return ranked_pairs_from_lists(prompt, texts, group)
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("needs 'chosen' and 'rejected', or 'prompt' and 'ranked_completions'")
    if "prompt" in row:
        prompt, chosen, rejected = as_prompt(row["prompt"]), as_completion(row["chosen"], "chosen"), as_completion(
            row["rejected"], "rejected")
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str) and HH_TURN.search(row["chosen"] or ""):
        prompt, chosen = split_hh_transcript(row["chosen"])
        rejected_prompt, rejected = split_hh_transcript(row["rejected"])
        if rejected_prompt != prompt:
            raise BadRow("'chosen' and 'rejected' transcripts differ before the last assistant turn")
    else:  # implicit prompt, conversational: everything before the last assistant message
        chosen_messages, rejected_messages = messages_field(row, "chosen"), messages_field(row, "rejected")
        if chosen_messages[:-1] != rejected_messages[:-1]:
            raise BadRow("'chosen' and 'rejected' differ before their last message (implicit prompt)")
        prompt, chosen, rejected = chosen_messages[:-1], as_completion(chosen_messages, "chosen"), as_completion(
            rejected_messages, "rejected")
        if not prompt:
            raise BadRow("implicit-prompt pair has no prompt messages")
    if chosen.strip() == rejected.strip():
        raise BadRow("'chosen' and 'rejected' are the same")
    return [PreferencePair(prompt, chosen, rejected, group)]


def preference_pairs_from_rows(rows: list[dict[str, Any]], where: str, on_bad_rows: str) -> list[PreferencePair]:
    """Chosen/rejected rows (standard, conversational, implicit prompt, HH-RLHF transcripts) and ranked lists."""
    groups = convert_rows(list(enumerate(rows)), where, on_bad_rows,
                          lambda numbered: preference_pairs_from_row(numbered[1], numbered[0]))
    return [pair for group in groups for pair in group]


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
