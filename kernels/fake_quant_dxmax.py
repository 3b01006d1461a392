"""Uniform fake quantization parametrized by step size d and range x_max (Uhlich et al., U3).

"Mixed Precision DNNs: All you need is a good parametrization" (Uhlich et al., ICLR'20;
seeds.md 4.1). Learning (d, x_max) instead of (b, d) or (b, x_max) gives gradients that are
bounded and independent of the bit-width, and the bit-width is inferred from the two:

    d_q = 2^round(log2 d)                          (step snapped to a power of two)
    Q(x) = d_q * round(clip(x, x_min, x_max) / d_q),  x_min = -x_max (signed) or 0
    b    = ceil(log2(x_max/d_q + 1) + 1) signed,  ceil(log2(x_max/d_q + 1)) unsigned,
           with x_max first snapped to round(x_max/d_q) * d_q, and at least b_min.

Gradients (seeds.md 4.1, the paper's figure; r = Q(x) - x):
    dQ/dx = 1 inside (x_min <= x <= x_max), 0 outside;
    dQ/dd_q = r / d_q inside, 0 outside;
    dQ/dx_max = 0 inside, sign(x) outside (0 below the range when unsigned: x_min = 0 there);
    d d_q / d d = d_q / d: the straight-through estimator on the inner round, as autograd
    through the seed code's 2 ** round(log2 d) gives.
Parameters are per tensor (scalars), as in the seed code.
"""

from __future__ import annotations

import torch

from ._launch import (
    block_size,
    cast_to_output,
    check_launchable,
    needs_int64,
    num_warps,
    round_half_even,
    tl,
    triton,
    use_triton,
)

