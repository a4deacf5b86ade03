import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.checkpoints import COMPLETE_MARKER, read_manifest
from pipeline.config import load_config
from stages.sft import run_sft
from tests.helpers import SMOKE, assert_identical_weights, run_and_kill_when, run_stage

FEW_STEPS = ["sft.max_steps=4", "sft.save_steps=2", "sft.eval_steps=4", "sft.logging_steps=2"]


def test_loss_is_on_assistant_tokens_only(tiny_causal_lm, tmp_path):
    """The labels SFTTrainer collates from the stage's own arguments are -100 on every prompt token."""
    from datasets import Dataset
    from trl import SFTTrainer

    from data.tokenizer import load_tokenizer
    from pipeline.hf_trainer import trainer_arguments
    from pipeline.models import load_causal_lm

    tokenizer = load_tokenizer(tiny_causal_lm)
    config = load_config(SMOKE, [f"run.output_dir={tmp_path}"])
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Where did Tom go?"},
                {"role": "assistant", "content": "Tom went to the park."}]
    trainer = SFTTrainer(model=load_causal_lm(tiny_causal_lm, tokenizer), processing_class=tokenizer,
                         args=trainer_arguments(config, "sft", tmp_path, has_eval=False),
                         train_dataset=Dataset.from_list([{"messages": messages}]))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_length = len(tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=True)["input_ids"])
    assert (labels[:prompt_length] == -100).all()
    assert torch.equal(labels[prompt_length:], ids[prompt_length:])
    assert tokenizer.decode(ids[prompt_length:]) == "Tom went to the park.<|end|>"  # learning to stop, too


def test_smoke_sft_writes_a_loadable_model_manifest_metrics_and_samples(smoke_run):
    final = run_sft(load_config(SMOKE, [f"run.output_dir={smoke_run}", *FEW_STEPS]))
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
    assert run_sft(load_config(SMOKE, [f"run.output_dir={smoke_run}", *FEW_STEPS])) == final  # finished: skipped


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
