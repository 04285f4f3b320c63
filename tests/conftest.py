import os

import pytest
import torch

os.environ.setdefault("NETDIET_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def mnist5k():
    from netdiet.data import get_dataset
    return get_dataset("mnist5k")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module (use via pytestmark = pytest.mark.usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
