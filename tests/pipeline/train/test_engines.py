"""pipeline/train/engines.py in one process, in seconds: accelerate's own DeepSpeed code paths (Accelerator.backward,
DeepSpeedEngineWrapper, DeepSpeedPlugin) over an engine that records what DeepSpeed's engine would be asked to
do, and FSDP2's unsharded generation with two gloo processes through torch's fully_shard. The engine tier
(tests/engines/) runs every stage under real DeepSpeed ZeRO-2/3 and FSDP2 on 2 CPU processes. Test names state
the engine's behaviour."""

from __future__ import annotations

from types import SimpleNamespace

import pipeline.train.engines as engines
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.config.parsing import ConfigError
from pipeline.ppo.models import PolicyAndValue, ValueModel
from pipeline.train.engines import (
    Engine, accumulation_boundary, backward, clipped_gradient_norm, configure_deepspeed, engine_of)
from pipeline.train.guards import require_finite_gradient_norms


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                 pad_token_id=0, num_labels=1, tie_word_embeddings=True), **overrides})


def tiny_policy_and_value(seed: int = 0) -> PolicyAndValue:
    torch.manual_seed(seed)
    return PolicyAndValue(LlamaForCausalLM(tiny_config()), ValueModel(LlamaForSequenceClassification(tiny_config())))


def batch(rows: int = 3, width: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (rows, width), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class RecordingDeepSpeedEngine:
    """What accelerate's DeepSpeedEngineWrapper asks of a DeepSpeed engine (deepspeed/runtime/engine.py 0.19):
    the accumulation boundary, backward (with its `scale_wrt_gas`), step; and what our code reads back."""

    def __init__(self, step_applied: bool = True, global_grad_norm=None):
        self.calls, self.step_applied, self.global_grad_norm = [], step_applied, global_grad_norm

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        self.calls.append(("backward", scale_wrt_gas))
        loss.backward()

    def step(self) -> None:
        self.calls.append(("step",))

    def was_step_applied(self) -> bool:
        return self.step_applied

    def get_global_grad_norm(self):
        return self.global_grad_norm


def as_if_deepspeed(accelerator: Accelerator, monkeypatch, zero_stage: int = 2,
                    engine: RecordingDeepSpeedEngine | None = None) -> RecordingDeepSpeedEngine:
    """Make accelerate's own dispatch take its DeepSpeed branches on this CPU Accelerator."""
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    engine = engine or RecordingDeepSpeedEngine()
    monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType.DEEPSPEED)
    monkeypatch.setattr(accelerator.state, "deepspeed_plugins", DeepSpeedPlugin(zero_stage=zero_stage,
                                                                                gradient_clipping=1.0))
    accelerator.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
    return engine


# ---------------------------------------------------------------- which engine
def test_engine_names_follow_accelerates_distributed_type_and_fsdp1_is_refused(monkeypatch):
    accelerator = Accelerator(cpu=True)
    assert engine_of(accelerator) == Engine("single") and not engine_of(accelerator).shards_weights
    as_if_deepspeed(accelerator, monkeypatch, zero_stage=3)
    engine = engine_of(accelerator)
    assert engine.name == "zero3" and engine.deepspeed and engine.zero_stage == 3 and engine.shards_weights
    assert not Engine("zero2").shards_weights and Engine("fsdp2").shards_weights and Engine("ddp").zero_stage == 0
    monkeypatch.setattr(accelerator.state, "distributed_type", DistributedType.FSDP)
    monkeypatch.setattr(accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1), raising=False)
    with pytest.raises(ConfigError, match=r"^run\.accelerate_config: FSDP version 1 is not supported"):
        engine_of(accelerator)
    monkeypatch.setattr(accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=2), raising=False)
    assert engine_of(accelerator).fsdp2


