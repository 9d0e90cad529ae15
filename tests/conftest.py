"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One intra-op thread for the whole suite.

    The tests run tiny tensors, where thread hand-offs cost more than they save, and on a busy
    2-core machine two threads per op made some tests 100x slower. Subprocess tests (CLI, DDP)
    are not affected: they start their own interpreter.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
