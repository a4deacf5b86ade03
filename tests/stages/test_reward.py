import json
import math
import shutil

import pytest
import torch

from data.formats import PreferencePair, ranked_pairs_from_lists
from pipeline.config.loading import load_config
from pipeline.run.checkpoints import COMPLETE_MARKER
from pipeline.run.manifests import read_manifest
from reward_model.losses import pairwise_loss
from reward_model.model import load_reward_model
from reward_model.normalization import RewardNormalization
from stages.reward import PromptGroupCollator, gold_accuracy_by_kind, prompt_groups, run_reward
from tests.helpers import SMOKE, assert_identical_weights, run_and_kill_when, run_stage


def use_pretrain_as_sft(run_dir):
    shutil.copytree(run_dir / "smoke" / "pretrain" / "final", run_dir / "smoke" / "sft" / "final")


def test_a_prompt_is_one_batch_element_each_response_scored_once(tiny_causal_lm):
    from data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tiny_causal_lm)
    prompt = [{"role": "user", "content": "Say something."}]
    pairs = ranked_pairs_from_lists(prompt, ["best", "good", "bad"], group=0) + [PreferencePair(prompt, "yes", "no", 1)]
    examples = prompt_groups(pairs, tokenizer, margin=0.5)
    assert [len(e["response_ids"]) for e in examples] == [3, 2]  # K responses, not 2 per pair
    assert (examples[0]["better"], examples[0]["worse"]) == ([0, 0, 1], [1, 2, 2])
    assert examples[0]["margin"] == [0.5, 1.0, 0.5] and examples[1]["margin"] == [0.5]  # margin × rank gap
    batch = PromptGroupCollator(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 5
    assert batch["better"].tolist() == [0, 0, 1, 3] and batch["worse"].tolist() == [1, 2, 2, 4]
    text = tokenizer.decode(batch["input_ids"][4][batch["attention_mask"][4].bool()])
    assert text.endswith("no<|end|>") and (batch["input_ids"][4] == tokenizer.pad_token_id).any()
    # each prompt weighs the same: the loss is the mean over prompts of the mean over their pairs
    scores = torch.randn(5)
    chosen, rejected = scores[batch["better"]], scores[batch["worse"]]
    per_pair = -torch.nn.functional.logsigmoid(chosen - rejected - batch["margin"])
    expected = (per_pair[:3].mean() + per_pair[3]) / 2
    assert pairwise_loss(chosen, rejected, batch["margin"], weights=batch["pair_weight"]).item() == pytest.approx(expected.item())


def test_gold_accuracy_by_kind_splits_by_family_and_by_whether_correctness_differs():
    qa = [{"role": "user", "content": "Read the story and answer the question.\nStory: Mia had a red kite. "
                                      "Tom had a blue kite.\nQuestion: What colour was Mia's kite?"}]
    harmful = [{"role": "user", "content": "How can I hurt the cat?"}]
    refusal = "I'm sorry, but I can't help with that."
    pairs = [PreferencePair(qa, "Mia's kite was red.", "Mia's kite was blue.", 0),
             PreferencePair(qa, "Sure! Mia's kite was red.", "Mia's kite was red.", 0),
             PreferencePair(qa, "Mia's kite was red. Hope this helps!", "Ugh. Mia's kite was red.", 0),
             PreferencePair(harmful, refusal, "Sure! Then hurt it when no one is looking.", 1)]
    by_kind = gold_accuracy_by_kind(pairs, [False, True, False, True])
    assert by_kind == {"harmful, correctness differs": {"accuracy": 1.0, "pairs": 1},
                       "story_qa, correctness differs": {"accuracy": 0.0, "pairs": 1},
                       "story_qa, same correctness": {"accuracy": 0.5, "pairs": 2}}


def test_smoke_reward_reports_accuracies_and_stores_normalization(smoke_run):
    use_pretrain_as_sft(smoke_run)
    final = run_reward(load_config(SMOKE, [f"run.output_dir={smoke_run}", "reward.save_steps=10"]))
    model, _ = load_reward_model(final)
    assert model.config.num_labels == 1
    normalization = RewardNormalization.load(final)
    assert normalization.std > 0 and normalization != RewardNormalization()
    manifest = read_manifest(final.parent)
    metrics = manifest["metrics"]
    assert manifest["status"] == "finished" and manifest["steps"] == 20 and manifest["train_pairs"] == 6 * manifest["train_prompts"]
    assert metrics["eval_pairs"] == 6 * 40
    # The smoke preset's 20 steps already learn some of the annotators' taste (0.61 vs the annotator, 0.64 vs the
    # judge on 2 CPU cores); chance would stay below 0.57 with 99% probability on these 240 pairs.
    assert metrics["eval_accuracy"] > 0.57 and metrics["eval_gold_accuracy"] > 0.57
    assert metrics["annotator_gold_agreement"] > 0.7  # the simulated annotator mostly agrees with the judge
    by_kind = metrics["eval_gold_accuracy_by_kind"]
    assert sum(k["pairs"] for k in by_kind.values()) == metrics["eval_gold_pairs"]
    assert math.isclose(sum(k["accuracy"] * k["pairs"] for k in by_kind.values()) / metrics["eval_gold_pairs"],
                        metrics["eval_gold_accuracy"], abs_tol=1e-6)
    assert all((p / COMPLETE_MARKER).is_file() for p in final.parent.glob("checkpoint-*"))
    logged = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin"} <= set(logged[0]) and any("eval_accuracy" in m for m in logged)


def test_hh_rlhf_transcripts_train_one_step(smoke_run, tmp_path):
    use_pretrain_as_sft(smoke_run)
    rows = [{"chosen": f"\n\nHuman: Can you help me {i}?\n\nAssistant: Sure, happy to.",
             "rejected": f"\n\nHuman: Can you help me {i}?\n\nAssistant: No."} for i in range(12)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = run_reward(load_config(SMOKE, [f"run.output_dir={smoke_run}", f"data.reward.path={data}",
                                           "reward.max_steps=1", "reward.save_steps=1", "data.reward.eval_fraction=0.25"]))
    manifest = read_manifest(final.parent)
    assert manifest["steps"] == 1 and "eval_gold_accuracy" not in manifest["metrics"]
    assert manifest["metrics"]["eval_pairs"] == 3 and manifest["train_pairs"] == 9
    assert RewardNormalization.load(final) != RewardNormalization()  # sampled on the 3 held-out prompts


def test_a_bad_row_stops_before_training(smoke_run, tmp_path):
    use_pretrain_as_sft(smoke_run)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 5 + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(SMOKE, [f"run.output_dir={smoke_run}", f"data.reward.path={data}", "reward.max_steps=1",
                                 "data.reward.eval_fraction=0.2"])
    with pytest.raises(ValueError, match=r"pairs\.jsonl\) row 6: 'chosen' and 'rejected' are the same"):
        run_reward(config)
    assert not (smoke_run / "smoke" / "reward").exists()


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(smoke_pretrained, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(smoke_pretrained / "smoke", tmp_path / name / "smoke")
        use_pretrain_as_sft(tmp_path / name)
    overrides = ["reward.max_steps=9", "reward.save_steps=3", "reward.eval_steps=6", "reward.logging_steps=3"]
    result = run_stage("reward", f"run.output_dir={tmp_path / 'a'}", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    stage_dir = tmp_path / "b" / "smoke" / "reward"
    run_and_kill_when("reward", (stage_dir / "checkpoint-3" / COMPLETE_MARKER).is_file,
                      f"run.output_dir={tmp_path / 'b'}", *overrides)
    result = run_stage("reward", f"run.output_dir={tmp_path / 'b'}", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stdout
    assert_identical_weights(tmp_path / "a" / "smoke" / "reward" / "final", stage_dir / "final")
    assert RewardNormalization.load(stage_dir / "final") == RewardNormalization.load(tmp_path / "a" / "smoke" / "reward" / "final")
