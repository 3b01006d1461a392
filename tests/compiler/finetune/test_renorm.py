"""Batch statistics on a BN-folded graph (compiler/finetune/renorm.py): identity at the start, exact fold at the end."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.compiler.capture import capture
from mpqc.compiler.data import make_loader
from mpqc.compiler.finetune import FinetuneConfig, finetune, prepare
from mpqc.compiler.finetune.renorm import BatchRenorm, Renormalizer
from mpqc.compiler.quantize import LayerQuant
from mpqc.compiler.train import evaluate


def _quantized(model, digits, w=3, a=4):
    cap = capture(copy.deepcopy(model), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    return prepare(cap, {op.name: LayerQuant(w, a) for op in cap.graph.layers()}, digits, FinetuneConfig())


def test_batch_renorm_trains_like_bn_and_its_eval_map_is_affine():
    torch.manual_seed(0)
    z = torch.randn(16, 3, 5, 5) * torch.tensor([1.0, 4.0, 0.1]).reshape(1, 3, 1, 1) + 2.0
    m = BatchRenorm(3)
    m.observing = True
    m(z)
    m.start_from_observed()
    m.eval()
    assert torch.allclose(m(z), z, atol=1e-5)  # identity start
    m.train()
    y = m(z)  # batch statistics: each channel comes out at mean = bias, std = |gain|
    assert torch.allclose(y.mean((0, 2, 3)), m.bias.detach(), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3), unbiased=False), m.gain.detach().abs(), rtol=1e-3)
    with torch.no_grad():
        m.gain.mul_(torch.tensor([0.5, -2.0, 3.0]))
        m.running_var.mul_(1.7)
    m.eval()
    a, b = m.affine()
    assert (a > 0).all()
    assert torch.allclose(m(z), a.reshape(1, 3, 1, 1) * z + b.reshape(1, 3, 1, 1), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 6), hw=st.sampled_from([(), (1,), (3,), (1, 1), (2, 5), (4, 4)]),
       offset=st.floats(-50, 50), spread=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_the_fused_training_step_matches_the_explicit_formula(n, c, hw, offset, spread, seed):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, c, *hw, generator=g, dtype=torch.float64) * spread + offset
    gy = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    fused, ref = BatchRenorm(c).double(), BatchRenorm(c).double()
    with torch.no_grad():
        for m in (fused, ref):
            m.gain.copy_(torch.randn(c, generator=torch.Generator().manual_seed(seed)))
            m.bias.copy_(torch.randn(c, generator=torch.Generator().manual_seed(seed + 1)))
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    out = []
    for m, f in ((fused, fused.forward), (ref, ref.explicit)):
        z = z0.clone().requires_grad_()
        y = f(z)
        y.backward(gy)
        out.append((y.detach(), z.grad, m.gain.grad, m.bias.grad))
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-7 * (1 + b.abs().max()))
    assert torch.allclose(fused.running_mean, ref.running_mean, rtol=1e-10)
    assert torch.allclose(fused.running_var, ref.running_var, rtol=1e-10)
    if z0.numel() > c:  # the statistics moved, and the variance kept is the unbiased one, as BatchNorm keeps it
        var = z0.var([0, *range(2, z0.dim())], unbiased=True)
        assert torch.allclose(fused.running_var, 0.9 * 2.0 + 0.1 * var, rtol=1e-10)
    else:
        assert torch.equal(fused.running_var, torch.full((c,), 2.0, dtype=torch.float64))


def test_start_is_the_folded_model_and_fold_is_exact(float_model, digits):
    q = _quantized(float_model, digits)
    x = digits.val.tensors[0][:128]
    before = q(x).detach()
    r = Renormalizer(q)
    assert len(r.modules) == 4  # the four folded convs (the linear head keeps no BN)
    r.calibrate(make_loader(digits.calib, 128), "cpu")
    q.eval()
    assert torch.allclose(q(x), before, atol=1e-4)
    # move every part of the renorm away from the identity, as training would
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in r.modules.values():
            c = m.gain.numel()
            m.gain.mul_(torch.rand(c, generator=g) + 0.5)
            m.bias.add_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.add_(torch.randn(c, generator=g) * 0.1)
            m.running_var.mul_(torch.rand(c, generator=g) + 0.5)
    codes_before = {n: torch.round(q.weight(n) / q.weight_quantizer(n).scale.reshape(-1, 1, 1, 1))
                    for n in r.modules}
    moved = q(x).detach()
    assert not torch.allclose(moved, before, atol=1e-3)
    r.fold()
    assert not hasattr(q.gm, "renorm") and "renorm" not in q.gm.code
    assert torch.allclose(q(x), moved, atol=1e-4, rtol=1e-4)  # the eval-mode model, now in the convs
    for n, c in codes_before.items():  # same integer codes: only the per-channel scale moved
        assert torch.equal(torch.round(q.weight(n) / q.weight_quantizer(n).scale.reshape(-1, 1, 1, 1)), c)
    r.fold()  # idempotent


def test_finetune_with_batch_stats_ends_on_the_captured_graph(float_model, digits):
    q = _quantized(float_model, digits, w=2, a=4)
    keys = set(q.state_dict())
    cfg = FinetuneConfig(epochs=2, lr=0.05, batch_stats=True)
    res = finetune(q, float_model, digits, cfg, progress=False)
    assert set(q.state_dict()) == keys  # folded and detached: what export and model_q.pt expect
    assert res.final_accuracy == pytest.approx(evaluate(q, digits.val))
    assert res.final_accuracy > 80.0, res.final_accuracy


class _Tied(torch.nn.Module):
    """One conv applied twice (shared weight and bias) between two of its own."""

    def __init__(self):
        super().__init__()
        self.c0 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.c(torch.relu(self.c0(x))))))
        return self.fc(x.mean((2, 3)))


def test_a_conv_applied_twice_keeps_its_weight_out_of_the_fold(digits):
    """Folding each use's map into the one shared weight applied both to both uses: a compile of such a model
    trained to 86 % and exported 65 %. Its uses now train without batch statistics; the fold stays exact."""
    torch.manual_seed(0)
    q = _quantized(_Tied().eval(), digits)
    r = Renormalizer(q)
    assert set(r.modules) == {"c0"}, set(r.modules)
    r.calibrate(make_loader(digits.calib, 128), "cpu")
    q.eval()
    with torch.no_grad():
        m = r.modules["c0"]
        m.gain.mul_(1.3)
        m.running_mean.add_(0.1)
    x = digits.val.tensors[0][:64]
    moved = q(x).detach()
    r.fold()
    assert torch.allclose(q(x), moved, atol=1e-4, rtol=1e-4)
