"""Fake-quant kernels: Triton (CPU interpreter) versus the PyTorch twin, and the twin pinned.

Run with TRITON_INTERPRET=1 (tests/conftest.py sets it) so the Triton path runs on CPU.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.kernels import _launch, fake_quant, fake_quant_reference, quant_range
from mpqc.kernels.fake_quant import _fake_quant_fwd_kernel


def _triton_runs_on_cpu() -> bool:
    if not _launch.HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fake_quant_fwd_kernel, InterpretedFunction)


# numpy inside the interpreter warns on inf - inf and inf casts that the kernels handle on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
needs_interpreter = pytest.mark.skipif(
    not _triton_runs_on_cpu(), reason="needs triton with TRITON_INTERPRET=1 set before import"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIMS = (1, 2, 3, 5, 7, 8, 13, 16, 31)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bit pattern everywhere (NaNs only need to be NaN in both)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ia = a.detach().cpu().contiguous().reshape(-1).view(_INT_VIEW[a.dtype])
    ib = b.detach().cpu().contiguous().reshape(-1).view(_INT_VIEW[b.dtype])
    both_nan = torch.isnan(a.detach().cpu().reshape(-1)) & torch.isnan(b.detach().cpu().reshape(-1))
    bad = ((ia != ib) & ~both_nan).nonzero().flatten()
    if len(bad):
        i = bad[:5]
        fa, fb = a.detach().cpu().reshape(-1)[i], b.detach().cpu().reshape(-1)[i]
        raise AssertionError(f"{len(bad)} of {a.numel()} elements differ; first {i.tolist()}: {fa} vs {fb}")


@st.composite
def fq_cases(draw, dtypes=FLOAT_DTYPES):
    """A shape, axis, scale/bits granularity, signedness, dtype and a value seed."""
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from(DIMS), min_size=rank, max_size=rank)))
    if math.prod(shape) > 2500:
        shape = shape[:-1] + (1,)
    axis = draw(st.one_of(st.none(), st.integers(-rank, rank - 1)))
    scale_pc = axis is not None and draw(st.booleans())
    bits_pc = axis is not None and draw(st.booleans())
    return {
        "shape": shape,
        "axis": axis,
        "scale_pc": scale_pc,
        "bits_pc": bits_pc,
        "signed": draw(st.booleans()),
        "dtype": draw(st.sampled_from(dtypes)),
        "pow2_scale": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "max_block": draw(st.sampled_from([16, 64, 8192])),
    }


def make_inputs(case):
    """Values that hit exact .5 ties (power-of-two scales), clipping, -0.0 and huge inputs."""
    gen = torch.Generator().manual_seed(case["seed"])
    shape, axis, signed = case["shape"], case["axis"], case["signed"]
    n_ch = shape[axis] if axis is not None else 1
    low = 2 if signed else 1
    if case["bits_pc"]:
        bits = torch.randint(low, 9, (n_ch,), generator=gen)
    else:
        bits = int(torch.randint(low, 9, (1,), generator=gen))
    n_scale = n_ch if case["scale_pc"] else 1
    if case["pow2_scale"]:
        scale = torch.exp2(torch.randint(-4, 3, (n_scale,), generator=gen).float())
    else:
        scale = torch.rand(n_scale, generator=gen) * 2.0 + 0.05
    if not case["scale_pc"]:
        scale = scale.reshape(())
    qmin, qmax = quant_range(bits, signed)
    lo, hi = float(qmin.min()), float(qmax.max())
    numel = math.prod(shape)
    k = torch.randint(int(lo) - 3, int(hi) + 4, (numel,), generator=gen).float()
    frac = torch.rand(numel, generator=gen) - 0.5
    pick = torch.randint(0, 4, (numel,), generator=gen)
    frac = torch.where(pick == 0, 0.5, torch.where(pick == 1, -0.5, torch.where(pick == 2, 0.0, frac)))
    x = (k + frac).reshape(shape)
    if case["scale_pc"]:
        x = x * scale.reshape([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    else:
        x = x * scale
    flat = x.reshape(-1)
    special = torch.tensor([-1e-3, -0.0, 1e30, -1e30, 3e-4])[: max(0, min(5, numel // 4))]
    flat[: len(special)] = special
    return flat.reshape(shape).to(case["dtype"]), scale, bits


# --------------------------------------------------------------------------------------------
# Triton == reference
# --------------------------------------------------------------------------------------------


@needs_interpreter
@settings(max_examples=80, deadline=None)
@given(case=fq_cases())
def test_triton_forward_is_bitwise_equal_to_reference(case):
    x, scale, bits = make_inputs(case)
    kw = {"axis": case["axis"], "signed": case["signed"]}
    with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
        y = fake_quant(x, scale, bits, backend="triton", **kw)
    assert_bitwise_equal(y, fake_quant_reference(x, scale, bits, **kw))


def _lsq_abs_sum(x, scale, bits, axis, signed, gy):
    """Sum of |per-element LSQ term * grad| per scale entry: the scale of fp32 sum error."""
    xf = x.double()
    n = x.shape[axis] if axis is not None and (scale.numel() > 1 or torch.is_tensor(bits)) else 1
    view = [1] * x.dim()
    if n > 1:
        view[axis] = -1
    s = scale.double().reshape(-1).expand(n).reshape(view) if n > 1 else scale.double().reshape(())
    qmin, qmax = quant_range(bits, signed)
    lo = qmin.double().reshape(-1).expand(n).reshape(view) if n > 1 else qmin.double().reshape(())
    hi = qmax.double().reshape(-1).expand(n).reshape(view) if n > 1 else qmax.double().reshape(())
    v = xf / s
    inside = (v >= lo) & (v <= hi)
    t = torch.where(inside, (torch.round(v) - v).abs(), torch.maximum(lo.abs(), hi.abs()).expand_as(v))
    mag = t * gy.double().abs()
    if scale.numel() > 1:
        dims = [d for d in range(x.dim()) if d != axis]
        return mag.sum(dims) if dims else mag
    return mag.sum()


@needs_interpreter
@settings(max_examples=50, deadline=None)
@given(case=fq_cases(dtypes=(torch.float32,)), raw=st.booleans())
def test_triton_gradients_match_reference(case, raw):
    x, scale, bits = make_inputs(case)
    x = x.clamp(-1e4, 1e4)  # keep the scale gradient finite-sized so the tolerance means something
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(case["seed"] + 1))
    kw = {"axis": case["axis"], "signed": case["signed"], "grad_scale": 1.0 if raw else None}
    grads = []
    for fn in (lambda *a, **k: fake_quant(*a, backend="triton", **k), fake_quant_reference):
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        with mock.patch.object(_launch, "INTERPRETER_MAX_BLOCK", case["max_block"]):
            fn(xs, ss, bits, **kw).backward(gy)
        grads.append((xs.grad, ss.grad))
    (gx_t, gs_t), (gx_r, gs_r) = grads
    assert_bitwise_equal(gx_t, gx_r)
    assert gs_t.shape == scale.shape and gs_t.dtype == scale.dtype
    # 1e-6 relative, plus 1e-6 of the summed magnitudes (fp32 partial sums vs fp64: the
    # result can cancel to ~0 while the terms do not).
    g_max = 1.0 if raw else 1.0 / math.sqrt(x.numel() / scale.numel())
    tol = 1e-6 * gs_r.abs().double() + 1e-6 * g_max * _lsq_abs_sum(x, scale, bits, case["axis"], case["signed"], gy)
    assert ((gs_t.double() - gs_r.double()).abs() <= tol.reshape(gs_r.shape) + 1e-12).all(), (gs_t, gs_r)


@needs_interpreter
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_half_precision_gradient_of_x_is_bitwise_equal(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 7, 3, generator=gen) * 3).to(dtype)
    scale = torch.rand(7, generator=gen) + 0.1
    bits = torch.tensor([2, 3, 4, 5, 6, 7, 8])
    gy = torch.randn(5, 7, 3, generator=gen).to(dtype)
    out = []
    for backend in ("triton", "torch"):
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        fake_quant(xs, ss, bits, axis=1, backend=backend).backward(gy)
        out.append((xs.grad, ss.grad))
    assert_bitwise_equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_triton_handles_large_values_and_exact_ties_for_every_bit_width():
    # every tie k + 0.5 of every bit-width, both signs: half-to-even, never half-up
    for bits in range(2, 9):
        ks = torch.arange(-(2**bits) - 2, 2**bits + 2, dtype=torch.float32)
        x = torch.cat([ks + 0.5, ks - 0.5, ks, torch.tensor([0.49999997, -0.49999997, 2.0**23 + 1])])
        for signed in (True, False):
            y = fake_quant(x, torch.tensor(1.0), bits, signed=signed, backend="triton")
            assert_bitwise_equal(y, fake_quant_reference(x, torch.tensor(1.0), bits, signed=signed))


def test_empty_tensor_round_trips():
    x = torch.empty(0, 3)
    assert fake_quant(x, torch.tensor(0.5), 4, backend="torch").shape == (0, 3)


# --------------------------------------------------------------------------------------------
# The reference pinned against independent implementations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed,qrange", [(True, (-128, 127)), (False, (0, 255))])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reference_matches_torch_fake_quantize_per_channel_affine_8bit(signed, qrange, axis):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 9, generator=gen) * 4
    x.view(-1)[:40] = torch.arange(-20, 20) * 0.125 + 0.0625  # exact ties for scale 0.125
    n = x.shape[axis]
    scale = torch.rand(n, generator=gen) * 0.1 + 0.01
    scale[0] = 0.125
    expected = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(n, dtype=torch.int32), axis % 3, *qrange)
    assert torch.equal(fake_quant_reference(x, scale, 8, axis=axis, signed=signed), expected)


@pytest.mark.parametrize("signed,qrange", [(True, (-128, 127)), (False, (0, 255))])
def test_reference_matches_torch_fake_quantize_per_tensor_affine_8bit(signed, qrange):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    expected = torch.fake_quantize_per_tensor_affine(x, 0.037, 0, *qrange)
    assert torch.equal(fake_quant_reference(x, torch.tensor(0.037), 8, signed=signed), expected)


def test_reference_lsq_gradient_matches_torch_learnable_fake_quantize():
    # torch's learnable fake-quant decides "inside" on the rounded value, we on x/s (the STE
    # clipping of LSQ), so keep x/s out of the half-step bands just beyond qmin/qmax.
    gen = torch.Generator().manual_seed(2)
    scale = torch.rand(16, generator=gen) * 0.1 + 0.01
    v = torch.randn(8, 16, 9, generator=gen) * 100
    v = torch.where((v.abs() > 126.5) & (v.abs() < 129.5), v * 1.05, v)
    x = v * scale.view(1, -1, 1)
    gy = torch.randn(x.shape, generator=gen)
    xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
    zp = torch.zeros(16, requires_grad=True)
    torch._fake_quantize_learnable_per_channel_affine(xs, ss, zp, 1, -128, 127, 1.0).backward(gy)
    xr, sr = x.clone().requires_grad_(), scale.clone().requires_grad_()
    fake_quant_reference(xr, sr, 8, axis=1, grad_scale=1.0).backward(gy)
    assert torch.equal(xr.grad, xs.grad)
    torch.testing.assert_close(sr.grad, ss.grad, rtol=1e-5, atol=1e-3)


def test_reference_lsq_hand_example():
    # s = 0.5, 3-bit signed: levels [-4, 3]. x/s = [0.6, -3.4, 5.2, 20, -9]:
    # inside terms round(v) - v = 0.4, 0.4; outside qmax, qmax, qmin = 3, 3, -4.
    x = torch.tensor([0.3, -1.7, 2.6, 10.0, -4.5], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    gy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = fake_quant_reference(x, s, 3, grad_scale=1.0)
    torch.testing.assert_close(y, torch.tensor([0.5, -1.5, 1.5, 1.5, -2.0]))
    y.backward(gy)
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0]))
    raw = 1 * 0.4 + 2 * 0.4 + 3 * 3 + 4 * 3 + 5 * -4
    torch.testing.assert_close(s.grad, torch.tensor(raw), rtol=1e-6, atol=1e-6)
    # default gradient scale: g = 1 / sqrt(Qp * N) = 1 / sqrt(3 * 5)
    s2 = torch.tensor(0.5, requires_grad=True)
    fake_quant_reference(x.detach(), s2, 3).backward(gy)
    torch.testing.assert_close(s2.grad, torch.tensor(raw / math.sqrt(15)), rtol=1e-6, atol=1e-6)


def test_per_channel_bits_use_each_channels_qp_in_the_gradient_scale():
    x = torch.tensor([[0.3, 0.3], [0.3, 0.3]])  # v = 0.6 everywhere: term -0.4... round(0.6)=1 -> 0.4
    s = torch.tensor([0.5, 0.5], requires_grad=True)
    bits = torch.tensor([2, 8])  # Qp = 1 and 127
    fake_quant_reference(x, s, bits, axis=0).backward(torch.ones(2, 2))
    expected = torch.tensor([0.8 / math.sqrt(1 * 2), 0.8 / math.sqrt(127 * 2)])
    torch.testing.assert_close(s.grad, expected)


def test_learn_scale_false_gives_no_scale_gradient():
    s = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(10, requires_grad=True)
    fake_quant_reference(x, s, 4, learn_scale=False).sum().backward()
    assert s.grad is None and x.grad is not None


def test_unsigned_range_and_quant_range():
    qmin, qmax = quant_range(torch.tensor([1, 4, 8]), signed=False)
    assert qmin.tolist() == [0, 0, 0] and qmax.tolist() == [1, 15, 255]
    qmin, qmax = quant_range(4, signed=True)
    assert (qmin.item(), qmax.item()) == (-8, 7)
    y = fake_quant_reference(torch.tensor([-1.0, 0.2, 100.0]), torch.tensor(0.1), 4, signed=False)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.2, 1.5]))


@pytest.mark.parametrize("signed", [True, False])
def test_an_int_bit_width_quantizes_like_the_same_width_as_a_tensor(signed):
    """Python-int bits get their range filled on the input's device, tensor bits through quant_range: one grid."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 50, generator=g) * 40
    for b in range(2 if signed else 1, 17):
        s = torch.rand(3, generator=g) * 0.2 + 0.01
        ys = [fake_quant(x, s, bits, axis=1, signed=signed) for bits in (b, torch.full((3,), b))]
        assert torch.equal(ys[0], ys[1]), b


