"""train_float: channels-last on the CPU keeps the model in that layout and trains it like contiguous."""

from __future__ import annotations

import torch

from mpqc.compiler.data import load_data
from mpqc.compiler.train import evaluate, train_float
from mpqc.compiler.zoo import DigitsCNN


def test_channels_last_on_the_cpu_trains_as_well_as_contiguous():
    data = load_data("digits", seed=0)
    models = {}
    for cl in (False, True):
        torch.manual_seed(0)
        models[cl] = train_float(DigitsCNN(), data, epochs=3, seed=0, device="cpu", channels_last=cl)
    # (conv1 reads one channel, and a one-channel kernel is contiguous in both layouts)
    assert models[True].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not models[False].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    # same data order and updates; only the convolutions' summation order differs, which 60 SGD steps amplify
    # from ~1e-8 in the first gradients to ~0.04 in the weights
    diff = max(float((a - b).abs().max()) for a, b in zip(models[False].state_dict().values(),
                                                           models[True].state_dict().values()) if a.is_floating_point())
    assert diff < 0.2, diff
    acc = {cl: evaluate(m, data.val) for cl, m in models.items()}
    assert min(acc.values()) > 90 and abs(acc[True] - acc[False]) < 2.0, acc
