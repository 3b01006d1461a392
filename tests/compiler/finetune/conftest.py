"""Fine-tuning tests run on tiny tensors: one intra-op thread each; the digits data and a small float CNN."""

import pytest
import torch

from mpqc.compiler.data import load_data
from mpqc.compiler.train import train_float
from mpqc.compiler.zoo import DigitsCNN


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add overhead, and on a shared 2-core machine they oversubscribe
    # (measured: 12 ms vs 1.3 s per QAT step with 2 threads while other test processes ran)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def float_model(digits):
    """The digits CNN after 6 float epochs (test modules that need a better one override this)."""
    torch.manual_seed(0)
    m = DigitsCNN()
    train_float(m, digits, epochs=6, seed=0)
    return m.eval()
