import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.config.loading import load_config
from pipeline.run.checkpoints import COMPLETE_MARKER
from pipeline.run.manifests import read_manifest
from stages.sft import run_sft
from tests.helpers import SMOKE, assert_identical_weights, run_and_kill_when, run_stage

FEW_STEPS = ["sft.max_steps=4", "sft.save_steps=2", "sft.eval_steps=4", "sft.logging_steps=2"]


CHATML = Path(__file__).parents[1] / "data" / "chat_templates" / "smollm2.jinja"


def collated_labels(tokenizer, dialogues: list[list[dict]], tmp_path) -> dict:
    """The batch SFTTrainer collates from the stage's own dataset and arguments."""
    from trl import SFTTrainer

    from pipeline.train.trainer import trainer_arguments, trainer_stage_accelerator
    from stages.sft import training_dataset

    config = load_config(SMOKE, [f"run.output_dir={tmp_path}"])
    accelerator, _ = trainer_stage_accelerator(config, "sft")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    trainer = SFTTrainer(model=model, processing_class=tokenizer,
                         args=trainer_arguments(config, "sft", tmp_path, has_eval=False, accelerator=accelerator,
                                                   assistant_only_loss=False),
                         train_dataset=training_dataset([{"messages": d} for d in dialogues], tokenizer, True, "tiny"))
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(dialogues))])


def test_loss_is_on_assistant_tokens_only(tiny_causal_lm, tmp_path):
    """The labels SFTTrainer collates from the stage's own dataset are -100 on every prompt token."""
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_causal_lm)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Where did Tom go?"},
                {"role": "assistant", "content": "Tom went to the park."}]
    batch = collated_labels(tokenizer, [messages], tmp_path)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_length = len(tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=True)["input_ids"])
    assert (labels[:prompt_length] == -100).all()
    assert torch.equal(labels[prompt_length:], ids[prompt_length:])
    assert tokenizer.decode(ids[prompt_length:]) == "Tom went to the park.<|end|>"  # learning to stop, too


def test_end_of_turn_is_learned_when_pad_is_eos(tmp_path):
    """A ChatML template without {% generation %} markers and pad == EOS (SmolLM2's layout): each answer's
    <|im_end|> is a label in both a short and a padded row; the padding after it is not."""
    from data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["Where did Tom go? Tom went to the park. Hi!"] * 20, 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML.read_text()
    short = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hi!"}]
    long = [{"role": "user", "content": "Where did Tom go?"}, {"role": "assistant", "content": "Tom went to the park."}]
    batch = collated_labels(tokenizer, [short, long], tmp_path)
    for row, answer in ((0, "Hi!"), (1, "Tom went to the park.")):
        labels, mask = batch["labels"][row], batch["attention_mask"][row]
        assert tokenizer.decode(labels[labels != -100]) == answer + "<|im_end|>"
        assert (labels[mask == 0] == -100).all()
    assert (batch["attention_mask"][0] == 0).any()  # the short row was padded, with the EOS id itself


def test_a_template_that_cannot_be_masked_stops_before_training(tiny_causal_lm, tmp_path):
    """Mistral v0.3 moves the system message into the last user turn: one line naming the model, no checkpoint."""
    from data.tokenizer import load_tokenizer
    from pipeline.config.parsing import ConfigError

    model_dir = tmp_path / "mistral-like"
    shutil.copytree(tiny_causal_lm, model_dir)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = (CHATML.parent / "mistral-v0.3-abridged.jinja").read_text()
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "sft.jsonl"
    row = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi!"},
                        {"role": "assistant", "content": "Hi!"}]}
    data.write_text((json.dumps(row) + "\n") * 4)
    overrides = [f"run.output_dir={tmp_path}", f"model.name_or_path={model_dir}", f"tokenizer.name_or_path={model_dir}",
                 "run.stages=[sft]", f"data.sft.path={data}", "data.sft.eval_fraction=0.5"]
    with pytest.raises(ConfigError, match=rf"^sft\.assistant_only_loss: the chat template of {re.escape(str(model_dir))} cannot be "
                                          r"masked: .* changes earlier turns .*assistant_only_loss=false"):
        run_sft(load_config(SMOKE, overrides))
    assert not list((tmp_path / "smoke").glob("sft/checkpoint-*"))


