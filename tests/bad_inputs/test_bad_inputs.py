"""Every malformed input of cases.yaml is refused by `rlhf run` before any training: exit code 2, one line
naming the field or row, and the run directory exactly as it was."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli.main import main

CASES = yaml.safe_load((Path(__file__).parent / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A valid tiny causal LM, a reward-model checkpoint, one without chat template, one truncated."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from data.tokenizer import train_bpe_tokenizer
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = train_bpe_tokenizer(["Mia had a red kite."] * 20, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    paths = {name: root / name for name in ("model", "reward_model", "no_template", "truncated")}
    for name in ("model", "no_template", "truncated"):
        LlamaForCausalLM(config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(paths["reward_model"])
    tokenizer.save_pretrained(paths["reward_model"])
    for file in paths["no_template"].glob("chat_template*"):
        file.unlink()
    configuration = paths["no_template"] / "tokenizer_config.json"
    settings = json.loads(configuration.read_text())
    settings.pop("chat_template", None)
    configuration.write_text(json.dumps(settings))
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {name: str(path) for name, path in paths.items()}


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30 and len({c["name"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_is_refused_before_anything_is_written(case, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    for name, text in case.get("files", {}).items():
        (case_dir / name).write_text(text)
    for name, hexadecimal in case.get("files_hex", {}).items():
        (case_dir / name).write_bytes(bytes.fromhex(hexadecimal))
    text = case["config"].replace("{dir}", str(case_dir))
    for name, path in checkpoints.items():
        text = text.replace("{" + name + "}", path)
    runs = tmp_path / "runs"
    (runs / "smoke" / "pretrain").mkdir(parents=True)
    (runs / "smoke" / "pretrain" / "keep.txt").write_text("work already done")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    before = snapshot(runs), snapshot(case_dir)
    code = main(["run", str(config_file), f"run.output_dir={runs}"] if "output_dir" not in text else ["run", str(config_file)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1, error
    assert error.startswith("error: ")
    assert re.search(case["error"], error), error
    assert (snapshot(runs), snapshot(case_dir)) == before
