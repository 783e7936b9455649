import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny inputs skip OpenMP's per-op synchronisation, and in-process results match
    subprocesses run with one thread (CPU kernels may sum in a thread-dependent order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
