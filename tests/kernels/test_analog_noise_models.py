"""The noise models' constants reach the sigma helpers, the helpers agree with the cost model's, and the two ways
the fine-tuning injects shot and weight noise (an elementwise sigma with a per-channel log E; per-channel noise on
a weight-shaped tensor along axis 0) give the same result on the Triton kernel and its reference twin, forward
and backward."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.cost_models import analog as cost
from mpqc.kernels import _launch, analog_noise_log_e, shot_sigma, thermal_sigma, weight_sigma
from mpqc.kernels.analog_noise import _analog_noise_fwd_kernel


def _triton_runs_on_cpu() -> bool:
    if not _launch.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_analog_noise_fwd_kernel, InterpretedFunction)


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
needs_interpreter = pytest.mark.skipif(
    not _triton_runs_on_cpu(), reason="needs triton with TRITON_INTERPRET=1 set before import"
)


@pytest.mark.parametrize("sigma_t", [0.01, 0.3, 10.0])
def test_thermal_sigma_takes_the_targets_sigma_t(sigma_t):
    r_w = torch.tensor([1.0, 2.5])
    got = thermal_sigma(144, r_w, 3.0, 16.0, sigma_t)
    torch.testing.assert_close(got, sigma_t * 12 * r_w * 3.0 / 4)
    np.testing.assert_allclose(got.numpy(), cost.thermal_sigma(144, r_w.numpy(), 3.0, 16.0, sigma_t), rtol=1e-6)
    assert thermal_sigma(144, 1.0, 1.0, 16.0).item() == pytest.approx(0.01 * 12 / 4)  # the seed's default


@pytest.mark.parametrize("scale", [0.1, 0.02, 1.0])
def test_weight_sigma_takes_the_targets_weight_noise(scale):
    r_w = torch.tensor([0.5, 2.0])
    got = weight_sigma(r_w, 25.0, scale)
    torch.testing.assert_close(got, scale * r_w / 5)
    np.testing.assert_allclose(got.numpy(), cost.weight_sigma(r_w.numpy(), 25.0, scale), rtol=1e-6)


def test_shot_sigma_is_the_cost_models():
    w_norm, x_norm = torch.tensor([1.0, 3.0]), torch.tensor([[2.0], [5.0]])
    np.testing.assert_allclose(shot_sigma(w_norm, x_norm, 9, 4.0).numpy(),
                               cost.shot_sigma(w_norm.numpy(), x_norm.numpy(), 9, 4.0), rtol=1e-6)


@st.composite
def injection_cases(draw):
    kind = draw(st.sampled_from(["shot", "weight"]))
    conv = draw(st.booleans())
    c = draw(st.sampled_from([1, 3, 8]))
    if kind == "shot":  # the layer output: (B, C, H, W) or (B, C), per-element sigma, per-channel log E on axis 1/-1
        shape = (draw(st.sampled_from([1, 2, 5])), c, *((draw(st.sampled_from([1, 3, 4])),) * 2 if conv else ()))
        axis = 1 if conv else -1
    else:  # the weight: (C_out, C_in/g, kh, kw) or (C_out, C_in), per-channel sigma and log E on axis 0
        shape = (c, draw(st.sampled_from([1, 3, 7])), *((3, 3) if conv else ()))
        axis = 0
    return {"kind": kind, "shape": shape, "axis": axis, "per_channel_e": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**40)), "offset": draw(st.integers(0, 10_000)),
            "max_block": draw(st.sampled_from([16, 128, 8192]))}


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"] % 2**31)
    shape, axis = case["shape"], case["axis"]
    c = shape[axis]
    if case["kind"] == "shot":
        y = torch.randn(shape, generator=gen)
        s1 = torch.rand(shape, generator=gen) + 0.05  # ||w_j|| ||x_patch|| / sqrt(N): one per output element
    else:
        y = torch.zeros(shape)
        s1 = torch.rand(c, generator=gen) + 0.05  # weight_noise R_w per output channel
    log_e = torch.randn(c, generator=gen) if case["per_channel_e"] else torch.randn((), generator=gen)
    return y, s1, log_e


@needs_interpreter
@settings(max_examples=40, deadline=None)
@given(case=injection_cases())
def test_shot_and_weight_injection_triton_matches_reference_forward_and_backward(case):
    y, s1, log_e = _inputs(case)
    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["offset"]))
    kw = {"seed": case["seed"], "offset": case["offset"], "axis": case["axis"]}
    res = []
    for backend in ("triton", "torch"):
        ys, ss, ll = y.clone().requires_grad_(), s1.clone().requires_grad_(), log_e.clone().requires_grad_()
        with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
            out = analog_noise_log_e(ys, ss, ll, backend=backend, **kw)
            out.backward(gout)
        res.append((out.detach(), ys.grad, ss.grad, ll.grad))
    (o_t, gy_t, gs_t, gl_t), (o_r, gy_r, gs_r, gl_r) = res
    torch.testing.assert_close(o_t, o_r, rtol=0, atol=0)
    torch.testing.assert_close(gy_t, gy_r, rtol=0, atol=0)
    assert gs_t.shape == s1.shape and gl_t.shape == log_e.shape
    scale = float((gout.abs() * 8).sum()) + 1.0  # what the reductions may cancel down from
    torch.testing.assert_close(gs_t, gs_r, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(gl_t, gl_r, rtol=1e-5, atol=1e-6 * scale)


def test_weight_noise_on_a_weight_has_the_per_channel_std():
    c_out = 4
    s1 = torch.tensor([0.1, 0.2, 0.4, 0.8])
    e = torch.tensor([1.0, 4.0, 16.0, 1.0])
    dw = analog_noise_log_e(torch.zeros(c_out, 20_000), s1, e.log(), seed=9, axis=0, backend="torch")
    torch.testing.assert_close(dw.std(dim=1), s1 / e.sqrt(), rtol=0.03, atol=0.0)
    assert math.isclose(float(dw.mean()), 0.0, abs_tol=0.01)
