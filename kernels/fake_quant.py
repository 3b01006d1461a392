"""Fused fake quantization with per-channel mixed bit-widths and an LSQ-learned scale.

y = clamp(round_half_even(x / s), qmin, qmax) * s, in fp32, cast back to x's dtype. Scale and
bit-width may each be per tensor or per channel along any axis, so one layer can mix
precisions across output channels, as IMPQ does (Gonugondla & Shanbhag, ICASSP'22; seeds.md
1.1). The scale gradient is LSQ's (Esser et al., "Learned Step Size Quantization", ICLR'20;
seeds.md 3.1): d y / d s = round(x/s) - x/s inside the range, qmin or qmax outside, scaled by
g = 1 / sqrt(Qp * N).

Two implementations share one autograd Function: Triton kernels (one pass forward; one pass
backward that writes grad_x and per-program partial sums of the scale gradient) and a
plain-PyTorch twin that defines the numerics and runs wherever Triton does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._launch import (
    block_size,
    canonical_axis,
    cast_to_output,
    channel_chunk,
    check_launchable,
    needs_int64,
    num_warps,
    round_half_even,
    split_shape,
    tl,
    triton,
    use_triton,
)

__all__ = ["FakeQuantFunction", "fake_quant", "fake_quant_reference", "quant_range"]

MAX_BITS = 16  # keeps every integer level exact in fp32 (2^16 << 2^24)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_fwd_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    qmin_ptr,
    qmax_ptr,
    n_elements,
    C,
    inner,
    PER_CHANNEL: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Flat 1-D pass over the contiguous tensor viewed as [outer, C, inner]; the channel of an
    # element is (offset // inner) % C, so any quantization axis works without a permute.
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    if PER_CHANNEL:
        ch = (offs // inner) % C
        s = tl.load(scale_ptr + ch, mask=mask, other=1.0)
        lo = tl.load(qmin_ptr + ch, mask=mask, other=0.0)
        hi = tl.load(qmax_ptr + ch, mask=mask, other=0.0)
    else:
        s = tl.load(scale_ptr)
        lo = tl.load(qmin_ptr)
        hi = tl.load(qmax_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # div_rn: plain `/` lowers to the approximate div.full.f32 on NVIDIA; torch divides exactly.
    q = round_half_even(tl.math.div_rn(x, s))
    # where-based clamp keeps NaN and the sign of zero, like the reference (see _clamp).
    q = tl.where(q < lo, lo, q)
    q = tl.where(q > hi, hi, q)
    tl.store(y_ptr + offs, cast_to_output(q * s, y_ptr), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(
    x_ptr,
    gy_ptr,
    gx_ptr,
    partial_ptr,
    scale_ptr,
    qmin_ptr,
    qmax_ptr,
    M,
    C,
    inner,
    PER_CHANNEL: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GS: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program = one channel c and one chunk of that channel's M = outer * inner elements,
    # so each program's scale-gradient partial belongs to a single channel and the final
    # reduction is a deterministic sum over a [chunks, C] array (no atomics). Channel is the
    # fastest-varying program index: neighbouring programs read neighbouring memory.
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    c, offs, mask = channel_chunk(pid, C, inner, M, PER_CHANNEL, BLOCK)
    s = tl.load(scale_ptr + c)
    lo = tl.load(qmin_ptr + c)
    hi = tl.load(qmax_ptr + c)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.math.div_rn(x, s)
    inside = (v >= lo) & (v <= hi)
    if NEED_GX:
        # STE with clipping (LSQ, Esser et al.): pass grad_y where qmin <= x/s <= qmax.
        tl.store(gx_ptr + offs, cast_to_output(tl.where(inside, gy, 0.0), gx_ptr), mask=mask)
    if NEED_GS:
        # LSQ step-size gradient: round(v) - v inside, qmin below, qmax above.
        t = tl.where(inside, round_half_even(v) - v, tl.where(v < lo, lo, hi))
        part = tl.sum(tl.where(mask, t * gy, 0.0), axis=0)
        tl.store(partial_ptr + pid, part)


# --------------------------------------------------------------------------------------------
# Layout and parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything the two implementations need besides tensors: the [outer, C, inner] view."""

    outer: int
    channels: int  # C of the view; 1 when both scale and bits are per tensor
    inner: int
    per_channel: bool
    scale_shape: torch.Size
    scale_per_channel: bool
    learn_scale: bool
    grad_scale: float | None


