import sys
from pathlib import Path

import pytest
import torch

# The bench scripts import each other as top-level modules (they run as `python bench/x.py`); so do the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run no faster on more threads, and on a shared machine spinning threads slow everyone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
