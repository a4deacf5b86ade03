"""PPO end to end on tiny models: the first-minibatch invariant, a learnable signal, exact resume."""

import shutil
from pathlib import Path

import pytest
import torch

import stages.ppo as ppo
from pipeline.batches import left_pad
from pipeline.checkpoints import COMPLETE_MARKER, read_manifest
from pipeline.config import PPOSection, load_config
from pipeline.policy_gradient import masked_mean
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
    return root


def fresh_copy(pretrained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(pretrained_run / "smoke" / "data", tmp_path / "smoke" / "data")
    for stage in ("sft", "reward"):
        shutil.copytree(pretrained_run / "smoke" / stage / "final", tmp_path / "smoke" / stage / "final")
    return tmp_path


def test_prompt_order_covers_each_prompt_once_per_epoch():
    settings = PPOSection(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=1)
    seen = torch.cat([ppo.prompt_indices(step, settings, 17, seed=3, process_index=rank, num_processes=2)
                      for step in range(2) for rank in range(2)]).tolist()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 16


def test_left_pad_puts_prompts_against_the_response():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ppo.position_ids_of(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def build_models(run_dir: Path, settings: PPOSection):
    from accelerate import Accelerator

    from data.tokenizer import load_tokenizer
    from reward_model import RewardNormalization, load_reward_model
    from trl.trainer.utils import disable_dropout_in_model

    config = load_config(SMOKE)
    config.ppo = settings
    policy_path = str(run_dir / "smoke" / "sft" / "final")
    tokenizer = load_tokenizer(policy_path)
    policy, reference = ppo.build_policy(config, policy_path, tokenizer)
    critic = ppo.build_critic(config, policy_path, run_dir / "smoke" / "reward" / "final", tokenizer)
    reward_model, _ = load_reward_model(str(run_dir / "smoke" / "reward" / "final"))
    for model in (policy, reference, critic, reward_model):
        disable_dropout_in_model(model)
    accelerator = Accelerator(cpu=True)
    return accelerator, tokenizer, policy, reference, critic, reward_model, RewardNormalization()


def test_first_minibatch_of_first_epoch_has_ratio_exactly_one(pretrained_run):
    settings = PPOSection(per_device_train_batch_size=4, gradient_accumulation_steps=2, response_length=12)
    accelerator, tokenizer, policy, reference, critic, reward_model, normalization = build_models(pretrained_run, settings)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Write a short story about {n}."}],
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
               for n in ("Mia", "Tom and a fox", "Ben", "Lily at the park", "Sam", "Anna", "Max", "Zoe")]
    queries, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    torch.manual_seed(0)
    rollout = ppo.generate_rollout(policy, tokenizer, queries, query_mask, settings, accelerator)
    assert rollout.responses.shape[1] <= 12
    after_eos = ~rollout.mask
    assert (rollout.responses[after_eos] == tokenizer.pad_token_id).all()
    experience, statistics = ppo.score_rollout(rollout, policy, reference, critic, reward_model, normalization,
                                              0.05, settings, accelerator)
    assert abs(statistics["objective/kl"].item()) < 1e-6  # policy == reference before any update
    policy.train()
    critic.train()
    context = queries.shape[1]
    first = ppo.micro_batch_loss(policy, critic, experience, torch.arange(4), context, settings, accelerator)
    assert first["val/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert first["policy/approxkl_avg"].item() == pytest.approx(0.0, abs=1e-10)
    assert first["policy/clipfrac_avg"].item() == 0.0
    assert masked_mean(experience.advantages, experience.mask).abs().item() < 1e-5  # whitened


def test_learnable_signal_raises_reward_with_bounded_kl(pretrained_run, monkeypatch):
    """A reward that likes short responses: a few dozen PPO steps should shorten them clearly, KL staying small."""
    settings = PPOSection(per_device_train_batch_size=8, gradient_accumulation_steps=2, response_length=16,
                          learning_rate=3e-3, value_learning_rate=3e-3, num_ppo_epochs=4, kl_coef=0.02,
                          missing_eos_penalty=None, normalize_reward=False)
    accelerator, tokenizer, policy, reference, critic, reward_model, normalization = build_models(pretrained_run, settings)
    context = {}

    def shortness_reward(model, sequences, attention_mask):
        lengths = attention_mask[:, context["width"]:].sum(1).float()
        return 1.0 - lengths / settings.response_length

    monkeypatch.setattr(ppo, "score_token_ids", shortness_reward)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {n}."}],
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
               for n in ("Mia", "Tom", "Ben", "Lily", "Sam", "Anna", "Max", "Zoe", "Leo", "Emma", "Jack", "Nina",
                         "the cat", "the dog", "the fox", "the bird")]
    queries, query_mask = left_pad(prompts, tokenizer.pad_token_id)
    context["width"] = queries.shape[1]
    policy_optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.learning_rate)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=settings.value_learning_rate)
    torch.manual_seed(0)
    scores, kls = [], []
    for step in range(30):
        policy.eval(), critic.eval()
        rollout = ppo.generate_rollout(policy, tokenizer, queries, query_mask, settings, accelerator)
        experience, statistics = ppo.score_rollout(rollout, policy, reference, critic, reward_model, normalization,
                                                  settings.kl_coef, settings, accelerator)
        policy.train(), critic.train()
        ppo.ppo_update(policy, critic, policy_optimizer, critic_optimizer, experience, settings, accelerator,
                       torch.Generator().manual_seed(step))
        scores.append(statistics["objective/scores"].item())
        kls.append(statistics["objective/kl"].item())
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.25, scores
    assert max(kls) < 15 and min(kls) > -0.5, kls


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_policy_critic_and_metrics(pretrained_run, tmp_path):
    overrides = ["ppo.max_steps=6", "ppo.save_steps=2", "ppo.per_device_train_batch_size=4",
                 "ppo.gradient_accumulation_steps=2", "ppo.response_length=16", "run.stages=[ppo]"]
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
    assert_identical_weights(a / "checkpoint-6", b / "checkpoint-6", "model_1.safetensors")  # the critic
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    manifest = read_manifest(a)
    assert manifest["status"] == "finished" and manifest["steps"] == 6
