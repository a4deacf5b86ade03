"""Assistant-token masks from rendered prefixes, on the real chat templates of five model families.

Each template in tests/data/chat_templates/ runs on a small byte-level BPE with Llama 3's pre-tokenizer
pattern (the hub tokenizers are not available offline), given that family's special tokens; SmolLM2's real
tokenizer is tested in tests/test_real_model.py.
"""

from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.assistant_masks import UnmaskableTemplate, assistant_token_mask
from data.tokenizer import EOS_TOKEN, train_bpe_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
# Llama 3's split pattern (Qwen2's differs only in grouping digits): newlines are pieces of their own.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["The capital of France is Paris.\n\nWhat is the capital of Spain? Madrid, of course!\n",
          "You are a helpful assistant. Tell me a story about Mia and a red kite. [INST] Hi [/INST]"] * 30
# template file: (bos, eos, other special tokens)
FAMILIES = {
    "smollm2": ("<|im_start|>", "<|im_end|>", ["<|endoftext|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]),
    "qwen2.5": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
    "mistral-v0.1": ("<s>", "</s>", []),
    # Gemma's tokenizer says EOS is <eos>, but its turns end with <end_of_turn>, which is what it emits.
    "gemma": ("<bos>", "<end_of_turn>", ["<start_of_turn>", "<eos>"]),
}
# After the family's BOS / system prompt, what each template renders: no system turn where it has none.
WITH_SYSTEM = {"smollm2", "llama3", "qwen2.5"}
DIALOGUE = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Spain?"},
            {"role": "assistant", "content": "Madrid, of course!\n\nHope this helps."}]


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    bos, eos, others = FAMILIES[name]
    specials = [token for token in (bos, eos, *others) if token]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                      additional_special_tokens=others, clean_up_tokenization_spaces=False)
    wrapped.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return wrapped


def masked_spans(tokenizer, encoded: dict[str, list[int]]) -> list[str]:
    """The text of each run of masked tokens."""
    spans, current = [], []
    for token, keep in zip(encoded["input_ids"], encoded["assistant_masks"]):
        if keep:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masks_exactly_each_assistant_turns_content_and_end_of_turn_token(family):
    tokenizer = family_tokenizer(family)
    dialogue = ([{"role": "system", "content": "Answer briefly."}] if family in WITH_SYSTEM else []) + DIALOGUE
    encoded = assistant_token_mask(tokenizer, dialogue)
    assert encoded["input_ids"] == tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=True)["input_ids"]
    eos = tokenizer.eos_token
    assert masked_spans(tokenizer, encoded) == [m["content"] + eos for m in dialogue if m["role"] == "assistant"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_turn_starts_right_after_the_prompt_generation_sees(family):
    """The tokens before a masked turn are exactly the templated prompt with the generation header, as PPO
    and `generate` feed it: SFT trains on the layout the model is sampled in."""
    tokenizer = family_tokenizer(family)
    encoded = assistant_token_mask(tokenizer, DIALOGUE)
    mask = encoded["assistant_masks"]
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    prompts = [tokenizer.apply_chat_template(DIALOGUE[:k], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for k in (1, 3)]
    assert [encoded["input_ids"][:start] for start in starts] == prompts


def test_the_newline_after_chatml_end_of_turn_is_not_learned():
    tokenizer = family_tokenizer("smollm2")
    encoded = assistant_token_mask(tokenizer, DIALOGUE[:2])
    last_masked = max(i for i, keep in enumerate(encoded["assistant_masks"]) if keep)
    assert tokenizer.decode(encoded["input_ids"][last_masked:]) == "<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked():
    tokenizer = family_tokenizer("mistral-v0.1")
    tokenizer.chat_template = (TEMPLATES / "mistral-v0.3-abridged.jinja").read_text()
    assert masked_spans(tokenizer, assistant_token_mask(tokenizer, DIALOGUE)) == [
        " " + m["content"] + "</s>" for m in DIALOGUE if m["role"] == "assistant"]  # fine without a system message
    with pytest.raises(UnmaskableTemplate, match="changes earlier turns"):
        assistant_token_mask(tokenizer, [{"role": "system", "content": "Answer briefly."}, *DIALOGUE])


def test_turns_that_do_not_end_with_eos_cannot_be_masked():
    tokenizer = family_tokenizer("gemma")
    tokenizer.eos_token = "<eos>"  # Gemma's tokenizer as shipped: its turns end with <end_of_turn>
    with pytest.raises(UnmaskableTemplate, match="does not end assistant turns with the EOS token '<eos>'"):
        assistant_token_mask(tokenizer, DIALOGUE)


def test_agrees_with_the_generation_markers_of_our_own_template():
    tokenizer = train_bpe_tokenizer(CORPUS, 300)
    dialogue = [{"role": "system", "content": "Be kind."}, *DIALOGUE]
    marked = tokenizer.apply_chat_template(dialogue, return_dict=True, return_assistant_tokens_mask=True)
    assert assistant_token_mask(tokenizer, dialogue) == {"input_ids": list(marked["input_ids"]),
                                                         "assistant_masks": list(marked["assistant_masks"])}
    assert masked_spans(tokenizer, assistant_token_mask(tokenizer, dialogue))[0].endswith(EOS_TOKEN)
