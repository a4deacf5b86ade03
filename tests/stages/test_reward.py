import json

import pytest
import torch

from pipeline.checkpoints import read_manifest
from pipeline.config import load_config
from reward_model import RewardNormalization, load_reward_model
from stages.reward import GroupedPreferenceCollator, grouped_examples, run_reward
from data.formats import ranked_pairs_from_lists
from tests.helpers import SMOKE


def use_pretrain_as_sft(run_dir):
    import shutil
    shutil.copytree(run_dir / "smoke" / "pretrain" / "final", run_dir / "smoke" / "sft" / "final")


def test_pairs_of_one_prompt_stay_in_one_batch_element(smoke_run):
    from data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(smoke_run / "smoke" / "pretrain" / "final")
    prompt = [{"role": "user", "content": "Say something."}]
    pairs = ranked_pairs_from_lists(prompt, ["best", "good", "bad"], group=0) + ranked_pairs_from_lists(
        prompt, ["yes", "no"], group=1)
    examples = grouped_examples(pairs, tokenizer, max_length=64, margin=0.5, where="t", on_bad_rows="error")
    assert [len(e["chosen_ids"]) for e in examples] == [3, 1]
    assert examples[0]["margin"] == [0.5, 1.0, 0.5]  # margin × rank gap
    batch = GroupedPreferenceCollator(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 8  # 4 chosen, then 4 rejected
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]).endswith("best<|end|>")
    assert tokenizer.decode(batch["input_ids"][4][batch["attention_mask"][4].bool()]).endswith("good<|end|>")
    assert batch["margin"].tolist() == [0.5, 1.0, 0.5, 0.0]


def test_reward_smoke_run_reports_accuracy_and_stores_normalization(smoke_run):
    use_pretrain_as_sft(smoke_run)
    config = load_config(SMOKE, [f"run.output_dir={smoke_run}", "reward.max_steps=6", "reward.save_steps=3",
                                 "reward.eval_steps=3"])
    final = run_reward(config)
    model, tokenizer = load_reward_model(final)
    assert model.config.num_labels == 1
    normalization = RewardNormalization.load(final)
    assert normalization.std > 0 and normalization != RewardNormalization()
    metrics = read_manifest(final.parent)["metrics"]
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_gold_accuracy"] <= 1
    assert metrics["annotator_gold_agreement"] > 0.6


def test_reward_on_hh_rlhf_rows_trains_one_step(smoke_run, tmp_path):
    use_pretrain_as_sft(smoke_run)
    rows = [{"chosen": f"\n\nHuman: Can you help me {i}?\n\nAssistant: Sure, happy to.",
             "rejected": f"\n\nHuman: Can you help me {i}?\n\nAssistant: No."} for i in range(12)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(SMOKE, [f"run.output_dir={smoke_run}", f"data.reward.path={data}", "reward.max_steps=1",
                                 "reward.save_steps=1", "data.reward.eval_fraction=0.25"])
    final = run_reward(config)
    manifest = read_manifest(final.parent)
    assert manifest["steps"] == 1 and "eval_gold_accuracy" not in manifest["metrics"]
    assert manifest["metrics"]["eval_pairs"] == 3


def test_bad_preference_row_stops_before_training(smoke_run, tmp_path):
    use_pretrain_as_sft(smoke_run)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    config = load_config(SMOKE, [f"run.output_dir={smoke_run}", f"data.reward.path={data}", "reward.max_steps=1"])
    with pytest.raises(ValueError, match="row 2: 'chosen' and 'rejected' are the same"):
        run_reward(config)
    assert not (smoke_run / "smoke" / "reward").exists()