def _int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a python-int width, as python ints."""
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return (-hi - 1 if signed else 0), hi


def quant_range(bits: int | torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer range of a ``bits``-bit code as fp32 tensors (exact integers).

    Signed: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1].

    Args:
        bits: python int or integer tensor (any shape).
        signed: symmetric signed grid or unsigned grid.

    Returns:
        ``(qmin, qmax)`` with the shape of ``bits`` (0-dim for an int).
    """
    if not isinstance(bits, torch.Tensor):
        lo, hi = _int_range(bits, signed)
        return torch.tensor(float(lo)), torch.tensor(float(hi))
    b = bits.to(torch.int64)
    if signed:
        qmax = torch.bitwise_left_shift(torch.ones_like(b), b - 1) - 1
        qmin = -qmax - 1
    else:
        qmax = torch.bitwise_left_shift(torch.ones_like(b), b) - 1
        qmin = torch.zeros_like(b)
    return qmin.to(torch.float32), qmax.to(torch.float32)


def _check_bits(bits: int | torch.Tensor, signed: bool) -> None:
    low = 2 if signed else 1
    if isinstance(bits, torch.Tensor):
        if bits.dtype.is_floating_point or bits.dtype == torch.bool or bits.is_complex():
            raise TypeError(f"bits must be an integer tensor, got {bits.dtype}")
        if bits.device.type != "cpu" or bits.numel() == 0:
            return  # a range check would force a device sync on every call
        bad = (bits < low) | (bits > MAX_BITS)
        if bool(bad.any()):
            raise ValueError(f"bits must lie in [{low}, {MAX_BITS}] (signed={signed}), got {bits.tolist()}")
    elif isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be a python int or an integer tensor, got {type(bits).__name__}")
    elif not low <= bits <= MAX_BITS:
        raise ValueError(f"bits must lie in [{low}, {MAX_BITS}] (signed={signed}), got {bits}")


def _prepare(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    bits: int | torch.Tensor,
    axis: int | None,
    signed: bool,
    grad_scale: float | None,
    learn_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Spec]:
    """Validate arguments; build the per-channel (qmin, qmax) vectors and the layout spec."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=x.device)  # no host-to-device copy
    if not scale.dtype.is_floating_point:
        raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
    _check_bits(bits, signed)
    if grad_scale is not None and not isinstance(grad_scale, (int, float)):
        raise TypeError("grad_scale must be a python float (e.g. 1.0 for the raw LSQ gradient)")
    if axis is not None:
        axis = canonical_axis(axis, x.dim())
    n_ch = x.shape[axis] if axis is not None else 1
    bits_per_channel = isinstance(bits, torch.Tensor) and bits.numel() != 1
    for name, t in (("scale", scale), ("bits", bits)):
        if not isinstance(t, torch.Tensor) or t.numel() == 1:
            continue
        if axis is None:
            raise ValueError(f"a per-channel {name} of shape {tuple(t.shape)} needs axis=")
        if t.dim() != 1 or t.numel() != n_ch:
            raise ValueError(
                f"{name} must have shape [] / [1] or [x.shape[axis]] = [{n_ch}], got {tuple(t.shape)}"
            )
    scale_per_channel = scale.numel() != 1
    per_channel = scale_per_channel or bits_per_channel
    outer, channels, inner = split_shape(x.shape, axis if per_channel else None)
    if isinstance(bits, torch.Tensor):  # per-channel bits live with the weight: the range is made there
        qmin, qmax = quant_range(bits, signed)
        qmin = qmin.reshape(-1).to(x.device).expand(channels).contiguous()
        qmax = qmax.reshape(-1).to(x.device).expand(channels).contiguous()
    else:  # filled on x's device: a CPU tensor moved there is a copy that waits for the device, on every call
        lo, hi = _int_range(bits, signed)
        qmin = torch.full((channels,), float(lo), dtype=torch.float32, device=x.device)
        qmax = torch.full((channels,), float(hi), dtype=torch.float32, device=x.device)
    spec = _Spec(
        outer=outer,
        channels=channels,
        inner=inner,
        per_channel=per_channel,
        scale_shape=scale.shape,
        scale_per_channel=scale_per_channel,
        learn_scale=learn_scale,
        grad_scale=None if grad_scale is None else float(grad_scale),
    )
    return scale, qmin, qmax, spec


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale_vector(scale: torch.Tensor, x: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Scale as a contiguous [C] vector in the compute dtype on x's device (no autograd)."""
    s = scale.detach().to(device=x.device, dtype=_compute_dtype(x)).reshape(-1)
    return s.expand(spec.channels).contiguous()