# ---------------------------------------------------------------- one trainable model
def test_policy_and_value_is_one_prepared_model_whose_forward_gives_policy_logits_and_values():
    """DeepSpeed and FSDP2 prepare one model with one optimizer: the forward of the one module gives what the two
    models give, the state dict names each part, and FSDP2's auto-wrap finds the decoder layer class."""
    model = tiny_policy_and_value()
    ids, mask, positions = batch()
    with torch.no_grad():
        logits, values = model(ids, mask, positions, logits_to_keep=4)
        expected_logits = model.policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -4:]
        expected_values = model.value_model(ids, mask, positions)
        policy_only, no_values = model(ids, mask, positions, values=False)
    torch.testing.assert_close(logits, expected_logits)
    assert torch.equal(values, expected_values) and values.shape == ids.shape and no_values is None
    assert policy_only.shape == (*ids.shape, 40)
    keys = set(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"policy", "value_model"}
    assert "policy.lm_head.weight" in keys and "value_model.classifier.score.bias" in keys
    assert model._no_split_modules == ["LlamaDecoderLayer"]
    # TRL's unwrap_model_for_generation reads the flag and turns checkpointing off around generation.
    assert model.is_gradient_checkpointing is False
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing is True
    model.gradient_checkpointing_disable()
    assert model.is_gradient_checkpointing is False

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prepared, prepared_optimizer = accelerator.prepare(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    logits, values = prepared(ids, mask, positions, logits_to_keep=3)
    backward(accelerator, logits.float().logsumexp(-1).mean() + values.pow(2).mean())
    prepared_optimizer.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    policy_count = len(list(model.policy.parameters()))
    assert any(changed[:policy_count]) and any(changed[policy_count:])  # one step moves both parts


def test_tie_weights_reties_the_policys_output_embedding_after_a_move():
    """accelerate calls the root's tie_weights after moving an FSDP2 model to the meta device, which unties."""
    model = tiny_policy_and_value()
    model.policy.lm_head.weight = torch.nn.Parameter(model.policy.lm_head.weight.detach().clone())
    assert model.policy.lm_head.weight is not model.policy.model.embed_tokens.weight
    model.tie_weights()
    assert model.policy.lm_head.weight is model.policy.model.embed_tokens.weight


# ---------------------------------------------------------------- accumulation and clipping
def test_without_deepspeed_gradients_accumulate_unscaled_and_only_the_last_micro_batch_syncs():
    """DDP/FSDP2 (and one device): micro-batch losses already divided by the count sum to the full batch's
    gradient, accelerate divides by nothing more, and the sync flag is down only inside non-last micro-batches."""
    torch.manual_seed(0)
    model, inputs = torch.nn.Linear(4, 1), torch.randn(6, 4)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    (model(inputs).pow(2).mean()).backward()
    whole = model.weight.grad.clone()
    model.zero_grad()
    flags = []
    for index, part in enumerate(inputs.split(2)):
        with accumulation_boundary(accelerator, model, last_micro_batch=index == 2):
            flags.append(accelerator.sync_gradients)
            backward(accelerator, model(part).pow(2).mean() / 3)
    assert flags == [False, False, True] and accelerator.sync_gradients
    torch.testing.assert_close(model.weight.grad, whole)


def test_under_deepspeed_the_engine_steps_once_per_optimizer_step_and_never_rescales_the_loss(monkeypatch):
    """accelerate steps a DeepSpeed engine inside backward whenever sync_gradients is set, and DeepSpeed divides
    each loss by its gradient_accumulation_steps unless told not to: 3 micro-batches → boundary only on the last,
    one engine step, every backward with scale_wrt_gas=False (the loops normalise their losses themselves)."""
    accelerator = Accelerator(cpu=True)
    engine = as_if_deepspeed(accelerator, monkeypatch)
    model = torch.nn.Linear(4, 1)
    inputs = torch.randn(6, 4)
    for index, part in enumerate(inputs.split(2)):
        with accumulation_boundary(accelerator, model, last_micro_batch=index == 2):
            backward(accelerator, model(part).pow(2).mean() / 3)
    assert engine.calls == [("boundary", False), ("backward", False), ("boundary", False), ("backward", False),
                            ("boundary", True), ("backward", False), ("step",)]
    assert accelerator.sync_gradients


def test_configure_deepspeed_writes_the_loops_micro_batch_accumulation_and_clipping(monkeypatch):
    """Without a DataLoader DeepSpeed cannot infer its batch sizes, and it clips by its own gradient_clipping
    (1.0 in configs/accelerate/deepspeed_*.yaml): the loop's values replace them, and the Accelerator's count
    matches so accelerate does not override it at prepare. Elsewhere nothing changes."""
    accelerator = Accelerator(cpu=True)
    configure_deepspeed(accelerator, 4, 3, 0.5)
    assert accelerator.gradient_accumulation_steps == 1
    as_if_deepspeed(accelerator, monkeypatch)
    configure_deepspeed(accelerator, micro_batch_size=4, accumulation_steps=3, max_grad_norm=0.5)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (4, 3, 12, 0.5)
    assert accelerator.gradient_accumulation_steps == 3


def test_gradient_norm_is_a_float_tensor_on_every_engine_and_non_finite_norms_stop_the_step(monkeypatch):
    """DDP/FSDP2: the norm before clipping, gradients clipped; DeepSpeed returns a float (or None) read after its
    own step: a step it skipped for a non-finite gradient reads as inf, ZeRO's -1 marker too; the guard stops."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    accelerator = Accelerator(cpu=True)
    model(torch.randn(5, 4)).sum().mul(10).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    norm = clipped_gradient_norm(accelerator, model, max_norm=1.0)
    assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.item() == pytest.approx(expected.item())
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() == pytest.approx(1.0, rel=1e-4)
    model.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="gradient norm of the model became nan at step 3"):
        require_finite_gradient_norms({"model": clipped_gradient_norm(accelerator, model, 1.0)}, "x", 3, "x.lr")

    engine = as_if_deepspeed(accelerator, monkeypatch)
    for applied, reported, expected_norm in ((True, 2.5, 2.5), (True, torch.tensor(0.75), 0.75),
                                             (False, 2.5, float("inf")), (True, -1.0, float("inf"))):
        engine.step_applied, engine.global_grad_norm = applied, reported
        norm = clipped_gradient_norm(accelerator, model, 1.0)
        assert norm.dtype == torch.float32 and norm.item() == expected_norm
    engine.global_grad_norm = float("nan")
    with pytest.raises(FloatingPointError, match="became nan"):
        require_finite_gradient_norms({"model": clipped_gradient_norm(accelerator, model, 1.0)}, "x", 1, "x.lr")


# ---------------------------------------------------------------- saving
def test_local_values_are_the_shard_a_process_holds():
    plain = torch.nn.Parameter(torch.ones(3))
    assert engines.local_values(plain) is plain
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_tensor = torch.full((2,), float("nan"))  # ZeRO-3 keeps the local partition here
    assert torch.isnan(engines.local_values(partitioned)).all()


def test_local_values_leave_out_zero3s_unwritten_partition_padding():
    """ZeRO-3 pads a parameter to a multiple of the world size with never-written memory: a 3-element parameter on
    one of 2 processes is a partition of 2, whose second element on the last process is padding (left out)."""
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_numel = 1
    partitioned.ds_tensor = torch.tensor([1.0, float("nan")])  # one real value, one element of padding
    assert engines.local_values(partitioned).tolist() == [1.0]


# ---------------------------------------------------------------- FSDP2, two processes on CPU
