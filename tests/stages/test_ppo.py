"""PPO end to end on a tiny pretrained run: the first-minibatch invariant (fp32 and bf16), a learnable signal, exact
resume, sampling from π whatever the checkpoint's generation config, compare scoring as PPO does. The update and
the snapshots on tiny random models are in tests/stages/test_ppo_units.py, the models themselves (the critic's
units) in tests/pipeline/ppo/test_ppo_models.py."""

import json
import shutil
from pathlib import Path

import pipeline.ppo.models as ppo_models
import pytest
import torch

import stages.ppo as ppo
from pipeline.config.loading import load_config
from pipeline.config.schema import PeftSection, PPOSection
from pipeline.generation.padding import pad_sequences, position_ids_of
from pipeline.ppo.experience import Rollout, generate_rollout, score_rollout
from pipeline.ppo.models import PolicyAndValue
from pipeline.rl.masked import masked_mean
from pipeline.run.checkpoints import COMPLETE_MARKER
from pipeline.run.manifests import read_manifest, write_manifest
from pipeline.train.sharding import place_frozen_model
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
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_of(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def build_models(run_dir: Path, settings: PPOSection, mixed_precision: str = "no"):
    from accelerate import Accelerator
    from trl.trainer.utils import disable_dropout_in_model

    from data.tokenizer import load_tokenizer
    from pipeline.train.models import attention_for_precision
    from reward_model.model import load_reward_model
    from reward_model.normalization import RewardNormalization

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
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    torch.manual_seed(0)
    model.eval()
    rollout = generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
    assert rollout.responses.shape[1] <= 12
    after_eos = ~rollout.mask
    assert (rollout.responses[after_eos] == tokenizer.pad_token_id).all()
    experience, statistics = score_rollout(rollout, model, reference, reward_scorer, normalization,
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
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    context["width"] = queries.shape[1]
    model, reward_scorer = PolicyAndValue(policy, critic), ppo_models.RewardScorer(reward_model)
    optimizer = torch.optim.AdamW([{"params": policy.parameters(), "lr": settings.learning_rate},
                                   {"params": critic.parameters(), "lr": settings.value_learning_rate}])
    torch.manual_seed(0)
    scores, kls = [], []
    for step in range(30):
        model.eval()
        rollout = generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
        experience, statistics = score_rollout(rollout, model, reference, reward_scorer, normalization,
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


STORY_PROMPTS = ("Mia", "Tom and a fox", "Ben", "Lily at the park", "Sam", "Anna", "Max", "Zoe")


def test_a_checkpoint_generation_config_leaves_the_first_ppo_step_exact(pretrained_run, tmp_path):
    """A real chat checkpoint's generation_config.json (repetition_penalty 1.3) must not reach the rollout: the
    samples are the ones a hand-written sampler from π at the temperature draws with the same seed, and the first
    minibatch's KL is 0 and its ratio 1."""
    from transformers import GenerationConfig

    from pipeline.generation.sampling import cut_at_first_eos, draw_from
    from pipeline.rl.logprobs import logprobs_of_tokens
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
    queries, query_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    model = PolicyAndValue(policy, critic)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, queries, query_mask, settings, accelerator)
    torch.manual_seed(0)
    by_hand, by_hand_mask = cut_at_first_eos(
        sample_from_pi_by_hand(policy, queries, query_mask, settings.temperature, settings.response_length,
                               tokenizer.eos_token_id, tokenizer.pad_token_id, settings.local_rollout_forward_batch_size,
                               draw=draw_from, only_unfinished=True),
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(rollout.responses, by_hand) and torch.equal(rollout.mask, by_hand_mask)

    experience, statistics = score_rollout(rollout, model, reference, ppo_models.RewardScorer(reward_model),
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
    from pipeline.evaluation.samples import HeldOutScoring, sample_policy
    from pipeline.generation.padding import prompt_response_batch
    from pipeline.rl.masked import response_mask
    from reward_model.normalization import RewardNormalization

    settings = PPOSection(per_device_train_batch_size=4, gradient_accumulation_steps=2, response_length=10,
                          missing_eos_penalty=None)
    accelerator, tokenizer, policy, reference, critic, reward_model, _ = build_models(pretrained_run, settings)
    normalization = RewardNormalization(mean=0.3, std=2.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():  # a "PPO" policy a little away from the SFT one: KL ≠ 0
            parameter.add_(0.02 * torch.randn_like(parameter))
    texts = [f"Write a short story about {n}." for n in STORY_PROMPTS[:6]]
    scoring = HeldOutScoring(tokenizer, reward_model, normalization, reference, texts, settings.temperature,
                             settings.response_length, builtin=False)
    samples = scoring.samples("ppo", policy, 1, seed=4)
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
        rollout = Rollout(sequences[:, :context], attention_mask[:, :context], sequences[:, context:], mask,
                              mask.sum(1) - 1, contains_eos)
        _, statistics = score_rollout(rollout, PolicyAndValue(policy, critic), reference,
                                          ppo_models.RewardScorer(reward_model), normalization, 0.05, settings,
                                          accelerator)
        assert sample.reward == pytest.approx(statistics["objective/scores"].item(), abs=1e-5)
        assert sample.kl_to_sft == pytest.approx(statistics["objective/kl"].item(), abs=1e-4)