# --------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------


def _fwd_triton(x: torch.Tensor, s: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, spec: _Spec):
    check_launchable(_fake_quant_fwd_kernel, x)
    y = torch.empty_like(x)
    n = x.numel()
    block = block_size(n, x.device)
    grid = (triton.cdiv(n, block),)
    _fake_quant_fwd_kernel[grid](
        x, y, s, qmin, qmax, n, spec.channels, spec.inner,
        PER_CHANNEL=spec.per_channel, INDEX_64=needs_int64(n, block), BLOCK=block,
        num_warps=num_warps(block),
    )  # fmt: skip
    return y


def _bwd_triton(x, gy, s, qmin, qmax, spec: _Spec, need_gx: bool, need_gs: bool):
    check_launchable(_fake_quant_bwd_kernel, x)
    m = spec.outer * spec.inner
    block = block_size(m, x.device)
    chunks = triton.cdiv(m, block)
    gx = torch.empty_like(x) if need_gx else x  # dummy pointer when unused
    partial = torch.empty((chunks, spec.channels), device=x.device, dtype=torch.float32)
    _fake_quant_bwd_kernel[(chunks * spec.channels,)](
        x, gy, gx, partial, s, qmin, qmax, m, spec.channels, spec.inner,
        PER_CHANNEL=spec.per_channel, NEED_GX=need_gx, NEED_GS=need_gs,
        INDEX_64=needs_int64(x.numel(), block), BLOCK=block, num_warps=num_warps(block),
    )  # fmt: skip
    # The partials array holds numel / BLOCK floats: summing it in fp64 is negligible work.
    sums = partial.to(torch.float64).sum(0) if need_gs else None
    return (gx if need_gx else None), sums


# --------------------------------------------------------------------------------------------
# Plain-PyTorch reference numerics
# --------------------------------------------------------------------------------------------


def _clamp(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clamp that propagates NaN and keeps the sign of zero.

    torch.clamp with tensor bounds returns +0.0 or -0.0 for clamp(-0.0, min=0) depending on
    whether an element falls in a SIMD lane or the scalar tail (measured on AVX512, torch
    2.14), so the bit-exact contract uses this where-based form instead.
    """
    q = torch.where(q < lo, lo, q)
    return torch.where(q > hi, hi, q)


def _view3(t: torch.Tensor, spec: _Spec) -> torch.Tensor:
    return t.reshape(spec.outer, spec.channels, spec.inner)


def _fwd_torch(x, s, qmin, qmax, spec: _Spec):
    sb, lo, hi = (t.view(1, -1, 1) for t in (s, qmin.to(s.dtype), qmax.to(s.dtype)))
    q = _clamp(torch.round(_view3(x, spec).to(s.dtype) / sb), lo, hi)
    return (q * sb).to(x.dtype).reshape(x.shape)


def _bwd_torch(x, gy, s, qmin, qmax, spec: _Spec, need_gx: bool, need_gs: bool):
    sb, lo, hi = (t.view(1, -1, 1) for t in (s, qmin.to(s.dtype), qmax.to(s.dtype)))
    v = _view3(x, spec).to(s.dtype) / sb
    g = _view3(gy, spec).to(s.dtype)
    inside = (v >= lo) & (v <= hi)
    gx = torch.where(inside, g, 0.0).to(x.dtype).reshape(x.shape) if need_gx else None
    sums = None
    if need_gs:
        t = torch.where(inside, torch.round(v) - v, torch.where(v < lo, lo, hi))
        sums = (t * g).to(torch.float64).sum(dim=(0, 2))
    return gx, sums


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class FakeQuantFunction(torch.autograd.Function):
    """Autograd wrapper: STE-with-clipping for x, LSQ for the scale, Triton or torch inside."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, spec: _Spec, triton_impl: bool):
        xc = x.contiguous()
        s = _scale_vector(scale, xc, spec)
        y = (_fwd_triton if triton_impl else _fwd_torch)(xc, s, qmin, qmax, spec)
        ctx.save_for_backward(xc, s, qmin, qmax)
        ctx.spec = spec
        ctx.triton_impl = triton_impl
        ctx.scale_meta = (scale.dtype, scale.device)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, gy):
        xc, s, qmin, qmax = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need_gx = ctx.needs_input_grad[0]
        need_gs = ctx.needs_input_grad[1] and spec.learn_scale
        if not (need_gx or need_gs) or xc.numel() == 0:
            dtype, device = ctx.scale_meta
            gs = torch.zeros(spec.scale_shape, dtype=dtype, device=device) if need_gs else None
            return (torch.zeros_like(xc) if need_gx else None), gs, None, None, None, None
        impl = _bwd_triton if ctx.triton_impl else _bwd_torch
        gx, sums = impl(xc, gy.contiguous(), s, qmin, qmax, spec, need_gx, need_gs)
        gs = None
        if need_gs:
            gs = sums * _lsq_grad_scale(qmax, xc.numel(), spec)
            if not spec.scale_per_channel:
                gs = gs.sum()
            gs = gs.reshape(spec.scale_shape).to(*ctx.scale_meta[::-1])
        return gx, gs, None, None, None, None