@pytest.mark.parametrize("bits", [4, "tensor"])
def test_a_call_copies_nothing_from_the_host(bits):
    """On CUDA a host-to-device copy waits for the device; one per call made fine-tuning sync-bound."""
    from tests.host_copies import HostToDevice

    x = torch.randn(8, 6, 5, device="meta", requires_grad=True)
    s = torch.rand(6, device="meta", requires_grad=True)
    b = torch.full((6,), 3, dtype=torch.int32, device="meta") if bits == "tensor" else bits
    with HostToDevice() as h:
        y = fake_quant(x, s, b, axis=1)
        y.sum().backward()
        fake_quant(x, 0.5, 4)  # a python-float scale too
    assert y.device.type == "meta" and x.grad is not None and s.grad is not None
    assert not h.copies, h.copies


def test_auto_backend_on_cpu_is_the_reference():
    x = torch.randn(50)
    assert torch.equal(fake_quant(x, torch.tensor(0.1), 4), fake_quant_reference(x, torch.tensor(0.1), 4))


@pytest.mark.parametrize(
    "kwargs,err",
    [
        ({"scale": torch.ones(3), "bits": 4}, ValueError),  # per-channel scale without axis
        ({"scale": torch.ones(4), "bits": 4, "axis": 1}, ValueError),  # wrong length
        ({"scale": torch.tensor(1.0), "bits": 1}, ValueError),  # 1-bit signed
        ({"scale": torch.tensor(1.0), "bits": 17}, ValueError),
        ({"scale": torch.tensor(1.0), "bits": torch.tensor([4.0, 4.0, 4.0]), "axis": 1}, TypeError),
        ({"scale": torch.tensor(1.0), "bits": torch.tensor([4, 4, 4, 4]), "axis": 1}, ValueError),
        ({"scale": torch.tensor(1.0), "bits": 4, "axis": 2}, ValueError),
        ({"scale": torch.tensor(1.0), "bits": 4, "backend": "cuda"}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs, err):
    kwargs = dict(kwargs)
    scale, bits = kwargs.pop("scale"), kwargs.pop("bits")
    with pytest.raises(err):
        fake_quant(torch.randn(2, 3), scale, bits, **kwargs)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_cuda_triton_matches_reference(dtype, axis):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 33, 7, 5, generator=gen) * 3).to(dtype)
    n = x.shape[axis] if axis is not None else 1
    scale = (torch.rand(n, generator=gen) + 0.05) if axis is not None else torch.tensor(0.1)
    bits = torch.randint(2, 9, (n,), generator=gen) if axis is not None else 5
    gy = torch.randn(x.shape, generator=gen).to(dtype)
    out = []
    for backend, dev in (("triton", "cuda"), ("torch", "cpu")):
        xs = x.to(dev).requires_grad_()
        ss = scale.to(dev).requires_grad_()
        b = bits.to(dev) if torch.is_tensor(bits) else bits
        y = fake_quant(xs, ss, b, axis=axis, backend=backend)
        y.backward(gy.to(dev))
        out.append((y.cpu(), xs.grad.cpu(), ss.grad.cpu()))
    assert_bitwise_equal(out[0][0], out[1][0])
    assert_bitwise_equal(out[0][1], out[1][1])
    torch.testing.assert_close(out[0][2], out[1][2], rtol=1e-5, atol=1e-5)
