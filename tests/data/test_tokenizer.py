import pytest

from data.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_bpe_tokenizer

CORPUS = ["Mia had a red kite. She went to the park with her dog.", "Tom saw a fox at the river."] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", ["日本語のテキストです。", "emoji 🙂 and tabs\t\n  spaces", "Mia had a red kite.", "é ß ∑ \x00"])
def test_round_trips_any_utf8(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_are_distinct(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) <= 400


def test_chat_template_marks_assistant_tokens(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure! Hello."}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assistant = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(assistant) == "Sure! Hello." + EOS_TOKEN
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>Hi<|end|><|assistant|>"


def test_save_and_load_keeps_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded("Mia")["input_ids"] == tokenizer("Mia")["input_ids"]


def test_load_refuses_tokenizer_without_chat_template(tokenizer, tmp_path):
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("pad", [None, EOS_TOKEN])
def test_a_loaded_tokenizer_without_pad_or_with_pad_eos_pads_with_eos(tokenizer, tmp_path, pad):
    """No new token: the model keeps its vocabulary; masks, not token values, tell padding from EOS."""
    tokenizer.pad_token = pad
    tokenizer.save_pretrained(tmp_path)
    tokenizer.pad_token = PAD_TOKEN
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == EOS_TOKEN
    assert len(loaded) == len(tokenizer)


def test_our_own_tokenizer_keeps_its_distinct_pad(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == PAD_TOKEN and loaded.pad_token_id != loaded.eos_token_id
