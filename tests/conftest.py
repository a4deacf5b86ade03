import shutil

import pytest

from pipeline.config import load_config
from tests.helpers import SMOKE


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
