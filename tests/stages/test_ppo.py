"""PPO end to end on tiny models: the first-minibatch invariant (fp32 and bf16), a minibatch gradient independent
of its split, the optimizer's settings, a learnable signal, exact resume. The models themselves (the critic's
units) are tested in tests/pipeline/test_ppo_models.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import pipeline.ppo_models as ppo_models
import stages.ppo as ppo
from pipeline.batches import left_pad
from pipeline.checkpoints import COMPLETE_MARKER, read_manifest, write_manifest
from pipeline.config import ConfigError, PeftSection, PPOSection, load_config
from pipeline.engines import PolicyAndValue, place_frozen_model
from pipeline.policy_gradient import logprobs_of_tokens, masked_mean
from pipeline.rollout import position_ids_of
from stages.pretrain import run_pretraining
from tests.helpers import SMOKE, assert_identical_weights, run_and_kill_when, run_stage


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A smoke run whose pretrained model stands in for the SFT policy and the reward model's backbone."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("ppo")
    config = load_config(SMOKE, [f"run.output_dir={root}"])
    final = run_pretraining(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    for stage in ("sft", "reward"):
        shutil.copytree(final, root / "smoke" / stage / "final")
        write_manifest(root / "smoke" / stage, stage=stage, status="finished")  # as a finished stage leaves it
    return root


def fresh_copy(pretrained_run: Path, tmp_path: Path) -> Path:
    for part in ("data", "sft", "reward"):
        shutil.copytree(pretrained_run / "smoke" / part, tmp_path / "smoke" / part)
    return tmp_path


def test_prompt_order_covers_each_prompt_once_per_epoch():
    settings = PPOSection(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=1)
    seen = torch.cat([ppo.prompt_indices(step, settings, 17, seed=3, process_index=rank, num_processes=2)
                      for step in range(2) for rank in range(2)]).tolist()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 16


def test_left_pad_puts_prompts_against_the_response():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_of(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def build_models(run_dir: Path, settings: PPOSection, mixed_precision: str = "no"):
    from accelerate import Accelerator

    from data.tokenizer import load_tokenizer
    from pipeline.models import attention_for_precision
    from reward_model import RewardNormalization, load_reward_model
    from trl.trainer.utils import disable_dropout_in_model

    config = load_config(SMOKE)
    config.ppo = settings
    policy_path = str(run_dir / "smoke" / "sft" / "final")
    tokenizer = load_tokenizer(policy_path)
    policy, reference = ppo_models.build_policy(config, policy_path, tokenizer)
    critic = ppo_models.build_critic(config, policy_path, run_dir / "smoke" / "reward" / "final", tokenizer)
    reward_model, _ = load_reward_model(str(run_dir / "smoke" / "reward" / "final"))
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    for model in (policy, reference, critic, reward_model):
        if model is not None:  # the LoRA policy is its own reference
            disable_dropout_in_model(model)
            attention_for_precision(model, mixed_precision == "bf16", accelerator.device)
    return accelerator, tokenizer, policy, reference, critic, reward_model, RewardNormalization()


@pytest.mark.parametrize("mixed_precision, lora", [("no", False), ("bf16", False), ("bf16", True)],
                         ids=["fp32", "bf16", "bf16-lora"])
def test_first_minibatch_of_first_epoch_has_ratio_exactly_one(pretrained_run, mixed_precision, lora):
    """Before any update the policy is the reference and the sampler: KL 0, ratio 1, nothing clipped. Under bf16
    too, through ppo_update as run_ppo calls it: `prepare` puts the policy's forward under autocast, so the
    reference (a separate model, or the LoRA policy with its adapter off) and the reward model must run under it."""
    settings = PPOSection(per_device_train_batch_size=4, gradient_accumulation_steps=2, response_length=12,
                          num_ppo_epochs=1, peft=PeftSection() if lora else None)
    accelerator, tokenizer, policy, reference, critic, reward_model, normalization = build_models(
        pretrained_run, settings, mixed_precision)
    assert (reference is None) == lora
    model = PolicyAndValue(policy, critic)
    model, optimizer = accelerator.prepare(model, ppo_models.build_optimizer(model, settings))
    reward_scorer = place_frozen_model(ppo_models.RewardScorer(reward_model), accelerator)
    reference = place_frozen_model(reference, accelerator) if reference is not None else None
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Write a short story about {n}."}],
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
               for n in ("Mia", "Tom and a fox", "Ben", "Lily at the park", "Sam", "Anna", "Max", "Zoe")]
    queries, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model.eval()
    rollout = ppo.generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
    assert rollout.responses.shape[1] <= 12
    after_eos = ~rollout.mask
    assert (rollout.responses[after_eos] == tokenizer.pad_token_id).all()
    experience, statistics = ppo.score_rollout(rollout, model, reference, reward_scorer, normalization,
                                              0.05, settings, accelerator)
    assert abs(statistics["objective/kl"].item()) < 1e-6  # policy == reference before any update
    assert masked_mean(experience.advantages, experience.mask).abs().item() < 1e-5  # whitened
    model.train()
    # One epoch of one minibatch (two micro-batches): what ppo_update reports is the first minibatch's.
    first = ppo.ppo_update(model, optimizer, experience, settings, accelerator, torch.Generator().manual_seed(0))
    assert first["val/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert first["val/ratio_var"].item() == pytest.approx(0.0, abs=1e-10)
    assert first["policy/approxkl_avg"].item() == pytest.approx(0.0, abs=1e-10)
    assert first["policy/clipfrac_avg"].item() == 0.0


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


def tiny_policy_critic_and_experience() -> tuple[torch.nn.Module, ppo_models.ValueModel, ppo.Experience]:
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
    queries = left_pad([torch.randint(3, 40, (n,)).tolist() for n in prompt_lengths], 0)
    mask = torch.arange(width)[None, :] < torch.tensor(response_lengths)[:, None]
    responses = torch.randint(3, 40, (8, width)).masked_fill(~mask, 0)
    sequences, attention_mask = torch.cat([queries[0], responses], 1), torch.cat([queries[1], mask.long()], 1)
    with torch.no_grad():
        logits = ppo_models.response_logits(policy, sequences, attention_mask, context)
        logprobs = logprobs_of_tokens(logits, responses)
        values = critic(sequences, attention_mask, position_ids_of(attention_mask))[:, context - 1: -1]

    def noisy(tensor, scale):
        return (tensor + scale * torch.randn_like(tensor)).masked_fill(~mask, 0.0)

    experience = ppo.Experience(sequences, attention_mask, mask, noisy(logprobs, 0.3), noisy(values, 0.3),
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


def test_learnable_signal_raises_reward_with_bounded_kl(pretrained_run, monkeypatch):
    """A reward that likes short responses: a few dozen PPO steps should shorten them clearly, KL staying small.
    The smoke policy rarely ends a response (about 1 in 10 within 16 tokens): with 16, whether the first rollouts
    held any EOS, and so any signal, came down to the sampler's random numbers; 24 give more."""
    settings = PPOSection(per_device_train_batch_size=8, gradient_accumulation_steps=2, response_length=24,
                          learning_rate=3e-3, value_learning_rate=3e-3, num_ppo_epochs=4, kl_coef=0.02,
                          missing_eos_penalty=None, normalize_reward=False)
    accelerator, tokenizer, policy, reference, critic, reward_model, normalization = build_models(pretrained_run, settings)
    context = {}

    def shortness_reward(model, sequences, attention_mask):
        lengths = attention_mask[:, context["width"]:].sum(1).float()
        return 1.0 - lengths / settings.response_length

    monkeypatch.setattr(ppo_models, "score_token_ids", shortness_reward)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {n}."}],
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
               for n in ("Mia", "Tom", "Ben", "Lily", "Sam", "Anna", "Max", "Zoe", "Leo", "Emma", "Jack", "Nina",
                         "the cat", "the dog", "the fox", "the bird")]
    queries, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    context["width"] = queries.shape[1]
    model, reward_scorer = PolicyAndValue(policy, critic), ppo_models.RewardScorer(reward_model)
    optimizer = torch.optim.AdamW([{"params": policy.parameters(), "lr": settings.learning_rate},
                                   {"params": critic.parameters(), "lr": settings.value_learning_rate}])
    torch.manual_seed(0)
    scores, kls = [], []
    for step in range(30):
        model.eval()
        rollout = ppo.generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
        experience, statistics = ppo.score_rollout(rollout, model, reference, reward_scorer, normalization,
                                                  settings.kl_coef, settings, accelerator)
        model.train()
        ppo.ppo_update(model, optimizer, experience, settings, accelerator, torch.Generator().manual_seed(step))
        scores.append(statistics["objective/scores"].item())
        kls.append(statistics["objective/kl"].item())
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.25, scores
    assert max(kls) < 15 and min(kls) > -0.5, kls


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_policy_critic_and_metrics(pretrained_run, tmp_path):
    overrides = ["ppo.max_steps=6", "ppo.save_steps=2", "ppo.per_device_train_batch_size=4",
                 "ppo.gradient_accumulation_steps=2", "ppo.response_length=16", "run.stages=[ppo]",
                 "ppo.policy_snapshot_steps=2"]
    uninterrupted, killed = fresh_copy(pretrained_run, tmp_path / "a"), fresh_copy(pretrained_run, tmp_path / "b")
    result = run_stage("ppo", f"run.output_dir={uninterrupted}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    marker = killed / "smoke" / "ppo" / "checkpoint-2" / COMPLETE_MARKER
    run_and_kill_when("ppo", marker.is_file, f"run.output_dir={killed}", *overrides)
    assert not (killed / "smoke" / "ppo" / "final").exists()
    result = run_stage("ppo", f"run.output_dir={killed}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    a, b = uninterrupted / "smoke" / "ppo", killed / "smoke" / "ppo"
    assert_identical_weights(a / "final", b / "final")
    assert_identical_weights(a / "checkpoint-6", b / "checkpoint-6")  # the one prepared model: policy and critic
    # Snapshot 2 comes from the killed run (written before its checkpoint-2), 4 from the resumed one; 6 is final/.
    assert sorted(p.name for p in b.glob("policy-step-*")) == ["policy-step-2", "policy-step-4"]
    for snapshot in ("policy-step-2", "policy-step-4"):
        assert_identical_weights(a / snapshot, b / snapshot)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    rates = [json.loads(line)["lr"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([PPOSection().learning_rate * (1 - step / 6) for step in range(6)])  # linear decay
    manifest = read_manifest(a)
    assert manifest["status"] == "finished" and manifest["steps"] == 6


def test_a_policy_snapshot_is_written_once_leaving_the_rng_as_it_was(tiny_causal_lm, tmp_path):
    """The policy alone in plain HF format; a snapshot already there (a resumed run passing its step again) is kept
    as it is; either way the RNG the next rollout samples with is untouched."""
    from accelerate import Accelerator

    from data.tokenizer import load_tokenizer
    from pipeline.models import load_causal_lm

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


STORY_PROMPTS = ("Mia", "Tom and a fox", "Ben", "Lily at the park", "Sam", "Anna", "Max", "Zoe")


def test_a_checkpoint_generation_config_leaves_the_first_ppo_step_exact(pretrained_run, tmp_path):
    """A real chat checkpoint's generation_config.json (repetition_penalty 1.3) must not reach the rollout: the
    samples are the ones a hand-written sampler from π at the temperature draws with the same seed, and the first
    minibatch's KL is 0 and its ratio 1."""
    from transformers import GenerationConfig

    from pipeline.policy_gradient import logprobs_of_tokens
    from pipeline.rollout import cut_at_first_eos, draw_from
    from tests.helpers import sample_from_pi_by_hand

    run = fresh_copy(pretrained_run, tmp_path)
    policy_dir = run / "smoke" / "sft" / "final"
    generation = GenerationConfig.from_pretrained(policy_dir)
    generation.repetition_penalty = 1.3
    generation.save_pretrained(policy_dir)
    settings = PPOSection(per_device_train_batch_size=4, gradient_accumulation_steps=2, response_length=12)
    accelerator, tokenizer, policy, reference, critic, reward_model, normalization = build_models(run, settings)
    assert policy.generation_config.repetition_penalty == 1.3
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Write a short story about {n}."}],
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
               for n in STORY_PROMPTS]
    queries, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    model = PolicyAndValue(policy, critic)
    torch.manual_seed(0)
    rollout = ppo.generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
    torch.manual_seed(0)
    by_hand, by_hand_mask = cut_at_first_eos(
        sample_from_pi_by_hand(policy, queries, query_mask, settings.temperature, settings.response_length,
                               tokenizer.eos_token_id, tokenizer.pad_token_id, settings.local_rollout_forward_batch_size,
                               draw=draw_from, only_unfinished=True),
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(rollout.responses, by_hand) and torch.equal(rollout.mask, by_hand_mask)

    experience, statistics = ppo.score_rollout(rollout, model, reference, ppo_models.RewardScorer(reward_model),
                                              normalization, 0.05, settings, accelerator)
    assert abs(statistics["objective/kl"].item()) < 1e-6
    policy.train()
    logits = ppo_models.response_logits(policy, experience.sequences, experience.attention_mask, queries.shape[1])
    new_logprobs = logprobs_of_tokens(logits, rollout.responses, settings.temperature)
    ratio = torch.exp(new_logprobs - experience.old_logprobs)[experience.mask]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6)


def test_compare_scores_and_kl_equal_what_ppo_gives_the_same_ids(pretrained_run):
    """`rlhf compare` scores a sample's token ids as PPO scored them (a truncated response stays truncated, no
    EOS added) and its KL to the SFT policy is PPO's k1 against the reference."""
    from data.formats import prompt_token_ids
    from pipeline.compare import policy_samples, sample_policy
    from pipeline.policy_gradient import response_mask
    from pipeline.rollout import prompt_response_batch
    from reward_model import RewardNormalization

    settings = PPOSection(per_device_train_batch_size=4, gradient_accumulation_steps=2, response_length=10,
                          missing_eos_penalty=None)
    accelerator, tokenizer, policy, reference, critic, reward_model, _ = build_models(pretrained_run, settings)
    normalization = RewardNormalization(mean=0.3, std=2.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():  # a "PPO" policy a little away from the SFT one: KL ≠ 0
            parameter.add_(0.02 * torch.randn_like(parameter))
    texts = [f"Write a short story about {n}." for n in STORY_PROMPTS[:6]]
    samples = [s for s in policy_samples({"sft": reference, "ppo": policy}, tokenizer, reward_model, normalization,
                                         texts, 1, settings.temperature, settings.response_length, seed=4,
                                         builtin=False) if s.policy == "ppo"]
    prompt_ids = [prompt_token_ids(tokenizer, t) for t in texts]
    drawn = sample_policy(policy, tokenizer, prompt_ids, 1, settings.temperature, settings.response_length, seed=4)
    assert [len(ids) for _, ids in drawn] == [s.length for s in samples]
    truncated = [tokenizer.eos_token_id not in ids for _, ids in drawn]
    assert any(truncated)
    policy.eval()
    for sample, (index, ids) in zip(samples, drawn):
        sequences, attention_mask, mask = prompt_response_batch([prompt_ids[index]], [ids], tokenizer.pad_token_id)
        context = len(prompt_ids[index])
        _, last_index, contains_eos = response_mask(sequences[:, context:], tokenizer.eos_token_id)
        rollout = ppo.Rollout(sequences[:, :context], attention_mask[:, :context], sequences[:, context:], mask,
                              mask.sum(1) - 1, contains_eos)
        _, statistics = ppo.score_rollout(rollout, PolicyAndValue(policy, critic), reference,
                                          ppo_models.RewardScorer(reward_model), normalization, 0.05, settings,
                                          accelerator)
        assert sample.reward == pytest.approx(statistics["objective/scores"].item(), abs=1e-5)
        assert sample.kl_to_sft == pytest.approx(statistics["objective/kl"].item(), abs=1e-4)
