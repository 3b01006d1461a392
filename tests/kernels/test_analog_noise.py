"""Analog noise: reproducible Philox noise, Triton == twin bit for bit, sigma / log E gradients."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.cost_models import analog as cost
from mpqc.kernels import (
    _launch,
    _philox,
    analog_noise,
    analog_noise_log_e,
    analog_noise_log_e_reference,
    analog_noise_reference,
    philox_randn,
    shot_sigma,
    thermal_sigma,
    weight_sigma,
)
from mpqc.kernels.analog_noise import _analog_noise_fwd_kernel


def _triton_runs_on_cpu() -> bool:
    if not _launch.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_analog_noise_fwd_kernel, InterpretedFunction)


# numpy inside the interpreter warns on inf - inf and inf casts that the kernels handle on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
needs_interpreter = pytest.mark.skipif(
    not _triton_runs_on_cpu(), reason="needs triton with TRITON_INTERPRET=1 set before import"
)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    ia = a.detach().cpu().contiguous().reshape(-1).view(_INT_VIEW[a.dtype])
    ib = b.detach().cpu().contiguous().reshape(-1).view(_INT_VIEW[b.dtype])
    bad = (ia != ib).nonzero().flatten()
    first = bad[:5]
    assert len(bad) == 0, f"{len(bad)} differ; first {first.tolist()}: {a.reshape(-1)[first]} vs {b.reshape(-1)[first]}"


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        # Random123 known-answer vectors for Philox4x32-10 (Salmon et al. 2011, kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = [torch.tensor([c]) for c in counter]
    out = _philox.philox4x32(key[0] | (key[1] << 32), *words)
    assert tuple(int(w) for w in out) == expected


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 1, 2**32 - 100, 2**40 + 3])
def test_torch_randn_equals_triton_randn_bit_for_bit(seed, offset):
    y = torch.zeros(1000)
    with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", 256):
        n_triton = analog_noise(y, torch.tensor(1.0), seed=seed, offset=offset, backend="triton")
    assert_bitwise_equal(n_triton, philox_randn((1000,), seed=seed, offset=offset))


def test_same_seed_same_noise_and_different_seed_different_noise():
    y = torch.zeros(4, 5, 6)
    a = analog_noise_reference(y, torch.tensor(1.0), seed=3)
    assert torch.equal(a, analog_noise_reference(y, torch.tensor(1.0), seed=3))
    b = analog_noise_reference(y, torch.tensor(1.0), seed=4)
    assert (a != b).float().mean() > 0.99


def test_offset_shifts_the_counter():
    y = torch.zeros(100)
    full = analog_noise_reference(torch.zeros(130), torch.tensor(1.0), seed=9)
    assert torch.equal(analog_noise_reference(y, torch.tensor(1.0), seed=9, offset=30), full[30:])


def test_noise_is_standard_normal():
    n = philox_randn((200_000,), seed=2024)
    assert abs(n.mean().item()) < 0.01
    assert abs(n.std().item() - 1.0) < 0.01
    # Box-Muller tails: P(|n| > 3) = 0.0027
    assert abs((n.abs() > 3).float().mean().item() - 0.0027) < 0.0006


def test_empirical_std_matches_per_channel_sigma():
    sigma = torch.tensor([0.1, 0.5, 2.0])
    out = analog_noise_reference(torch.zeros(20_000, 3), sigma, seed=11, axis=1)
    torch.testing.assert_close(out.std(dim=0), sigma, rtol=0.02, atol=0.0)


# --------------------------------------------------------------------------------------------
# Triton == reference
# --------------------------------------------------------------------------------------------


@st.composite
def noise_cases(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 5, 7, 13, 16)), min_size=rank, max_size=rank)))
    mode = draw(st.sampled_from(["scalar", "channel", "full", "broadcast"]))
    axis = draw(st.integers(-rank, rank - 1))
    return {
        "shape": shape,
        "mode": mode,
        "axis": axis,
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.one_of(st.integers(0, 2**31 - 1), st.integers(2**31, 2**63 - 1))),
        "offset": draw(st.one_of(st.integers(0, 1000), st.integers(2**32 - 500, 2**40))),
        "max_block": draw(st.sampled_from([16, 128, 8192])),
    }


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"] % 2**31)
    shape, axis = case["shape"], case["axis"]
    y = (torch.randn(shape, generator=gen) * 3).to(case["dtype"])
    if case["mode"] == "scalar":
        sigma = torch.rand((), generator=gen) + 0.1
    elif case["mode"] == "channel":
        sigma = torch.rand(shape[axis], generator=gen) + 0.1
    elif case["mode"] == "full":
        sigma = torch.rand(shape, generator=gen) + 0.1
    else:  # e.g. shot noise [B, 1, H, W]: size 1 along the channel axis
        sigma = torch.rand([1 if d == axis % len(shape) else s for d, s in enumerate(shape)], generator=gen)
    return y, sigma


@needs_interpreter
@settings(max_examples=60, deadline=None)
@given(case=noise_cases())
def test_triton_forward_is_bitwise_equal_to_reference(case):
    y, sigma = make_inputs(case)
    kw = {"seed": case["seed"], "offset": case["offset"], "axis": case["axis"]}
    with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
        out = analog_noise(y, sigma, backend="triton", **kw)
    assert_bitwise_equal(out, analog_noise_reference(y, sigma, **kw))


@needs_interpreter
@settings(max_examples=40, deadline=None)
@given(case=noise_cases(dtypes=(torch.float32,)))
def test_triton_gradients_match_reference(case):
    y, sigma = make_inputs(case)
    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] % 1000))
    kw = {"seed": case["seed"], "offset": case["offset"], "axis": case["axis"]}
    grads = []
    for backend in ("triton", "torch"):
        ys, ss = y.clone().requires_grad_(), sigma.clone().requires_grad_()
        with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
            analog_noise(ys, ss, backend=backend, **kw).backward(gout)
        grads.append((ys.grad, ss.grad))
    (gy_t, gs_t), (gy_r, gs_r) = grads
    assert_bitwise_equal(gy_t, gy_r)
    assert gs_t.shape == sigma.shape
    n = philox_randn(y.shape, seed=case["seed"], offset=case["offset"])
    mag = (gout * n).abs().double()  # what the sums may cancel down from
    if case["mode"] == "channel":
        mag = mag.sum([d for d in range(y.dim()) if d != case["axis"] % y.dim()]) if y.dim() > 1 else mag
    mag = mag.sum_to_size(sigma.shape)
    diff = (gs_t.double() - gs_r.double()).abs()
    assert (diff <= 1e-6 * gs_r.double().abs() + 1e-6 * mag + 1e-12).all()


@needs_interpreter
def test_triton_log_e_gradients_match_reference():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 6, 5, generator=gen)
    s1 = torch.rand(6, generator=gen) + 0.1
    log_e = torch.randn(6, generator=gen)
    gout = torch.randn(4, 6, 5, generator=gen)
    grads = []
    for backend in ("triton", "torch"):
        ss, ll = s1.clone().requires_grad_(), log_e.clone().requires_grad_()
        out = analog_noise(y, ss, seed=5, axis=1, log_e=ll, backend=backend)
        out.backward(gout)
        grads.append((out, ss.grad, ll.grad))
    assert_bitwise_equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Gradients of the reference: finite differences in float64, closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_shape,axis", [((), None), ((5,), 1), ((3, 5, 4), None), ((3, 1, 4), 1)])
def test_reference_gradcheck_y_and_sigma(sigma_shape, axis):
    y = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(sigma_shape, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: analog_noise_reference(a, b, seed=17, axis=axis), (y, sigma))


@pytest.mark.parametrize("shapes,axis", [(((), ()), None), (((5,), (5,)), 1), (((3, 5, 4), (5,)), 1)])
def test_reference_gradcheck_log_e(shapes, axis):
    y = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    s1 = (torch.rand(shapes[0], dtype=torch.float64) + 0.1).requires_grad_()
    log_e = torch.randn(shapes[1], dtype=torch.float64, requires_grad=True)

    def fn(a, b, c):
        return analog_noise_log_e_reference(a, b, c, seed=23, offset=5, axis=axis)

    assert torch.autograd.gradcheck(fn, (y, s1, log_e))


def test_sigma_and_log_e_gradients_have_the_closed_form():
    y = torch.zeros(7, 3)
    gout = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    n = philox_randn((7, 3), seed=8)
    sigma = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    analog_noise_reference(y, sigma, seed=8, axis=1).backward(gout)
    torch.testing.assert_close(sigma.grad, (gout * n).sum(0))
    s1 = torch.tensor([0.5, 1.0, 2.0])
    log_e = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    analog_noise_log_e(y, s1, log_e, seed=8, axis=1).backward(gout)
    sig = s1 * torch.exp(-log_e.detach() / 2)
    torch.testing.assert_close(log_e.grad, (gout * n * (-sig / 2)).sum(0))


def test_auto_backend_on_cpu_is_the_reference():
    y = torch.randn(10)
    assert torch.equal(analog_noise(y, 0.3, seed=1), analog_noise_reference(y, torch.tensor(0.3), seed=1))


@pytest.mark.parametrize(
    "kwargs,err",
    [
        ({"sigma": torch.ones(4), "seed": 1}, ValueError),  # not broadcastable, no axis
        ({"sigma": torch.ones(3), "seed": -1}, ValueError),
        ({"sigma": torch.ones(3), "seed": 2**63}, ValueError),
        ({"sigma": torch.ones(3), "seed": 1.5}, TypeError),
        ({"sigma": torch.ones(3), "seed": 1, "offset": -1}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs, err):
    kwargs = dict(kwargs)
    sigma = kwargs.pop("sigma")
    with pytest.raises(err):
        analog_noise(torch.zeros(2, 3), sigma, **kwargs)


# --------------------------------------------------------------------------------------------
# Noise models (seeds.md 2.2)
# --------------------------------------------------------------------------------------------


def test_thermal_sigma_formula():
    # 0.01 * sqrt(N) * R_w * R_x / sqrt(E) with N = 3*3*64, R_w = 2, R_x = 6, E = 100
    assert thermal_sigma(576, 2.0, 6.0, 100.0).item() == pytest.approx(0.01 * 24 * 2 * 6 / 10)
    r_w = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(thermal_sigma(4, r_w, 3.0, torch.tensor(4.0)), 0.01 * 2 * r_w * 3 / 2)


def test_shot_sigma_formula_per_channel_and_sample():
    w_norm = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    x_norm = torch.tensor([4.0, 8.0]).view(2, 1, 1, 1)
    sigma = shot_sigma(w_norm, x_norm, 16, 25.0)
    assert sigma.shape == (2, 3, 1, 1)
    expected = torch.outer(torch.tensor([4.0, 8.0]), torch.tensor([1.0, 2.0, 3.0])) / 20  # sqrt(16) * sqrt(25)
    torch.testing.assert_close(sigma.reshape(2, 3), expected)


def test_weight_sigma_formula_and_energy_scaling():
    assert weight_sigma(2.0, 4.0).item() == pytest.approx(0.1 * 2.0 / 2.0)
    assert weight_sigma(1.0, 100.0).item() == pytest.approx(1 / math.sqrt(100 * 100))
    # quadrupling E halves sigma (variance ~ 1/E: dynamic precision repeats and averages)
    e = torch.tensor(3.0, requires_grad=True)
    torch.testing.assert_close(weight_sigma(1.0, 4 * e), weight_sigma(1.0, e) / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_matches_reference_to_a_few_ulp():
    # CUDA's log/sin/cos are not numpy's: integers and uniforms match, normals to a few ulp.
    y = torch.randn(64, 33, 17)
    sigma = torch.rand(33) + 0.1
    out = analog_noise(y.cuda(), sigma.cuda(), seed=77, axis=1, backend="triton").cpu()
    torch.testing.assert_close(out, analog_noise_reference(y, sigma, seed=77, axis=1), rtol=1e-5, atol=1e-5)


def test_fast_cpu_backend_is_seeded_and_has_the_right_spread():
    from mpqc.kernels import analog_noise

    y = torch.zeros(200_000)
    sigma = torch.tensor(0.3, requires_grad=True)
    a = analog_noise(y, sigma, seed=5, offset=7, backend="fast")
    b = analog_noise(y, sigma, seed=5, offset=7, backend="fast")
    c = analog_noise(y, sigma, seed=5, offset=8, backend="fast")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.std()) - 0.3) < 0.01
    a.sum().backward()
    torch.testing.assert_close(sigma.grad, (a / 0.3).sum().detach(), rtol=1e-4, atol=1e-2)


# ---- the noise models' constants, and the two ways fine-tuning injects shot and weight noise -----------------
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
