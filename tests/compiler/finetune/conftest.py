"""Fine-tuning tests run on tiny tensors: one intra-op thread each."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add overhead, and on a shared 2-core machine they oversubscribe
    # (measured: 12 ms vs 1.3 s per QAT step with 2 threads while other test processes ran)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