__all__ = [
    "FakeQuantDxmaxFunction",
    "fake_quant_dxmax",
    "fake_quant_dxmax_reference",
    "inferred_bits",
    "pow2_round",
]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_dxmax_fwd_kernel(
    x_ptr, y_ptr, d_ptr, lo_ptr, hi_ptr, n_elements, INDEX_64: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    d = tl.load(d_ptr)
    lo = tl.load(lo_ptr)
    hi = tl.load(hi_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Clip first, then divide (seed order); d is a power of two so the division is exact.
    xc = tl.where(x < lo, lo, x)
    xc = tl.where(xc > hi, hi, xc)
    q = round_half_even(tl.math.div_rn(xc, d))
    tl.store(y_ptr + offs, cast_to_output(q * d, y_ptr), mask=mask)


@triton.jit
def _fake_quant_dxmax_bwd_kernel(
    x_ptr,
    gy_ptr,
    gx_ptr,
    partial_ptr,
    d_ptr,
    lo_ptr,
    hi_ptr,
    n_elements,
    SIGNED: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GP: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    d = tl.load(d_ptr)
    lo = tl.load(lo_ptr)
    hi = tl.load(hi_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inside = (x >= lo) & (x <= hi)
    if NEED_GX:
        tl.store(gx_ptr + offs, cast_to_output(tl.where(inside, gy, 0.0), gx_ptr), mask=mask)
    if NEED_GP:
        u = tl.math.div_rn(x, d)
        t_d = tl.where(inside, round_half_even(u) - u, 0.0)
        if SIGNED:
            t_x = tl.where(x > hi, 1.0, tl.where(x < lo, -1.0, 0.0))
        else:
            t_x = tl.where(x > hi, 1.0, 0.0)
        # partials laid out [programs, 2]: (d_q, x_max)
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.where(mask, t_d * gy, 0.0), axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.where(mask, t_x * gy, 0.0), axis=0))


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _fwd_triton(x, d, lo, hi):
    check_launchable(_fake_quant_dxmax_fwd_kernel, x)
    y = torch.empty_like(x)
    n = x.numel()
    block = block_size(n, x.device)
    _fake_quant_dxmax_fwd_kernel[(triton.cdiv(n, block),)](
        x, y, d, lo, hi, n, INDEX_64=needs_int64(n, block), BLOCK=block, num_warps=num_warps(block)
    )
    return y


def _bwd_triton(x, gy, d, lo, hi, signed, need_gx, need_gp):
    check_launchable(_fake_quant_dxmax_bwd_kernel, x)
    n = x.numel()
    block = block_size(n, x.device)
    programs = triton.cdiv(n, block)
    gx = torch.empty_like(x) if need_gx else x
    partial = torch.empty((programs, 2), device=x.device, dtype=torch.float32)
    _fake_quant_dxmax_bwd_kernel[(programs,)](
        x, gy, gx, partial, d, lo, hi, n,
        SIGNED=signed, NEED_GX=need_gx, NEED_GP=need_gp, INDEX_64=needs_int64(n, block), BLOCK=block,
        num_warps=num_warps(block),
    )  # fmt: skip
    sums = partial.to(torch.float64).sum(0) if need_gp else None
    return (gx if need_gx else None), sums


def _clamp(v, lo, hi):
    v = torch.where(v < lo, lo, v)
    return torch.where(v > hi, hi, v)


def _fwd_torch(x, d, lo, hi):
    xf = x.to(d.dtype)
    return (torch.round(_clamp(xf, lo, hi) / d) * d).to(x.dtype)


def _bwd_torch(x, gy, d, lo, hi, signed, need_gx, need_gp):
    xf = x.to(d.dtype)
    g = gy.to(d.dtype)
    inside = (xf >= lo) & (xf <= hi)
    gx = torch.where(inside, g, 0.0).to(x.dtype) if need_gx else None
    sums = None
    if need_gp:
        u = xf / d
        t_d = torch.where(inside, torch.round(u) - u, 0.0)
        below = -1.0 if signed else 0.0
        t_x = torch.where(xf > hi, 1.0, torch.where(xf < lo, below, 0.0))
        sums = torch.stack([(t_d * g).to(torch.float64).sum(), (t_x * g).to(torch.float64).sum()])
    return gx, sums


class FakeQuantDxmaxFunction(torch.autograd.Function):
    """Autograd for Q(x; d_q, x_max) with the U3 gradients of seeds.md 4.1 (d_q already pow2)."""

    @staticmethod
    def forward(ctx, x, d_q, xmax, signed: bool, triton_impl: bool):
        xc = x.contiguous()
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        d = d_q.detach().to(device=x.device, dtype=cdt).reshape(1)
        hi = xmax.detach().to(device=x.device, dtype=cdt).reshape(1)
        lo = -hi if signed else torch.zeros_like(hi)
        y = (_fwd_triton if triton_impl else _fwd_torch)(xc, d, lo, hi)
        ctx.save_for_backward(xc, d, lo, hi)
        ctx.signed = signed
        ctx.triton_impl = triton_impl
        ctx.meta = ((d_q.shape, d_q.dtype, d_q.device), (xmax.shape, xmax.dtype, xmax.device))
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, gy):
        xc, d, lo, hi = ctx.saved_tensors
        need_gx = ctx.needs_input_grad[0]
        need_gp = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        impl = _bwd_triton if ctx.triton_impl else _bwd_torch
        gx, sums = impl(xc, gy.contiguous(), d, lo, hi, ctx.signed, need_gx, need_gp)
        gd = gxm = None
        if need_gp:
            (d_shape, d_dtype, d_dev), (m_shape, m_dtype, m_dev) = ctx.meta
            gd = sums[0].reshape(d_shape).to(d_dev, d_dtype)
            gxm = sums[1].reshape(m_shape).to(m_dev, m_dtype)
        return gx, gd, gxm, None, None


class _Pow2Round(torch.autograd.Function):
    """d -> 2^round(log2 d) with the STE on the round: gradient d_q / d."""

    @staticmethod
    def forward(ctx, d):
        d_q = torch.exp2(torch.round(torch.log2(d.to(torch.float64)))).to(d.dtype)
        ctx.save_for_backward(d, d_q)
        return d_q

    @staticmethod
    def backward(ctx, g):
        d, d_q = ctx.saved_tensors
        return g * (d_q / d)


def pow2_round(d: torch.Tensor) -> torch.Tensor:
    """Snap a positive step size to the nearest power of two in the log domain (differentiable).

    Autograd through the seed code's ``2 ** round(log2 d)`` with an identity-gradient round
    gives d(d_q)/dd = d_q / d, which this reproduces.
    """
    return _Pow2Round.apply(d)


def _as_tensor(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"d and xmax are per-tensor scalars (seeds.md 4.1), got shape {tuple(v.shape)}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"d and xmax must be floating point, got {v.dtype}")
        return v
    return torch.full((), float(v), dtype=torch.float32, device=like.device)  # no host-to-device copy


def _project(
    d: torch.Tensor,
    xmax: torch.Tensor,
    d_range: tuple[float, float] | None,
    xmax_range: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """U3's clip(d, d_min, d_max) and clip(x_max, x_max_min, x_max_max); None skips a clip."""
    if d_range is not None:
        d = torch.clamp(d, d_range[0], d_range[1])
    if xmax_range is not None:
        xmax = torch.clamp(xmax, xmax_range[0], xmax_range[1])
    return d, xmax


def _apply(x, d, xmax, signed, d_range, xmax_range, triton_impl):
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    d, xmax = _project(_as_tensor(d, x), _as_tensor(xmax, x), d_range, xmax_range)
    if x.numel() == 0:
        return x.clone()
    return FakeQuantDxmaxFunction.apply(x, pow2_round(d), xmax, bool(signed), triton_impl)


def fake_quant_dxmax(
    x: torch.Tensor,
    d: torch.Tensor | float,
    xmax: torch.Tensor | float,
    *,
    signed: bool = True,
    d_range: tuple[float, float] | None = None,
    xmax_range: tuple[float, float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Uhlich U3 fake quantization, learnable step ``d`` and range ``xmax`` (per tensor).

    Args:
        x: fp32 / fp16 / bf16 tensor (fp64 on the torch backend only).
        d: positive step size; snapped to 2^round(log2 d) in the forward pass.
        xmax: clipping range; x is clipped to [-xmax, xmax] (signed) or [0, xmax].
        signed: weights (True) or post-ReLU activations (False).
        d_range: optional (d_min, d_max) clip applied before the power-of-two snap, e.g.
            (2**-8, 1) as the seed code does for weights and activations (seeds.md 4.2).
        xmax_range: optional (x_max_min, x_max_max) clip, e.g. (2**-8, 127) for weights.
        backend: "auto", "triton" or "torch", as in :func:`mpqc.kernels.fake_quant`.

    Returns:
        Tensor like x. Gradients flow to x, d and xmax as in the module docstring.
    """
    return _apply(x, d, xmax, signed, d_range, xmax_range, use_triton(x, backend))


def fake_quant_dxmax_reference(
    x: torch.Tensor,
    d: torch.Tensor | float,
    xmax: torch.Tensor | float,
    *,
    signed: bool = True,
    d_range: tuple[float, float] | None = None,
    xmax_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`fake_quant_dxmax` (same numerics, bit for bit)."""
    return _apply(x, d, xmax, signed, d_range, xmax_range, False)


def inferred_bits(
    d: torch.Tensor | float,
    xmax: torch.Tensor | float,
    signed: bool = True,
    *,
    b_min: int | None = None,
    d_range: tuple[float, float] | None = None,
    xmax_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Bit-width implied by (d, xmax), as the seed code computes it for the size constraint.

    d is snapped to a power of two, xmax to round(xmax/d)*d, then
    b = ceil(log2(xmax/d + 1) + 1) (signed) or ceil(log2(xmax/d + 1)) (unsigned), and
    b = max(b, b_min) with b_min 2 (signed) / 1 (unsigned) by default. Not clipped above:
    the paper's learned first layers reach 9-10 bits (seeds.md 4.4).

    Returns:
        int64 tensor with d's / xmax's broadcast shape (no gradient: bit-widths are discrete).
    """
    d_t = torch.as_tensor(d, dtype=torch.float64).detach()
    m_t = torch.as_tensor(xmax, dtype=torch.float64).detach()
    d_t, m_t = _project(d_t, m_t, d_range, xmax_range)
    d_q = torch.exp2(torch.round(torch.log2(d_t)))
    levels = torch.round(m_t / d_q)  # x_max / d after snapping x_max to the grid
    b = torch.ceil(torch.log2(levels + 1.0)) + (1.0 if signed else 0.0)
    if b_min is None:
        b_min = 2 if signed else 1
    return torch.clamp(b, min=b_min).to(torch.int64)
