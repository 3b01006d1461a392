"""The measured method against an independent computation: quantize one group, run the whole model, compare."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mpqc.compiler.capture import capture
from mpqc.compiler.data import DataSplits
from mpqc.compiler.quantize import QuantizedModel
from mpqc.compiler.sensitivity import run_sensitivity
from mpqc.compiler.zoo import DigitsCNN
from mpqc.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DigitsCNN(width=4).eval()
    with torch.no_grad():  # give the random BNs some spread so folding is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    data = DataSplits("toy", TensorDataset(x[:64], y[:64]), TensorDataset(x[:32], y[:32]),
                      TensorDataset(x[64:], y[64:]), 10)
    qm = QuantizedModel(capture(model, (x[:2],), fold_bn=True))
    qm.calibrate([(x[:32], y[:32])])
    return qm, data


def _independent(qm: QuantizedModel, data: DataSplits, kind: str, layer: str, bits: int, metric: str) -> float:
    """Whole-model forward passes of a re-quantized copy: no cones, no interpreter, one batch."""
    x, y = data.val.tensors
    qm.disable()
    with torch.no_grad():
        ref = qm(x)
        if kind == "w":
            qm.set_precision(layer, w_bits=bits)
        else:
            qm.set_precision(layer, a_bits=bits)
        out = qm(x)
    qm.disable()
    if metric == "kl":
        return float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True,
                              reduction="batchmean"))
    return max(float(F.cross_entropy(out.double(), y) - F.cross_entropy(ref.double(), y)), 0.0)


@pytest.mark.parametrize("metric, cone", [("kl", True), ("kl", False), ("loss", True)])
def test_eval_matches_an_independent_computation(tiny, metric, cone):
    qm, data = tiny
    table = run_sensitivity("eval", qm, data, {"candidates": (5, 2), "samples": 32, "batch_size": 12,
                                               "metric": metric, "cone": cone})
    layers = [op.name for op in qm.graph_ir.layers()]
    assert set(table.layers) == set(layers)
    for layer in layers:
        for b in (5, 2):
            for kind in ("w", "a"):
                got = getattr(table.layers[layer], kind)[b]
                want = _independent(qm, data, kind, layer, b, metric)
                assert got == pytest.approx(want, rel=1e-4, abs=1e-7), (layer, kind, b, got, want)
    if metric == "kl":  # the damage grows as bits drop (a loss change of a random model may be clipped to 0)
        assert all(table.layers[n].w[2] > table.layers[n].w[5] for n in layers)


def test_eval_rejects_channel_granularity(tiny):
    qm, data = tiny
    with pytest.raises(UserError, match="granularity layer"):
        run_sensitivity("eval", qm, data, {"granularity": "channel"})