def test_smoke_sft_writes_a_loadable_model_manifest_metrics_and_samples(smoke_run, capfd):
    final = run_sft(load_config(SMOKE, [f"run.output_dir={smoke_run}", *FEW_STEPS]))
    # The console shows one bar with the key figures, not the Trainer's raw log dicts; metrics.jsonl keeps them all.
    console = capfd.readouterr()
    assert "{'loss'" not in console.out + console.err and "{'eval_loss'" not in console.out + console.err
    assert "sft: 100%" in console.err and "eval_loss=" in console.err
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2
    manifest = read_manifest(final.parent)
    assert manifest["status"] == "finished" and manifest["steps"] == 4
    assert manifest["input_checkpoint"].endswith("pretrain/final") and manifest["metrics"]["eval_loss"] > 0
    assert sorted(p.name for p in final.parent.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((p / COMPLETE_MARKER).is_file() for p in final.parent.glob("checkpoint-*"))
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]
    assert any("eval_loss" in m for m in metrics) and not any("train_runtime" in m for m in metrics)
    samples = next(m["samples"] for m in metrics if "samples" in m)
    assert len(samples) == 1 and samples[0]["prompt"] and isinstance(samples[0]["response"], str)
    logged = (final.parent / "metrics.jsonl").read_text()
    assert run_sft(load_config(SMOKE, [f"run.output_dir={smoke_run}", *FEW_STEPS])) == final  # finished: skipped
    assert (final.parent / "metrics.jsonl").read_text() == logged  # and its metrics log is kept whole


def test_lora_saves_a_merged_full_model_or_the_adapter_alone(smoke_run):
    lora = [f"run.output_dir={smoke_run}", "sft.max_steps=2", "sft.save_steps=2", "sft.peft={r: 4, lora_alpha: 8}",
            "sft.learning_rate=1e-2", "data.builtin.sft_eval_dialogues=8"]
    final = run_sft(load_config(SMOKE, lora))
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(smoke_run / "smoke" / "pretrain" / "final").state_dict()
    trained = merged.state_dict()
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])

    shutil.rmtree(final.parent)
    adapter_dir = run_sft(load_config(SMOKE, lora + ["sft.save_adapter_only=true"]))
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    with_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir)  # transformers finds the base through peft
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-4)


def test_packing_trains(smoke_run):
    final = run_sft(load_config(SMOKE, [f"run.output_dir={smoke_run}", "sft.max_steps=2", "sft.save_steps=2",
                                        "sft.packing=true", "data.builtin.sft_eval_dialogues=8"]))
    assert read_manifest(final.parent)["steps"] == 2


def test_a_bad_row_stops_before_training_or_is_skipped(smoke_run, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "Say hi.", "completion": "Hi!"}] * 20 + [{"prompt": "Say hi.", "completion": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"run.output_dir={smoke_run}", f"data.sft.path={data}", "data.sft.eval_fraction=0.1",
                 "sft.max_steps=2", "sft.save_steps=2"]
    with pytest.raises(ValueError, match=r"sft\.jsonl\) row 21: 'completion' is empty"):
        run_sft(load_config(SMOKE, overrides))
    assert not (smoke_run / "smoke" / "sft").exists()
    final = run_sft(load_config(SMOKE, overrides + ["data.on_bad_rows=skip"]))
    assert "skipped 1 of" in capsys.readouterr().err
    assert read_manifest(final.parent)["train_dialogues"] + read_manifest(final.parent)["eval_dialogues"] == 20


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(smoke_pretrained, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(smoke_pretrained / "smoke", tmp_path / name / "smoke")
    overrides = ["sft.max_steps=12", "sft.save_steps=4", "sft.eval_steps=6", "sft.logging_steps=2"]
    result = run_stage("sft", f"run.output_dir={tmp_path / 'a'}", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    stage_dir = tmp_path / "b" / "smoke" / "sft"
    run_and_kill_when("sft", (stage_dir / "checkpoint-4" / COMPLETE_MARKER).is_file, f"run.output_dir={tmp_path / 'b'}",
                      *overrides)
    assert not (stage_dir / "final").exists()
    result = run_stage("sft", f"run.output_dir={tmp_path / 'b'}", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout
    assert_identical_weights(tmp_path / "a" / "smoke" / "sft" / "final", stage_dir / "final")
    metrics = [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line)["step"] for line in (tmp_path / "a" / "smoke" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == reference  # cut back to the checkpoint, then continued: no step logged twice


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(smoke_run):
    result = run_stage("sft", f"run.output_dir={smoke_run}", "sft.max_steps=4", "sft.save_steps=2",
                       "sft.eval_steps=4", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(smoke_run / "smoke" / "sft")
    assert manifest["status"] == "finished" and manifest["steps"] == 4
    assert AutoModelForCausalLM.from_pretrained(smoke_run / "smoke" / "sft" / "final") is not None
