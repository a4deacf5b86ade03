"""PPO's parts on a tiny random policy and critic: a minibatch gradient independent of how it is split into
micro-batches, the optimizer's settings and learning-rate schedule, and policy snapshots."""

import pipeline.ppo.models as ppo_models
import pytest
import torch

import stages.ppo as ppo
from pipeline.config.loading import load_config
from pipeline.config.parsing import ConfigError
from pipeline.config.schema import PPOSection
from pipeline.generation.padding import pad_sequences, position_ids_of
from pipeline.ppo.experience import Experience
from pipeline.ppo.models import PolicyAndValue
from pipeline.rl.logprobs import logprobs_of_tokens
from tests.helpers import SMOKE


class RecordingOptimizer:
    """Stands in for AdamW: keeps the gradient each step would apply, and applies nothing."""

    def __init__(self, model: torch.nn.Module):
        self.parameters, self.steps = list(model.parameters()), []

    def step(self):
        self.steps.append(flat_gradient(self.parameters))

    def zero_grad(self, set_to_none: bool = True):
        for parameter in self.parameters:
            parameter.grad = None


def flat_gradient(parameters) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])


def tiny_policy_critic_and_experience() -> tuple[torch.nn.Module, ppo_models.ValueModel, Experience]:
    """A random 2-layer policy and critic, and a rollout of 8 left-padded prompts with responses of 1 to 8 tokens,
    old logprobs and values near the models' own (so some tokens clip), random advantages and returns."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                         num_labels=1)
    torch.manual_seed(0)
    policy, critic = LlamaForCausalLM(config), ppo_models.ValueModel(LlamaForSequenceClassification(config))
    prompt_lengths, response_lengths = [3, 6, 2, 5, 4, 6, 1, 3], [8, 1, 5, 2, 7, 3, 6, 4]
    context, width = max(prompt_lengths), max(response_lengths)
    queries = pad_sequences([torch.randint(3, 40, (n,)).tolist() for n in prompt_lengths], 0, "left")
    mask = torch.arange(width)[None, :] < torch.tensor(response_lengths)[:, None]
    responses = torch.randint(3, 40, (8, width)).masked_fill(~mask, 0)
    sequences, attention_mask = torch.cat([queries[0], responses], 1), torch.cat([queries[1], mask.long()], 1)
    with torch.no_grad():
        logits = ppo_models.response_logits(policy, sequences, attention_mask, context)
        logprobs = logprobs_of_tokens(logits, responses)
        values = critic(sequences, attention_mask, position_ids_of(attention_mask))[:, context - 1: -1]

    def noisy(tensor, scale):
        return (tensor + scale * torch.randn_like(tensor)).masked_fill(~mask, 0.0)

    experience = Experience(sequences, attention_mask, mask, noisy(logprobs, 0.3), noisy(values, 0.3),
                                noisy(torch.zeros_like(values), 1.0), noisy(torch.zeros_like(values), 1.0))
    return policy, critic, experience


def test_minibatch_gradient_is_the_same_for_any_split_and_order_of_micro_batches():
    """Each micro-batch's token sums go over the minibatch's token count: 1, 2 or 4 micro-batches, any order and any
    grouping give the gradient of one token mean over the minibatch (a mean per micro-batch would weigh a token
    of the one-token response like 8 tokens of the longest)."""
    from accelerate import Accelerator

    policy, critic, experience = tiny_policy_critic_and_experience()
    model = PolicyAndValue(policy, critic)
    accelerator = Accelerator(cpu=True)
    context = experience.sequences.shape[1] - experience.mask.shape[1]
    gradients = {}
    for split in (1, 2, 4):
        settings = PPOSection(per_device_train_batch_size=8 // split, gradient_accumulation_steps=split,
                              num_ppo_epochs=1, max_grad_norm=1e9)
        for seed in (0, 1) if split > 1 else (0,):
            optimizer = RecordingOptimizer(model)
            ppo.ppo_update(model, optimizer, experience, settings, accelerator, torch.Generator().manual_seed(seed))
            gradients[f"{split} micro-batches, order {seed}"] = optimizer.steps[0]
    # Any grouping and order, through micro_batch_loss itself: uneven sizes, long and short responses mixed.
    settings = PPOSection(num_ppo_epochs=1)
    for groups in ([[5, 0, 3], [7], [1, 2, 6, 4]], [[6, 1], [4, 7, 0, 2, 5, 3]], [[3], [2], [1], [0, 4, 5, 6, 7]]):
        model.zero_grad(set_to_none=True)
        for group in groups:
            ppo.micro_batch_loss(model, experience, torch.tensor(group), experience.mask.sum(), context, settings,
                                 accelerator)
        gradients[str(groups)] = flat_gradient(model.parameters())
    reference = gradients.pop("1 micro-batches, order 0")
    assert reference.norm() > 0
    for name, gradient in gradients.items():
        assert (gradient - reference).norm() <= 1e-5 * reference.norm(), name


def test_optimizer_settings_follow_trl_and_are_validated():
    """TRL's PPOConfig defaults: no weight decay (torch's AdamW would decay by 0.01 unasked) and a linear decay of
    the learning rate to 0 over max_steps, a function of the step so that a resumed run matches."""
    settings = PPOSection(max_steps=4)
    assert settings.weight_decay == 0.0 and settings.lr_scheduler_type == "linear"
    assert [ppo.learning_rate_scale(step, settings) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]
    constant = PPOSection(max_steps=4, lr_scheduler_type="constant")
    assert [ppo.learning_rate_scale(step, constant) for step in range(4)] == [1.0] * 4

    policy, critic, _ = tiny_policy_critic_and_experience()
    model = PolicyAndValue(policy, critic)
    optimizer = ppo_models.build_optimizer(model, settings)
    assert all(group["weight_decay"] == 0.0 and group["eps"] == 1e-5 for group in optimizer.param_groups)
    # One optimizer for the one prepared model: the policy's groups at its rate, the critic's at value_learning_rate.
    optimizer = ppo_models.build_optimizer(model, PPOSection(weight_decay=0.05, learning_rate=1e-5,
                                                             value_learning_rate=1e-4))
    for (decayed, kept), part, rate in zip((optimizer.param_groups[:2], optimizer.param_groups[2:]), (policy, critic),
                                           (1e-5, 1e-4)):
        assert decayed["weight_decay"] == 0.05 and all(p.dim() == 2 for p in decayed["params"])
        assert kept["weight_decay"] == 0.0 and kept["params"] and all(p.dim() == 1 for p in kept["params"])
        assert {id(p) for p in decayed["params"] + kept["params"]} == {id(p) for p in part.parameters()}
        assert decayed["lr"] == kept["lr"] == decayed["peak_lr"] == kept["peak_lr"] == rate

    assert load_config(SMOKE, ["ppo.weight_decay=0.01", "ppo.lr_scheduler_type=constant"]).ppo.weight_decay == 0.01
    with pytest.raises(ConfigError, match=r"^ppo\.weight_decay: must not be negative, got -0\.1$"):
        load_config(SMOKE, ["ppo.weight_decay=-0.1"])
    with pytest.raises(ConfigError, match=r"^ppo\.lr_scheduler_type: must be one of linear, constant; got 'cosine'$"):
        load_config(SMOKE, ["ppo.lr_scheduler_type=cosine"])


def test_a_policy_snapshot_is_written_once_leaving_the_rng_as_it_was(tiny_causal_lm, tmp_path):
    """The policy alone in plain HF format; a snapshot already there (a resumed run passing its step again) is kept
    as it is; either way the RNG the next rollout samples with is untouched."""
    from accelerate import Accelerator

    from data.tokenizer import load_tokenizer
    from pipeline.train.models import load_causal_lm

    policy, critic, _ = tiny_policy_critic_and_experience()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(PolicyAndValue(policy, critic))
    tokenizer = load_tokenizer(tiny_causal_lm)
    state = torch.get_rng_state()
    ppo.save_policy_snapshot(accelerator, model, tokenizer, tmp_path / "policy-step-3", step=3)
    assert torch.equal(torch.get_rng_state(), state)
    saved = load_causal_lm(tmp_path / "policy-step-3")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), policy.state_dict().values()))
    assert (tmp_path / "policy-step-3" / "tokenizer.json").is_file()
    (tmp_path / "policy-step-6").mkdir()
    ppo.save_policy_snapshot(accelerator, model, tokenizer, tmp_path / "policy-step-6", step=6)
    assert not any((tmp_path / "policy-step-6").iterdir())
