"""Uhlich (d, x_max) fake quantization: Triton versus twin, seeds.md 4.1 gradients, bit inference."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.kernels import (
    _launch,
    fake_quant_dxmax,
    fake_quant_dxmax_reference,
    fake_quant_reference,
    inferred_bits,
    pow2_round,
)
from mpqc.kernels.fake_quant_dxmax import _fake_quant_dxmax_fwd_kernel


def _triton_runs_on_cpu() -> bool:
    if not _launch.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fake_quant_dxmax_fwd_kernel, InterpretedFunction)


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


@st.composite
def dx_cases(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 5, 7, 11, 16)), min_size=rank, max_size=rank)))
    return {
        "shape": shape,
        "signed": draw(st.booleans()),
        "dtype": draw(st.sampled_from(dtypes)),
        "d": draw(st.floats(2**-8, 1.0)),
        "levels": draw(st.floats(0.6, 140.0)),  # x_max / d, not necessarily on the grid
        "seed": draw(st.integers(0, 2**31 - 1)),
        "max_block": draw(st.sampled_from([16, 128, 8192])),
    }


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    d = torch.tensor(case["d"])
    d_q = float(pow2_round(d))
    xmax = torch.tensor(case["levels"] * d_q)
    numel = math.prod(case["shape"])
    k = torch.randint(-int(case["levels"]) - 3, int(case["levels"]) + 4, (numel,), generator=gen).float()
    frac = torch.where(torch.rand(numel, generator=gen) < 0.5, 0.5, torch.rand(numel, generator=gen) - 0.5)
    x = ((k + frac) * d_q).reshape(case["shape"]).to(case["dtype"])  # exact ties for the pow2 step
    return x, d, xmax


@needs_interpreter
@settings(max_examples=60, deadline=None)
@given(case=dx_cases())
def test_triton_forward_is_bitwise_equal_to_reference(case):
    x, d, xmax = make_inputs(case)
    with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
        y = fake_quant_dxmax(x, d, xmax, signed=case["signed"], backend="triton")
    assert_bitwise_equal(y, fake_quant_dxmax_reference(x, d, xmax, signed=case["signed"]))


@needs_interpreter
@settings(max_examples=40, deadline=None)
@given(case=dx_cases(dtypes=(torch.float32,)))
def test_triton_gradients_match_reference(case):
    x, d, xmax = make_inputs(case)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(case["seed"] + 7))
    grads = []
    for backend in ("triton", "torch"):
        xs, ds, ms = x.clone().requires_grad_(), d.clone().requires_grad_(), xmax.clone().requires_grad_()
        with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
            fake_quant_dxmax(xs, ds, ms, signed=case["signed"], backend=backend).backward(gy)
        grads.append((xs.grad, ds.grad, ms.grad))
    (gx_t, gd_t, gm_t), (gx_r, gd_r, gm_r) = grads
    assert_bitwise_equal(gx_t, gx_r)
    mag = gy.abs().sum()  # every per-element term is at most 1 in magnitude
    assert abs(float(gd_t) - float(gd_r)) <= 1e-6 * abs(float(gd_r)) + 1e-6 * float(mag)
    assert abs(float(gm_t) - float(gm_r)) <= 1e-6 * abs(float(gm_r)) + 1e-6 * float(mag)


@needs_interpreter
def test_triton_and_reference_agree_on_the_hand_example():
    x = torch.tensor([0.1, -0.3, 1.5, -2.0, 0.9])
    for signed in (True, False):
        y_t = fake_quant_dxmax(x, torch.tensor(0.25), torch.tensor(1.0), signed=signed, backend="triton")
        assert_bitwise_equal(y_t, fake_quant_dxmax_reference(x, torch.tensor(0.25), torch.tensor(1.0), signed=signed))


@pytest.mark.parametrize(
    "signed,y_expected,gx_expected,gd_expected,gm_expected",
    [
        # inside: 0.1, -0.3, 0.9 -> u = 0.4, -1.2, 3.6 -> round(u) - u = -0.4, 0.2, 0.4;
        # outside: 1.5 -> +1, -2.0 -> -1 (signed) / 0 (unsigned, below x_min = 0)
        (True, [0.0, -0.25, 1.0, -1.0, 1.0], [1, 2, 0, 0, 5], 1 * -0.4 + 2 * 0.2 + 5 * 0.4, 3 * 1 + 4 * -1),
        (False, [0.0, 0.0, 1.0, 0.0, 1.0], [1, 0, 0, 0, 5], 1 * -0.4 + 5 * 0.4, 3 * 1),
    ],
)
def test_reference_gradients_follow_seeds_u3(signed, y_expected, gx_expected, gd_expected, gm_expected):
    x = torch.tensor([0.1, -0.3, 1.5, -2.0, 0.9], requires_grad=True)
    d = torch.tensor(0.25, requires_grad=True)  # already a power of two: d_q / d = 1
    xmax = torch.tensor(1.0, requires_grad=True)
    y = fake_quant_dxmax_reference(x, d, xmax, signed=signed)
    torch.testing.assert_close(y, torch.tensor(y_expected))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.grad.tolist() == [float(v) for v in gx_expected]
    torch.testing.assert_close(d.grad, torch.tensor(gd_expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xmax.grad, torch.tensor(float(gm_expected)))


def test_power_of_two_snap_and_its_straight_through_gradient():
    d = torch.tensor(0.3, requires_grad=True)  # log2 0.3 = -1.74 -> 2^-2
    d_q = pow2_round(d)
    assert d_q.item() == 0.25
    d_q.backward()
    torch.testing.assert_close(d.grad, torch.tensor(0.25 / 0.3))
    # the chain reaches d through the quantizer: dQ/dd = (dQ/dd_q) * d_q / d
    x = torch.tensor([0.1, 0.9])
    d1 = torch.tensor(0.3, requires_grad=True)
    fake_quant_dxmax_reference(x, d1, torch.tensor(1.0)).sum().backward()
    d2 = torch.tensor(0.25, requires_grad=True)
    fake_quant_dxmax_reference(x, d2, torch.tensor(1.0)).sum().backward()
    torch.testing.assert_close(d1.grad, d2.grad * 0.25 / 0.3)


def test_unsigned_dxmax_on_the_grid_equals_lsq_style_fake_quant():
    # d a power of two and x_max = d (2^b - 1): clip-then-round equals round-then-clamp.
    x = torch.randn(4000, generator=torch.Generator().manual_seed(5)) * 2
    for b in (1, 2, 4, 8):
        d = 2.0**-3
        y = fake_quant_dxmax_reference(x, torch.tensor(d), torch.tensor(d * (2**b - 1)), signed=False)
        assert torch.equal(y, fake_quant_reference(x, torch.tensor(d), b, signed=False))


def test_ranges_clip_parameters_and_zero_their_gradients_outside():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    d = torch.tensor(4.0, requires_grad=True)
    xmax = torch.tensor(500.0, requires_grad=True)
    y = fake_quant_dxmax_reference(x, d, xmax, d_range=(2**-8, 1.0), xmax_range=(2**-8, 127.0))
    expected = fake_quant_dxmax_reference(x, torch.tensor(1.0), torch.tensor(127.0))
    assert torch.equal(y, expected)
    y.sum().backward()
    assert d.grad.item() == 0.0 and xmax.grad.item() == 0.0


@pytest.mark.parametrize(
    "d,xmax,signed,bits",
    [
        (2**-3, 0.875, True, 4),  # seeds.md section 6 unit test: weights, 7 levels + sign
        (2**-3, 1.875, False, 4),  # activations: 15 levels
        (2**-3, 0.9, True, 4),  # x_max snapped to round(7.2) * d = 0.875
        (0.1, 0.875, True, 4),  # d snapped to 2^-3
        (2**-3, 0.125, True, 2),  # one level + sign
        (2**-3, 0.01, True, 2),  # below one level: b_min = 2 for weights
        (2**-3, 0.01, False, 1),  # b_min = 1 for activations
        (2**-8, 127.0, True, 16),  # not clipped at 8: the paper's first layers go to 9-10
        (1.0, 255.0, False, 8),
    ],
)
def test_inferred_bits_follow_the_seed_code(d, xmax, signed, bits):
    assert int(inferred_bits(d, xmax, signed)) == bits


@settings(max_examples=50, deadline=None)
@given(b=st.integers(2, 12), k=st.integers(-8, 0), signed=st.booleans())
def test_inferred_bits_invert_the_level_count(b, k, signed):
    d = 2.0**k
    levels = 2 ** (b - 1) - 1 if signed else 2**b - 1
    assert int(inferred_bits(torch.tensor(d), torch.tensor(d * levels), signed)) == b
    # one more level needs one more bit
    assert int(inferred_bits(torch.tensor(d), torch.tensor(d * (levels + 1)), signed)) == b + 1


def test_inferred_bits_broadcasts_and_takes_b_min():
    out = inferred_bits(torch.tensor([2**-3, 2**-4]), torch.tensor([0.875, 0.875]), True, b_min=5)
    assert out.tolist() == [5, 5] and out.dtype == torch.int64


def test_per_tensor_only():
    with pytest.raises(ValueError):
        fake_quant_dxmax(torch.randn(3, 4), torch.ones(3), torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_triton_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 33, 17, generator=gen) * 2).to(dtype)
    gy = torch.randn(x.shape, generator=gen).to(dtype)
    out = []
    for backend, dev in (("triton", "cuda"), ("torch", "cpu")):
        xs = x.to(dev).requires_grad_()
        d = torch.tensor(0.1, device=dev, requires_grad=True)
        m = torch.tensor(1.3, device=dev, requires_grad=True)
        y = fake_quant_dxmax(xs, d, m, backend=backend)
        y.backward(gy.to(dev))
        out.append((y.cpu(), xs.grad.cpu(), d.grad.cpu(), m.grad.cpu()))
    assert_bitwise_equal(out[0][0], out[1][0])
    assert_bitwise_equal(out[0][1], out[1][1])
    torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[0][3], out[1][3], rtol=1e-5, atol=1e-4)
