"""Suite-wide settings.

One torch thread: the tiny models spend their time in thread hand-offs rather than maths,
multi-threaded CPU kernels reduce in varying order (bit-exact comparisons need one thread),
and a busy 2-core machine slows a 2-thread run by orders of magnitude.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
