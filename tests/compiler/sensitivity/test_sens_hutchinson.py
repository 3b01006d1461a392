"""Hutchinson's trace estimator against a model whose Hessian is known in closed form (a quadratic)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqc.compiler.capture import capture
from mpqc.compiler.quantize import QuantizedModel
from mpqc.compiler.sensitivity import run_sensitivity
from mpqc.compiler.sensitivity._common import weight_delta
from mpqc.errors import UserError


def half_squared_error(out, target):
    return 0.5 * (out - target).pow(2).sum(-1)


def _quadratic(seed=0, d=12, o=5, n=64):
    """y = W x with loss ½‖Wx − t‖²: per sample, Hessian w.r.t. W is I_o ⊗ x xᵀ, w.r.t. x it is WᵀW."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, o, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(o, d, generator=g))
    mix = torch.randn(d, d, generator=g) / d ** 0.5  # correlated inputs: the Hessian has off-diagonal terms
    x = torch.randn(n, d, generator=g) @ mix + 0.5
    t = torch.randn(n, o, generator=g)
    return model, x, t


def test_trace_matches_the_analytic_hessian_within_5_percent():
    model, x, t = _quadratic()
    table = run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t),
                            {"candidates": (8, 4), "samples": len(x), "batch_size": len(x),
                             "probes": 400, "min_probes": 50, "tol": 0.01},
                            loss_fn=half_squared_error)
    traces = table.meta["traces"]
    w_true = model.weight.shape[0] * float(x.pow(2).sum(1).mean())  # Tr(I_o ⊗ E[x xᵀ]) = o·E‖x‖²
    a_true = float(model.weight.detach().pow(2).sum())  # Tr(WᵀW) = ‖W‖_F², the same for every sample
    name = next(iter(table.layers))
    assert abs(traces[name] - w_true) / w_true < 0.05, (traces[name], w_true)
    act = next(k for k in traces if k != name)
    assert abs(traces[act] - a_true) / a_true < 0.05, (traces[act], a_true)
    assert 50 <= table.meta["probes"] <= 400


def test_score_is_trace_per_element_times_squared_error():
    model, x, t = _quadratic(seed=1)
    cap = capture(model, (x[:2],))
    qm = QuantizedModel(cap)
    table = run_sensitivity("hutchinson", qm, (x, t), {"candidates": (4, 2), "samples": len(x),
                                                        "batch_size": len(x), "probes": 200, "tol": 0.01},
                            loss_fn=half_squared_error)
    name = next(iter(table.layers))
    for b in (4, 2):
        d2 = float(weight_delta(qm, name, b).pow(2).sum())
        expected = table.meta["traces"][name] / model.weight.numel() * d2  # HAWQ-V3: (Tr H / n)·‖Q(W) − W‖²
        assert table.layers[name].w[b] == pytest.approx(expected, rel=1e-6)
    assert table.layers[name].w[2] > table.layers[name].w[4] > 0
    assert table.layers[name].a[2] > table.layers[name].a[4] > 0


def test_channel_granularity_gives_one_score_per_output_channel():
    model, x, t = _quadratic(seed=2)
    table = run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t),
                            {"candidates": (4,), "samples": 32, "granularity": "channel", "probes": 20},
                            loss_fn=half_squared_error)
    ls = next(iter(table.layers.values()))
    assert len(ls.w_channel[4]) == model.weight.shape[0]
    assert all(v >= 0 for v in ls.w_channel[4])


def test_bad_options_are_user_errors():
    model, x, t = _quadratic()
    with pytest.raises(UserError, match="no option 'probe'"):
        run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t), {"probe": 3})
    with pytest.raises(UserError, match="tol"):
        run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t), {"tol": 0})
    with pytest.raises(UserError, match="isolate_probes must be >= 0"):
        run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t), {"isolate_probes": -1})


def test_quadratic_form_matches_the_exact_second_order_term():
    model, x, t = _quadratic(seed=3)
    cap = capture(model, (x[:2],))
    qm = QuantizedModel(cap)
    table = run_sensitivity("hutchinson", qm, (x, t), {"candidates": (4, 2), "samples": len(x),
                                                        "batch_size": len(x), "form": "quadratic", "probes": 300,
                                                        "min_probes": 30, "tol": 0.01},
                            loss_fn=half_squared_error)
    name = next(iter(table.layers))
    for b in (4, 2):
        d = weight_delta(qm, name, b)
        exact = float((x @ d.T).pow(2).sum(1).mean())  # ΔᵀHΔ = E‖Δx‖² for H = I ⊗ E[x xᵀ]
        assert abs(table.layers[name].w[b] - exact) / exact < 0.05, (b, table.layers[name].w[b], exact)