def _lsq_grad_scale(qmax: torch.Tensor, numel: int, spec: _Spec) -> torch.Tensor | float:
    """g = 1 / sqrt(Qp * N) per channel (LSQ gradient scaling), N = elements per scale entry."""
    if spec.grad_scale is not None:
        return spec.grad_scale
    n_per_scale = numel // (spec.channels if spec.scale_per_channel else 1)
    return torch.rsqrt(qmax.to(torch.float64) * n_per_scale)


def _apply(x, scale, bits, axis, signed, grad_scale, learn_scale, triton_impl: bool) -> torch.Tensor:
    scale_t, qmin, qmax, spec = _prepare(x, scale, bits, axis, signed, grad_scale, learn_scale)
    scale_in = scale_t if learn_scale else scale_t.detach()
    if x.numel() == 0:
        return x.clone()
    return FakeQuantFunction.apply(x, scale_in, qmin, qmax, spec, triton_impl)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    bits: int | torch.Tensor,
    *,
    axis: int | None = None,
    signed: bool = True,
    grad_scale: float | None = None,
    learn_scale: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fake-quantize ``x`` with per-tensor or per-channel scale and bit-width (differentiable).

    Args:
        x: fp32 / fp16 / bf16 tensor of any rank (fp64 runs only on the torch backend).
        scale: positive step size, shape [] / [1] or [x.shape[axis]]. Positivity is not
            checked (that would force a device sync per call).
        bits: python int, or integer tensor [x.shape[axis]] for mixed precision inside one
            layer. Range [2, 16] signed, [1, 16] unsigned (checked for CPU tensors).
        axis: channel axis (negative allowed); required when scale or bits is per channel.
        signed: levels [-2^(b-1), 2^(b-1)-1] if True, else [0, 2^b-1].
        grad_scale: LSQ gradient scale; None means 1/sqrt(Qp*N) per channel (Qp = qmax of
            that channel, N = elements per scale entry); pass 1.0 for the raw gradient.
        learn_scale: False returns no gradient for scale.
        backend: "auto" (Triton for CUDA tensors), "triton" (also on CPU under
            TRITON_INTERPRET=1) or "torch".

    Returns:
        Tensor like x: clamp(round_half_even(x/scale), qmin, qmax) * scale computed in fp32,
        bit-identical between the two backends (NaN payloads aside).
    """
    triton_impl = use_triton(x, backend)
    return _apply(x, scale, bits, axis, signed, grad_scale, learn_scale, triton_impl)


def fake_quant_reference(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    bits: int | torch.Tensor,
    *,
    axis: int | None = None,
    signed: bool = True,
    grad_scale: float | None = None,
    learn_scale: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`fake_quant`; it defines the numerics the kernels match.

    Operation order: ``x.float() / scale``, ``torch.round`` (half to even), clamp (NaN- and
    zero-sign-preserving), ``* scale``, cast to ``x.dtype``. Gradients: grad_y where
    qmin <= x/s <= qmax else 0; the LSQ scale gradient summed in fp64 per channel.
    """
    return _apply(x, scale, bits, axis, signed, grad_scale, learn_scale, False)
