import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread. Two threads on a loaded 2-core machine cost ~80x here
    (every small op waits for the second thread to be scheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