@pytest.mark.parametrize("split", [True, False])
def test_weights_and_activations_get_separate_probes(split):
    """y = Wx with a large residual: ∂²L/∂W∂x holds the residual, so a v shared by W and x buries Tr(WᵀW)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(8, 32, generator=g) * 0.1)
    x = torch.randn(128, 32, generator=g)
    t = torch.randn(128, 8, generator=g) * 20
    table = run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t),
                            {"candidates": (4,), "samples": len(x), "batch_size": 64, "probes": 16,
                             "min_probes": 16, "isolate_probes": 0, "split": split}, loss_fn=half_squared_error)
    a_true = float(model.weight.detach().pow(2).sum())
    act = next(k for k in table.meta["traces"] if k != next(iter(table.layers)))
    err = abs(table.meta["traces"][act] - a_true) / a_true
    assert (err < 0.1) == split, (split, table.meta["traces"][act], a_true)


def _confident_mlp():
    """A wide first layer and a confident classifier: the last layer's trace, Σ(1 − ‖p‖²)‖h‖²/N, is tiny
    beside the cross terms a shared probe picks up from the first layer's 8,192 weights."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 64, generator=g) * 0.05)
        model[2].weight.copy_(torch.randn(4, 128, generator=g) * 2.0)
        model[0].bias.zero_()  # nothing from the global RNG: the test must not depend on what ran before it
        model[2].bias.zero_()
    x = torch.randn(256, 64, generator=g) * 2
    with torch.no_grad():
        p, h = model(x).softmax(-1), torch.relu(model[0](x))
    exact = float(((1 - p.pow(2).sum(1)) * h.pow(2).sum(1)).mean())
    return model, x, model(x).argmax(1).detach(), exact


@pytest.mark.parametrize("isolate", [32, 0])
def test_a_trace_the_shared_probes_leave_unresolved_gets_probes_of_its_own(isolate):
    model, x, t, exact = _confident_mlp()
    table = run_sensitivity("hutchinson", capture(model, (x[:2],)), (x, t),
                            {"candidates": (4,), "samples": len(x), "batch_size": 64, "probes": 16,
                             "min_probes": 16, "isolate_probes": isolate})
    last = list(table.layers)[-1]
    got = table.meta["traces"][last]
    if isolate:
        assert last in table.meta["isolated"]
        assert abs(got - exact) / exact < 0.1, (got, exact)
        assert table.layers[last].w[4] > 0  # not free for the search
    else:  # what the shared probes alone give: the reason for the second pass
        assert table.meta["isolated"] == {}
        assert abs(got - exact) / exact > 0.5, (got, exact)
    first = list(table.layers)[0]
    assert first not in table.meta["isolated"]  # resolved traces keep the shared estimate


@pytest.mark.parametrize("isolate", [16, 0])
def test_quadratic_form_recomputes_an_unresolved_term_exactly_on_its_own(isolate):
    """Shared signs leave the classifier's 2-bit term of this MLP within two standard errors of zero; confined to
    its group the direction gives Δᵀ(HΔ) exactly, and over equal batches that is the closed form."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 64, generator=g))
        model[2].weight.copy_(torch.randn(4, 128, generator=g) * 4)
        model[0].bias.zero_()
        model[2].bias.zero_()
    x = torch.randn(256, 64, generator=g) * 2
    t = model(x).argmax(1).detach()
    qm = QuantizedModel(capture(model, (x[:2],)))
    table = run_sensitivity("hutchinson", qm, (x, t), {"candidates": (4, 2), "samples": len(x), "batch_size": 64,
                                                        "form": "quadratic", "probes": 16, "min_probes": 16,
                                                        "activations": False, "isolate_probes": isolate})
    first, last = list(table.layers)
    with torch.no_grad():  # softmax cross-entropy: per sample ΔᵀHΔ = zᵀ(diag p − ppᵀ)z with z = Δh
        p, h = model(x).softmax(-1), torch.relu(model[0](x))
        z = h @ weight_delta(qm, last, 2).T
        exact = float(((p * z * z).sum(1) - (p * z).sum(1).pow(2)).mean())
    got = table.layers[last].w[2]
    if isolate:
        assert 2 in table.meta["isolated"][last]
        assert got == pytest.approx(exact, rel=1e-4)
    else:
        assert table.meta["isolated"] == {}
        assert abs(got - exact) / exact > 0.05, (got, exact)
    assert 2 not in table.meta["isolated"].get(first, [])  # a resolved term keeps the shared estimate
