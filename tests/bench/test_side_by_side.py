import argparse
import io
import json
import os
from dataclasses import asdict

import pytest
import torch
from side_by_side import (
    PPOBenchShape, add_shape_arguments, llama_models, machine_description, main, median_summary, random_prompts,
    setup_of, shape_from_arguments, shape_problem, special_tokens_tokenizer)

TINY = PPOBenchShape(vocab_size=40, layers=1, hidden_size=16, heads=2, ffn=32, prompt_length=3, batch=4,
                     response_length=4, epochs=1, minibatches=1, micro_batches=2, steps=2)


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    return parser.parse_args(list(flags))


def test_the_default_shape_is_issue_13s_anchor():
    shape = shape_from_arguments(parse())
    assert (shape.vocab_size, shape.layers, shape.hidden_size, shape.heads, shape.ffn) == (4096, 4, 128, 2, 320)
    assert (shape.batch, shape.prompt_length, shape.response_length, shape.dtype) == (64, 24, 48, "fp32")
    assert (shape.epochs, shape.minibatches, shape.micro_batches, shape.micro_batch_size) == (4, 1, 4, 16)


def test_flags_set_every_field():
    shape = shape_from_arguments(parse("--vocab-size", "100", "--heads", "4", "--ffn", "64", "--batch", "8",
                                       "--minibatches", "2", "--micro-batches", "2", "--dtype", "bf16"))
    assert (shape.vocab_size, shape.heads, shape.ffn, shape.dtype, shape.micro_batch_size) == (100, 4, 64, "bf16", 2)


@pytest.mark.parametrize("change, flag", [
    ({"batch": 10}, "--batch"), ({"hidden_size": 129}, "--hidden-size"), ({"epochs": 0}, "--epochs"),
    ({"vocab_size": 2}, "--vocab-size")])
def test_a_shape_that_cannot_run_names_its_flag(change, flag):
    assert flag in shape_problem(PPOBenchShape(**change))
    assert shape_problem(PPOBenchShape()) is None


def test_a_bad_flag_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        shape_from_arguments(parse("--batch", "10"))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_models_share_one_initialisation_and_the_shape():
    tokenizer = special_tokens_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    models = llama_models(TINY, tokenizer)
    again = llama_models(TINY, tokenizer)
    for name, model in models.items():
        for (key, value), other in zip(model.state_dict().items(), again[name].state_dict().values()):
            assert torch.equal(value, other), (name, key)
    assert all(torch.equal(a, b) for a, b in zip(models["policy"].parameters(), models["reference"].parameters()))
    assert models["policy"].config.vocab_size == 40 and models["policy"].config.intermediate_size == 32
    assert models["value"].config.num_labels == 1 and models["reward"].score.out_features == 1


def test_prompts_are_one_fixed_length_batch_per_step_without_pad_or_eos():
    prompts = random_prompts(TINY)
    assert prompts.shape == (TINY.batch * (TINY.steps + 1), TINY.prompt_length)
    assert int(prompts.min()) >= 2 and int(prompts.max()) < TINY.vocab_size
    assert torch.equal(prompts, random_prompts(TINY))


def test_machine_description_names_date_cores_and_cpu():
    machine = machine_description()
    assert machine["nproc"] == len(os.sched_getaffinity(0))
    assert machine["cpu"] and len(machine["date"]) == 10


def record(impl: str, seconds: float, length: float = 47.8) -> dict:
    return {"impl": impl, "sec_per_step": seconds, "mean_response_tokens": length, "dtype": "fp32"}


def test_summary_is_the_ratio_of_medians():
    summary = median_summary([record("ours", 3.0), record("trl-0.19.1", 4.0), record("ours", 2.0),
                              record("trl-0.19.1", 3.0), record("ours", 9.0), record("trl-0.19.1", 5.0)])
    assert summary["ours"]["median_sec_per_step"] == 3.0 and summary["trl-0.19.1"]["median_sec_per_step"] == 4.0
    assert summary["ratio_ours_over_trl"] == 0.75 and summary["same_response_length"]


def test_summary_flags_unequal_work_and_refuses_one_side():
    assert not median_summary([record("ours", 3.0, 30.0), record("trl-0.19.1", 4.0, 47.9)])["same_response_length"]
    with pytest.raises(ValueError, match="trl-0.19.1"):
        median_summary([record("ours", 3.0)])


def summary_output(monkeypatch, capsys, records: list[dict]) -> str:
    # the benches' readable lines and TRL's printed metrics surround the JSON results
    lines = "ours: a readable line\n{'eps': 0}\n" + "\n".join(json.dumps(r) for r in records)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "summary"])
    main()
    return capsys.readouterr().out


def test_summary_command_judges_the_goal_only_on_the_anchor_setup(monkeypatch, capsys):
    anchor = {**asdict(PPOBenchShape()), "steps": 3}
    output = summary_output(monkeypatch, capsys, [{**anchor, **record("ours", 3.3)},
                                                  {**anchor, **record("trl-0.19.1", 3.0)}])
    assert "ratio ours/TRL (medians): 1.100" in output and "≤ 0.75: not met" in output
    output = summary_output(monkeypatch, capsys, [{**anchor, **record("ours", 2.0)},
                                                  {**anchor, **record("trl-0.19.1", 3.0)}])
    assert "≤ 0.75: met" in output
    output = summary_output(monkeypatch, capsys, [{**asdict(TINY), **record("ours", 2.0)},
                                                  {**asdict(TINY), **record("trl-0.19.1", 3.0)}])
    assert "ratio ours/TRL (medians): 0.667" in output and "goal" not in output


def test_the_smollm2_preset_is_its_architecture_at_batch_8_and_flags_still_override():
    shape = shape_from_arguments(parse("--preset", "smollm2"))
    assert (shape.vocab_size, shape.layers, shape.hidden_size, shape.heads, shape.key_value_heads, shape.ffn) == (
        49152, 30, 576, 9, 3, 1536)
    assert (shape.batch, shape.response_length, shape.prompt_length, shape.epochs) == (8, 32, 24, 4)
    assert shape_from_arguments(parse("--preset", "smollm2", "--batch", "4")).batch == 4
    assert setup_of(asdict(shape)) == "smollm2" and setup_of(asdict(PPOBenchShape(dtype="bf16"))) == "anchor"
    assert setup_of(asdict(PPOBenchShape(batch=32))) is None
    assert "--kv-heads" in shape_problem(PPOBenchShape(heads=4, kv_heads=3, hidden_size=128))


def test_kv_heads_make_a_grouped_query_attention_model():
    models = llama_models(PPOBenchShape(vocab_size=40, layers=1, hidden_size=16, heads=4, kv_heads=2, ffn=32),
                          special_tokens_tokenizer())
    attention = models["policy"].model.layers[0].self_attn
    assert attention.k_proj.out_features == 2 * 4 and attention.q_proj.out_features == 16
