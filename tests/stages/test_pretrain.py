import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.config.loading import load_config
from pipeline.config.schema import PretrainSection
from pipeline.run.checkpoints import COMPLETE_MARKER
from pipeline.run.manifests import read_manifest
from stages.pretrain import batch_indices, learning_rate_at, packed_blocks, run_pretraining
from tests.helpers import SMOKE, assert_identical_weights, run_and_kill_when, run_stage


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = PretrainSection(max_steps=100, warmup_steps=10, learning_rate=1.0, min_learning_rate_ratio=0.1)
    rates = [learning_rate_at(step, settings) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)
    assert learning_rate_at(50, PretrainSection(lr_scheduler_type="constant", warmup_steps=0, learning_rate=2.0)) == 2.0


def test_batches_cover_every_block_once_per_epoch_across_processes():
    settings = PretrainSection(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    num_blocks, processes = 25, 2  # 12 blocks a step: 2 steps an epoch, one block left over
    seen = [batch_indices(step, micro, settings, num_blocks, seed=1, process_index=rank, num_processes=processes)
            for step in range(2) for micro in range(3) for rank in range(processes)]
    flat = torch.cat(seen).tolist()
    assert len(flat) == 24 and len(set(flat)) == 24
    next_epoch = batch_indices(2, 0, settings, num_blocks, seed=1, process_index=0, num_processes=processes)
    assert next_epoch.tolist() != seen[0].tolist()  # a new permutation each epoch
    with pytest.raises(ValueError, match="exceeds"):
        batch_indices(0, 0, settings, 5, seed=1, process_index=0, num_processes=processes)


def test_packed_blocks_end_documents_with_eos(tiny_tokenizer):
    blocks = packed_blocks(["Mia had a red kite."] * 20, tiny_tokenizer, seq_length=16)
    assert blocks.shape[1] == 16
    assert (blocks == tiny_tokenizer.eos_token_id).sum() >= 1
    with pytest.raises(ValueError, match="seq_length"):
        packed_blocks(["hi"], tiny_tokenizer, seq_length=64)


@pytest.fixture
def tiny_tokenizer():
    from data.tokenizer import train_bpe_tokenizer
    return train_bpe_tokenizer(["Mia had a red kite. She went to the park."] * 20, 300)


def test_smoke_pretraining_learns_and_writes_a_loadable_model(tmp_path):
    config = load_config(SMOKE, [f"run.output_dir={tmp_path}"])
    final = run_pretraining(config)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    manifest = read_manifest(final.parent)
    assert manifest["status"] == "finished" and manifest["steps"] == 30 and manifest["config"]["pretrain"]["max_steps"] == 30
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert math.isfinite(manifest["metrics"]["eval_loss"])
    checkpoints = sorted(p.name for p in final.parent.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-20", "checkpoint-30"]  # keep_last_checkpoints = 2
    assert (final.parent / "checkpoint-30" / COMPLETE_MARKER).is_file()
    assert (tmp_path / "smoke" / "tokenizer" / "tokenizer.json").is_file()
    assert run_pretraining(config) == final  # finished: nothing to do


def test_changed_config_is_refused_until_restart(tmp_path):
    config = load_config(SMOKE, [f"run.output_dir={tmp_path}", "pretrain.max_steps=10"])
    run_pretraining(config)
    changed = load_config(SMOKE, [f"run.output_dir={tmp_path}", "pretrain.max_steps=12"])
    with pytest.raises(ValueError, match=r"config changed.*pretrain\.max_steps.*--restart pretrain"):
        run_pretraining(changed)


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    uninterrupted, killed = tmp_path / "a", tmp_path / "b"
    assert run_stage("pretrain", f"run.output_dir={uninterrupted}").returncode == 0
    marker = killed / "smoke" / "pretrain" / "checkpoint-10" / COMPLETE_MARKER
    run_and_kill_when("pretrain", marker.is_file, f"run.output_dir={killed}")
    assert not (killed / "smoke" / "pretrain" / "final").exists()
    result = run_stage("pretrain", f"run.output_dir={killed}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout + result.stderr
    assert_identical_weights(uninterrupted / "smoke" / "pretrain" / "final", killed / "smoke" / "pretrain" / "final")
    metrics = [(p / "smoke" / "pretrain" / "metrics.jsonl").read_text() for p in (uninterrupted, killed)]
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_two_process_ddp(tmp_path):
    result = run_stage("pretrain", f"run.output_dir={tmp_path}", "pretrain.max_steps=6", "pretrain.save_steps=3",
                       processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "smoke" / "pretrain" / "final" / "model.safetensors").is_file()
    assert read_manifest(tmp_path / "smoke" / "pretrain")["status"] == "finished"


def test_bad_override_exits_2_before_writing(tmp_path):
    result = run_stage("pretrain", f"run.output_dir={tmp_path}", "pretrain.max_stepz=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: pretrain.max_stepz: unknown key (did you mean 'max_steps'?)"
    assert not any(tmp_path.iterdir())


def test_bf16_autocast_on_cpu_learns_with_matmul_attention(tmp_path, monkeypatch):
    import stages.pretrain

    attention_used = []
    real = stages.pretrain.attention_for_precision
    monkeypatch.setattr(stages.pretrain, "attention_for_precision", lambda model, bf16, device: attention_used.append(
        real(model, bf16, device).config._attn_implementation))
    config = load_config(SMOKE, [f"run.output_dir={tmp_path}", "pretrain.bf16=true", "pretrain.max_steps=12",
                                 "pretrain.save_steps=12"])
    final = run_pretraining(config)
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert attention_used == ["eager"]
    assert AutoModelForCausalLM.from_pretrained(final).config._attn_implementation == "sdpa"  # the choice is not saved


@pytest.mark.slow
def test_torch_compile_trains_as_eager_does_and_saves_plain_weights(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile
    # aot_eager traces and runs the model as inductor would, without inductor's code generation (~30 s on CPU):
    # what is tested is this stage's wiring, not inductor.
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or real_compile(model,
                                                                                             backend="aot_eager"))
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        config = load_config(SMOKE, [f"run.output_dir={tmp_path / name}", f"pretrain.torch_compile={flag}",
                                     "pretrain.max_steps=6", "pretrain.save_steps=6", "pretrain.logging_steps=2",
                                     "pretrain.eval_steps=6"])
        final = run_pretraining(config)
        losses[name] = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(compiled) == 1  # only the compiled run's training forward
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    saved = load_file(final / "model.safetensors")
    assert saved and not any("_orig_mod" in name for name in saved)  # plain names, as transformers loads them
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2


def test_torch_compile_under_deepspeed_is_a_config_error(monkeypatch):
    import stages.pretrain
    from pipeline.config.parsing import ConfigError
    from pipeline.train.engines import Engine

    monkeypatch.setattr(stages.pretrain, "engine_of", lambda accelerator: Engine("zero3"))
    with pytest.raises(ConfigError, match=r"^pretrain.torch_compile: not supported under DeepSpeed"):
        stages.pretrain.compiled_training_forward(torch.nn.Linear(2, 2), accelerator=None)
