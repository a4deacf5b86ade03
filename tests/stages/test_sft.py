import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.checkpoints import COMPLETE_MARKER, read_manifest
from pipeline.config import load_config
from stages.sft import run_sft
from tests.helpers import SMOKE, assert_identical_weights, run_and_kill_when, run_stage


def test_sft_trains_on_assistant_tokens_only(smoke_run):
    """The collated labels are -100 on every prompt token and equal the input on the answer."""
    from trl import SFTTrainer  # noqa: F401  (the trainer's own collator is what we check)
    from datasets import Dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(smoke_run / "smoke" / "pretrain" / "final")
    messages = [{"role": "user", "content": "Write a story."}, {"role": "assistant", "content": "Mia had a kite."}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": encoded["input_ids"], "assistant_masks": encoded["assistant_masks"]}])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    prompt_length = len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"])
    assert (labels[:prompt_length] == -100).all()
    assert torch.equal(labels[prompt_length:], ids[prompt_length:])
    assert tokenizer.decode(ids[prompt_length:]) == "Mia had a kite.<|end|>"


def test_sft_smoke_run_writes_a_loadable_model_and_manifest(smoke_run):
    config = load_config(SMOKE, [f"run.output_dir={smoke_run}", "sft.max_steps=10", "sft.save_steps=5",
                                 "sft.eval_steps=5"])
    final = run_sft(config)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 2
    manifest = read_manifest(final.parent)
    assert manifest["status"] == "finished" and manifest["steps"] == 10
    assert manifest["input_checkpoint"].endswith("pretrain/final")
    assert manifest["metrics"]["eval_loss"] is not None
    assert sorted(p.name for p in final.parent.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert all((p / COMPLETE_MARKER).is_file() for p in final.parent.glob("checkpoint-*"))
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics) and not any("train_runtime" in m for m in metrics)
    samples = [json.loads(line) for line in (final.parent / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["samples"][0]["prompt"]


def test_sft_with_lora_saves_a_merged_full_model(smoke_run):
    config = load_config(SMOKE, [f"run.output_dir={smoke_run}", "sft.max_steps=4", "sft.save_steps=4",
                                 "sft.peft={r: 4, lora_alpha: 8}", "sft.learning_rate=1e-2"])
    final = run_sft(config)
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    base = AutoModelForCausalLM.from_pretrained(smoke_run / "smoke" / "pretrain" / "final").state_dict()
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_sft_on_a_prompt_completion_file_with_a_bad_row(smoke_run, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "Say hi.", "completion": "Hi!"}] * 20 + [{"prompt": "Say hi.", "completion": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"run.output_dir={smoke_run}", f"data.sft.path={data}", "sft.max_steps=2", "sft.save_steps=2"]
    with pytest.raises(ValueError, match=r"row \d+: 'completion' is empty"):
        run_sft(load_config(SMOKE, overrides))
    assert not (smoke_run / "smoke" / "sft" / "checkpoint-2").exists()
    final = run_sft(load_config(SMOKE, overrides + ["data.on_bad_rows=skip"]))
    assert (final / "model.safetensors").is_file()


@pytest.mark.slow
def test_sft_sigkill_then_resume_is_bit_identical(smoke_pretrained, tmp_path):
    import shutil
    for name in ("a", "b"):
        shutil.copytree(smoke_pretrained / "smoke", tmp_path / name / "smoke")
    overrides = ["sft.max_steps=20", "sft.save_steps=5", "sft.eval_steps=10"]
    result = run_stage("sft", f"run.output_dir={tmp_path / 'a'}", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    marker = tmp_path / "b" / "smoke" / "sft" / "checkpoint-5" / COMPLETE_MARKER
    run_and_kill_when("sft", marker.is_file, f"run.output_dir={tmp_path / 'b'}", *overrides)
    result = run_stage("sft", f"run.output_dir={tmp_path / 'b'}", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout
    assert_identical_weights(tmp_path / "a" / "smoke" / "sft" / "final", tmp_path / "b" / "smoke" / "sft" / "final")
