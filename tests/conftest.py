import os
import shutil

import pytest

from pipeline.config.loading import load_config
from tests.helpers import SMOKE

# Every stage run by the suite, in-process or in a subprocess (which inherits it), can be told to fail on purpose.
os.environ["RLHF_FAULT_HOOKS"] = "tests.faults.injection"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; stages (and loops) run in-process one after another need it reset."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def smoke_pretrained(tmp_path_factory):
    """One smoke pretraining run shared by the tests of later stages (they copy it before writing)."""
    from accelerate.state import AcceleratorState

    from stages.pretrain import run_pretraining

    root = tmp_path_factory.mktemp("smoke_pretrained")
    run_pretraining(load_config(SMOKE, [f"run.output_dir={root}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    return root


@pytest.fixture
def smoke_run(smoke_pretrained, tmp_path):
    """A private copy of the pretrained smoke run directory: tmp_path/smoke."""
    shutil.copytree(smoke_pretrained / "smoke", tmp_path / "smoke")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory):
    """A 2-layer, 64-wide Llama and our BPE tokenizer with its chat template, saved as a stage's final/ is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny_causal_lm")
    tokenizer = train_bpe_tokenizer(["Mia had a red kite. Sure! Hope this helps. Tom went to the park."] * 20, 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
