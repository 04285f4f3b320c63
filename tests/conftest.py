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


class _CountedOn:
    """The device each counter.count_pass ran on, in order (a spy: meta for a meta copy, cpu for real tensors)."""

    def __init__(self, monkeypatch) -> None:
        from netdiet.analysis import counter
        self.devices: list[str] = []
        real = counter.count_pass

        def spy(model, args, *rest, **kw):
            self.devices.append(args[0].device.type)
            return real(model, args, *rest, **kw)

        monkeypatch.setattr(counter, "count_pass", spy)
        monkeypatch.setattr("netdiet.analysis.passes.count_pass", spy)


@pytest.fixture
def counted_on(monkeypatch):
    """`counted_on.devices`: where each count of the test ran (see _CountedOn)."""
    return _CountedOn(monkeypatch)
