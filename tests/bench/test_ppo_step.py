import argparse

import pytest
import torch
from ppo_step import peak_rss_of_child, ppo_settings, sft_steps, shape_flags, time_ppo_steps
from side_by_side import PPOBenchShape, add_shape_arguments, shape_from_arguments
from trl_ppo_step import trl_ppo_config_fields

TINY = PPOBenchShape(vocab_size=40, layers=1, hidden_size=16, heads=2, ffn=32, prompt_length=3, batch=8,
                     response_length=4, epochs=2, minibatches=2, micro_batches=2, steps=1)


def test_ours_and_trl_get_the_same_batch_split():
    from stages.ppo import rollout_batch_size

    settings = ppo_settings(TINY)
    trl = trl_ppo_config_fields(TINY, "/tmp/unused", cpu=True)
    assert rollout_batch_size(settings) == TINY.batch
    split = trl["per_device_train_batch_size"], trl["gradient_accumulation_steps"], trl["num_mini_batches"]
    assert split[0] * split[1] * split[2] == TINY.batch
    for ours, theirs in [("per_device_train_batch_size", "per_device_train_batch_size"),
                         ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                         ("num_mini_batches", "num_mini_batches"), ("num_ppo_epochs", "num_ppo_epochs"),
                         ("response_length", "response_length"), ("temperature", "temperature"),
                         ("missing_eos_penalty", "missing_eos_penalty"), ("kl_coef", "kl_coef"),
                         ("local_rollout_forward_batch_size", "local_rollout_forward_batch_size")]:
        assert getattr(settings, ours) == trl[theirs], ours
    assert trl["total_episodes"] == TINY.batch * (TINY.steps + 1)  # the warm-up step and the timed ones
    assert trl["bf16"] is False and settings.bf16 is False


def test_shape_flags_reproduce_the_shape():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    assert shape_from_arguments(parser.parse_args(shape_flags(TINY))) == TINY


def test_a_timed_step_runs_our_stage_code_and_splits_its_time():
    result = time_ppo_steps(TINY)
    assert result["steps_timed"] == TINY.steps
    phases = result["rollout"] + result["scoring"] + result["optimisation"]
    assert result["sec_per_step"] == pytest.approx(phases, abs=0.01)
    assert min(result["rollout"], result["scoring"], result["optimisation"]) > 0
    assert 1 <= result["mean_response_tokens"] <= TINY.response_length


def test_bf16_and_lora_steps_run():
    bf16 = PPOBenchShape(**{**TINY.__dict__, "dtype": "bf16"})
    assert time_ppo_steps(bf16, lora=True)["steps_timed"] == 1


def test_sft_steps_train_the_policy_alone():
    from side_by_side import llama_models, special_tokens_tokenizer

    initial = llama_models(TINY, special_tokens_tokenizer())["policy"]
    trained = sft_steps(TINY, lora=False)
    changed = [not torch.equal(a, b) for a, b in zip(initial.parameters(), trained.parameters())]
    assert any(changed)


@pytest.mark.slow
def test_peak_rss_is_measured_in_a_child_process():
    assert 50 < peak_rss_of_child(TINY, "sft", lora=False) < 8000
