"""Test set-up: Triton kernels run on the CPU interpreter; this must happen before any @triton.jit runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


import pytest  # noqa: E402 - after the environment above


@pytest.fixture(scope="session")
def digits_cnn_file(tmp_path_factory):
    """A state dict of the digits CNN (untrained, seed 0) for command-line runs with --arch
    mpqc.compiler.zoo:digits_cnn."""
    import torch

    from mpqc.compiler.zoo import DigitsCNN

    path = tmp_path_factory.mktemp("digits_cnn") / "m.pt"
    torch.manual_seed(0)
    torch.save(DigitsCNN().state_dict(), path)
    return path
