import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on a shared 2-core CPU they run faster than on contended two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
