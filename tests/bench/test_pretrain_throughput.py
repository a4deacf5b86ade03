import json
import math

import pytest
import torch
from pretrain_throughput import (
    WARMUP_STEPS, break_even_steps, characters_per_token_id, flops_per_token, matmul_peak, nanogpt_split,
    nats_per_character, shakespeare, throughput, tokens_per_second, write_text_rows)

from data.loading import read_rows
from data.tokenizer import train_bpe_tokenizer
from stages.pretrain import packed_blocks

SMALL = ["model.num_hidden_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
         "model.intermediate_size=64"]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 30


def test_the_held_out_text_is_the_last_tenth_as_one_block():
    train, held_out = nanogpt_split("abcdefghij" * 3)
    assert (train, held_out) == ("abcdefghij" * 2 + "abcdefg", "hij")
    # tinyshakespeare's length: nanoGPT's prepare.py reports 1,003,854 train and 111,540 val characters
    train, held_out = nanogpt_split("x" * 1_115_394)
    assert (len(train), len(held_out)) == (1_003_854, 111_540)


def test_token_character_counts_add_up_to_the_text():
    tokenizer = train_bpe_tokenizer([TEXT], 300)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    counts = characters_per_token_id(tokenizer)
    assert int(counts[ids].sum()) == len(TEXT)
    assert int(counts[tokenizer.eos_token_id]) == 0


def test_nats_per_character_divides_the_predicted_tokens_nats_by_their_characters():
    tokenizer = train_bpe_tokenizer([TEXT], 300)
    blocks = packed_blocks([TEXT], tokenizer, 16)
    counts = characters_per_token_id(tokenizer)
    predicted_characters = int(counts[blocks[:, 1:]].sum())
    expected = 2.0 * blocks[:, 1:].numel() / predicted_characters
    assert nats_per_character(2.0, blocks, tokenizer) == pytest.approx(expected)
    # BPE tokens span several characters, so a token's nats spread over them
    assert nats_per_character(2.0, blocks, tokenizer) < 2.0


def test_tokens_per_second_skips_warm_up_steps():
    assert tokens_per_second([10.0, 1.0, 1.0], 100) == pytest.approx(25.0)
    assert tokens_per_second([10.0, 1.0, 1.0], 100, skip=1) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no steps left"):
        tokens_per_second([1.0], 100, skip=1)


def test_text_rows_keep_the_text_one_unbroken_document(tmp_path):
    rows = read_rows(write_text_rows(tmp_path / "t.jsonl", TEXT))
    assert rows == [{"text": TEXT}]


def test_flops_and_peak_are_positive_and_scale():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    parameters = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 8) == 6 * parameters + 12 * 16 * 8
    assert matmul_peak(torch.float32, size=64, repeats=2) > 1e6


def test_compile_pays_for_itself_once_the_saved_step_time_covers_its_warm_up():
    # 100 tokens a step: eager 1.0 s a step, compiled 0.5 s; warm-up took 10 s more than eager's would have.
    first_warmup_s = WARMUP_STEPS * 1.0 + 10.0
    assert break_even_steps(first_warmup_s, 100, eager_tokens_per_s=100, compiled_tokens_per_s=200) == WARMUP_STEPS + 20
    assert break_even_steps(first_warmup_s, 100, eager_tokens_per_s=100, compiled_tokens_per_s=90) is None


@pytest.mark.slow
def test_stage_minimal_and_compiled_loops_run_on_one_setup(tmp_path, monkeypatch):
    real_compile = torch.compile  # aot_eager: the bench's timing logic, without inductor's ~30 s of code generation
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    result = throughput(steps=5, rounds=1, bf16=False, compile_too=True, scratch=tmp_path, overrides=SMALL + [
        "data.builtin.pretrain_stories=200", "tokenizer.training_texts=200", "tokenizer.vocab_size=300",
        "pretrain.seq_length=32"])
    assert result["stage_tokens_per_s"] > 0 and result["minimal_tokens_per_s"] > 0
    assert set(result["runs_tokens_per_s"]) == {"stage", "minimal", "minimal_eager_warm", "minimal_compiled_warm"}
    assert result["compiled_over_eager"] > 0 and result["compile_warmup_s"] > 0
    assert result["compile_first_warmup_s"] >= result["compile_warmup_s"]
    assert 0 < result["stage_mfu"] < 1


@pytest.mark.slow
def test_shakespeare_holds_out_the_last_tenth_and_reports_per_character(tmp_path):
    corpus = tmp_path / "input.txt"
    corpus.write_text(TEXT * 4, encoding="utf-8")
    result = shakespeare(corpus, tmp_path, max_steps=5, overrides=SMALL)
    assert result["held_out_characters"] == len(TEXT * 4) - int(len(TEXT * 4) * 0.9)
    assert result["steps"] == 5
    assert result["bits_per_char"] == pytest.approx(result["nats_per_char"] / math.log(2), abs=1e-3)
    assert 0 < result["nats_per_char"] < result["eval_loss_nats_per_token"]
    assert json.dumps(result)
