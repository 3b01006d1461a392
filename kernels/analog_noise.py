"""Additive Gaussian analog-compute noise with a reproducible counter-based generator.

Garg, Lou, Jain, Nahmias, "Dynamic precision analog computing for neural networks"
(arXiv 2102.06365; seeds.md 2.2-2.3): every GEMM output (shot, thermal noise) or quantized
weight (weight noise) gets y + sigma * n, n ~ N(0, 1), with sigma falling as E^(-1/2) in the
energy per MAC E. The noise comes from Philox keyed by (seed, offset + flat element index),
so the same call reproduces the same noise on the CPU interpreter and the GPU, and the
backward pass regenerates it instead of storing a tensor the size of y.

Gradients: grad_y = grad_out; grad_sigma = sum(grad_out * n) reduced to sigma's shape; with
sigma = sigma_at_e1 * exp(-log_e / 2), d/dlog_e = sum(grad_out * n * (-sigma / 2)): what the
learned per-layer energy allocation of seeds.md 2.3 trains.
"""

from __future__ import annotations

import math

import torch

from . import _philox
from ._launch import (
    block_size,
    canonical_axis,
    cast_to_output,
    channel_chunk,
    check_launchable,
    needs_int64,
    num_warps,
    split_shape,
    tl,
    triton,
    use_triton,
)

__all__ = [
    "AnalogNoiseFunction",
    "analog_noise",
    "analog_noise_log_e",
    "analog_noise_log_e_reference",
    "analog_noise_reference",
    "philox_randn",
    "shot_sigma",
    "thermal_sigma",
    "weight_sigma",
]

_SCALAR, _PER_CHANNEL, _ELEMENTWISE = 0, 1, 2
_MAX_COUNTER = 2**63


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "offset"])
def _analog_noise_fwd_kernel(
    y_ptr,
    out_ptr,
    sigma_ptr,
    n_elements,
    C,
    inner,
    seed,
    offset,
    SIGMA_MODE: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    if SIGMA_MODE == 0:
        s = tl.load(sigma_ptr)
    elif SIGMA_MODE == 1:
        s = tl.load(sigma_ptr + (offs // inner) % C, mask=mask, other=0.0)
    else:
        s = tl.load(sigma_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.randn(seed, offs.to(tl.int64) + offset)
    tl.store(out_ptr + offs, cast_to_output(y + s * n, out_ptr), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _analog_noise_bwd_reduce_kernel(
    gy_ptr,
    partial_ptr,
    M,
    C,
    inner,
    seed,
    offset,
    PER_CHANNEL: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Same (channel, chunk) program layout as the fake-quant backward: one channel per
    # program, partials [chunks, C], deterministic final sum.
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    c, offs, mask = channel_chunk(pid, C, inner, M, PER_CHANNEL, BLOCK)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.randn(seed, offs.to(tl.int64) + offset)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, gy * n, 0.0), axis=0))


@triton.jit(do_not_specialize=["seed", "offset"])
def _analog_noise_bwd_elementwise_kernel(
    gy_ptr, gs_ptr, n_elements, seed, offset, INDEX_64: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    if INDEX_64:  # int32 index math is cheaper (division by inner/C) when it cannot overflow
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.randn(seed, offs.to(tl.int64) + offset)
    tl.store(gs_ptr + offs, gy * n, mask=mask)


# --------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------


def _check_counter(seed: int, offset: int, numel: int) -> None:
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a python int, got {type(v).__name__}")
    if not 0 <= seed < _MAX_COUNTER:
        raise ValueError(f"seed must lie in [0, 2^63), got {seed}")
    if offset < 0 or offset + numel > _MAX_COUNTER:
        raise ValueError(f"offset must be >= 0 with offset + numel <= 2^63, got {offset}")


def _sigma_mode(y: torch.Tensor, sigma: torch.Tensor, axis: int | None) -> tuple[int, int | None]:
    """Classify sigma: scalar, per-channel vector along axis, or broadcastable to y."""
    if not sigma.dtype.is_floating_point:
        raise TypeError(f"sigma must be floating point, got {sigma.dtype}")
    if axis is not None:
        axis = canonical_axis(axis, y.dim())
    if sigma.numel() == 1:
        return _SCALAR, axis
    if axis is not None and sigma.dim() == 1 and sigma.numel() == y.shape[axis]:
        return _PER_CHANNEL, axis
    try:
        ok = torch.broadcast_shapes(sigma.shape, y.shape) == y.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"sigma of shape {tuple(sigma.shape)} is neither a scalar, a [y.shape[axis]] vector "
            f"(axis={axis}) nor broadcastable to y's shape {tuple(y.shape)}"
        )
    return _ELEMENTWISE, axis


def _broadcast_view(t: torch.Tensor, y: torch.Tensor, mode: int, axis: int | None) -> torch.Tensor:
    """Reshape sigma so that plain broadcasting against y applies it as the mode says."""
    if mode == _SCALAR:
        return t.reshape(())
    if mode == _PER_CHANNEL:
        shape = [1] * y.dim()
        shape[axis] = -1
        return t.reshape(shape)
    return t


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# --------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------


def _fwd_triton(y, sigma, mode, axis, seed, offset):
    check_launchable(_analog_noise_fwd_kernel, y)
    out = torch.empty_like(y)
    n = y.numel()
    _, C, inner = split_shape(y.shape, axis if mode == _PER_CHANNEL else None)
    s = sigma.detach().to(device=y.device, dtype=torch.float32)
    s = s.expand(y.shape).contiguous() if mode == _ELEMENTWISE else s.reshape(-1).contiguous()
    block = block_size(n, y.device)
    _analog_noise_fwd_kernel[(triton.cdiv(n, block),)](
        y, out, s, n, C, inner, seed, offset,
        SIGMA_MODE=mode, INDEX_64=needs_int64(n, block), BLOCK=block, num_warps=num_warps(block),
    )  # fmt: skip
    return out


def _grad_sigma_triton(gy, sigma_shape, mode, axis, seed, offset):
    if mode == _ELEMENTWISE:
        check_launchable(_analog_noise_bwd_elementwise_kernel, gy)
        n = gy.numel()
        gs = torch.empty(gy.shape, device=gy.device, dtype=torch.float32)
        block = block_size(n, gy.device)
        _analog_noise_bwd_elementwise_kernel[(triton.cdiv(n, block),)](
            gy, gs, n, seed, offset, INDEX_64=needs_int64(n, block), BLOCK=block, num_warps=num_warps(block)
        )
        return gs.sum_to_size(sigma_shape)
    check_launchable(_analog_noise_bwd_reduce_kernel, gy)
    per_channel = mode == _PER_CHANNEL
    outer, C, inner = split_shape(gy.shape, axis if per_channel else None)
    m = outer * inner
    block = block_size(m, gy.device)
    chunks = triton.cdiv(m, block)
    partial = torch.empty((chunks, C), device=gy.device, dtype=torch.float32)
    _analog_noise_bwd_reduce_kernel[(chunks * C,)](
        gy, partial, m, C, inner, seed, offset,
        PER_CHANNEL=per_channel, INDEX_64=needs_int64(gy.numel(), block), BLOCK=block, num_warps=num_warps(block),
    )  # fmt: skip
    return partial.to(torch.float64).sum(0).reshape(sigma_shape)


class AnalogNoiseFunction(torch.autograd.Function):
    """y + sigma * n with n regenerated from (seed, offset) in the backward (Triton path)."""

    @staticmethod
    def forward(ctx, y, sigma, mode: int, axis: int | None, seed: int, offset: int):
        yc = y.contiguous()
        out = _fwd_triton(yc, sigma, mode, axis, seed, offset)
        ctx.meta = (mode, axis, seed, offset, sigma.shape, sigma.dtype, sigma.device)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, gout):
        mode, axis, seed, offset, s_shape, s_dtype, s_device = ctx.meta
        gs = None
        if ctx.needs_input_grad[1]:
            gs = _grad_sigma_triton(gout.contiguous(), s_shape, mode, axis, seed, offset)
            gs = gs.to(s_device, s_dtype)
        gy = gout if ctx.needs_input_grad[0] else None
        return gy, gs, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def philox_randn(
    shape: torch.Size | tuple[int, ...], *, seed: int, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The standard-normal tensor :func:`analog_noise` adds, as float32 on ``device``.

    Element i (row-major) is ``tl.randn(seed, offset + i)``; computed on the CPU by the
    bit-exact torch twin in ``_philox``.
    """
    numel = math.prod(shape)
    counter = offset + torch.arange(numel, dtype=torch.int64)
    return _philox.randn(seed, counter).reshape(shape).to(device)


def _reference(y, sigma, *, seed, offset, axis):
    mode, axis = _sigma_mode(y, sigma, axis)
    cdt = _compute_dtype(y, sigma)
    n = philox_randn(y.shape, seed=seed, offset=offset, device=y.device).to(cdt)
    s = _broadcast_view(sigma, y, mode, axis).to(cdt)
    return (y.to(cdt) + s * n).to(y.dtype)


def analog_noise(
    y: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    seed: int,
    offset: int = 0,
    axis: int | None = None,
    log_e: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Add reproducible Gaussian noise: ``y + sigma * n``, n = Philox-randn(seed, offset + i).

    Args:
        y: fp32 / fp16 / bf16 tensor (fp64 on the torch backend only); the result is computed
            in fp32 and cast back.
        sigma: noise std: a scalar, a [y.shape[axis]] vector (per channel along ``axis``), or
            any tensor broadcastable to y (shot noise: per sample and position). With
            ``log_e`` given, ``sigma`` is the std at E = 1 (see :func:`analog_noise_log_e`).
        seed: Philox key in [0, 2^63).
        offset: first counter; element i uses counter offset + i (flat, row-major). Give
            different calls disjoint [offset, offset + numel) ranges or different seeds.
        axis: channel axis for a per-channel sigma (negative allowed).
        log_e: optional log energy per MAC; then std = sigma * exp(-log_e / 2).
        backend: "auto" (Triton for CUDA tensors), "triton", "torch" (the bit-exact Philox twin), or "fast"
            (Triton on CUDA; on the CPU torch's generator seeded by (seed, offset), not the Philox stream).

    Returns:
        Tensor like y. Differentiable in y (identity) and sigma (sum of grad * n).
    """
    if log_e is not None:
        return analog_noise_log_e(y, sigma, log_e, seed=seed, offset=offset, axis=axis, backend=backend)
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.full((), float(sigma), dtype=torch.float32, device=y.device)  # no host-to-device copy
    if backend == "fast":
        if not y.is_cuda:
            return _fast(y, sigma, seed=seed, offset=offset, axis=axis)
        backend = "auto"
    _check_counter(seed, offset, y.numel())
    triton_impl = use_triton(y, backend)
    if triton_impl and sigma.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("the Triton analog-noise kernels take a float32/16 sigma, got float64")
        triton_impl = False
    if not triton_impl:
        return _reference(y, sigma, seed=seed, offset=offset, axis=axis)
    mode, axis = _sigma_mode(y, sigma, axis)
    if y.numel() == 0:
        return y.clone()
    return AnalogNoiseFunction.apply(y, sigma, mode, axis, seed, offset)


def analog_noise_reference(
    y: torch.Tensor,
    sigma: torch.Tensor | float,
    *,
    seed: int,
    offset: int = 0,
    axis: int | None = None,
    log_e: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`analog_noise`: same noise bit for bit, autograd gradients."""
    return analog_noise(y, sigma, seed=seed, offset=offset, axis=axis, log_e=log_e, backend="torch")


def _fast(y, sigma, *, seed, offset, axis):
    """CPU training/evaluation noise from torch's own generator, seeded by (seed, offset).

    The same seed gives the same noise on the CPU, but not the Philox stream of the Triton kernel: the
    bit-exact Philox twin costs about 2 µs per element on a CPU, which makes noise-aware training there
    slower than the forward pass itself (measured on the digits CNN: 211 s vs 16 s for an evaluation sweep).
    """
    g = torch.Generator(device=y.device).manual_seed((int(seed) * 1_000_003 + int(offset)) % (2**63 - 1))
    n = torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float32)
    return y + (_align(sigma, y, axis) * n).to(y.dtype)


def _align(t: torch.Tensor, y: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Give a [C] channel vector the shape [1, .., C, .., 1] so it broadcasts along axis."""
    if axis is not None and t.dim() == 1 and t.numel() == y.shape[axis] and t.numel() != 1:
        shape = [1] * y.dim()
        shape[canonical_axis(axis, y.dim())] = -1
        return t.reshape(shape)
    return t


def analog_noise_log_e(
    y: torch.Tensor,
    sigma_at_e1: torch.Tensor | float,
    log_e: torch.Tensor,
    *,
    seed: int,
    offset: int = 0,
    axis: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Noise whose std is parametrized by the log energy per MAC: sigma = sigma_at_e1 * E^-1/2.

    Garg et al. train theta = log E per layer (or per output channel) with the network frozen
    (seeds.md 2.3); the gradient reaching ``log_e`` is sum(grad_out * n * (-sigma / 2)).

    Args:
        y: tensor to perturb.
        sigma_at_e1: std at E = 1 (scalar, [C] along axis, or broadcastable to y), e.g.
            :func:`thermal_sigma` or :func:`shot_sigma` evaluated with e=1.
        log_e: log E, scalar or [C] along axis (or broadcastable to y).
        seed: Philox key, as in :func:`analog_noise`.
        offset: first counter, as in :func:`analog_noise`.
        axis: channel axis for per-channel sigma_at_e1 / log_e.
        backend: as in :func:`analog_noise`.

    Returns:
        Tensor like y, differentiable in y, sigma_at_e1 and log_e.
    """
    if not isinstance(sigma_at_e1, torch.Tensor):
        sigma_at_e1 = torch.full((), float(sigma_at_e1), dtype=torch.float32, device=y.device)
    channel_like = all(t.dim() <= 1 and t.numel() in (1, y.shape[axis] if axis is not None else 1)
                       for t in (sigma_at_e1, log_e))  # fmt: skip
    if channel_like:
        # Both scalars or [C] vectors: keep sigma a vector so the kernel's per-channel path
        # and in-kernel reduction apply.
        sigma = sigma_at_e1.reshape(-1) * torch.exp(-0.5 * log_e.reshape(-1))
        if sigma.numel() == 1:
            sigma = sigma.reshape(())
    else:
        sigma = _align(sigma_at_e1, y, axis) * torch.exp(-0.5 * _align(log_e, y, axis))
    return analog_noise(y, sigma, seed=seed, offset=offset, axis=axis, backend=backend)


def analog_noise_log_e_reference(
    y: torch.Tensor,
    sigma_at_e1: torch.Tensor | float,
    log_e: torch.Tensor,
    *,
    seed: int,
    offset: int = 0,
    axis: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`analog_noise_log_e`."""
    return analog_noise_log_e(y, sigma_at_e1, log_e, seed=seed, offset=offset, axis=axis, backend="torch")


# --------------------------------------------------------------------------------------------
# Noise models (seeds.md 2.2, Garg et al. code noise_models/gaussian.py), plain torch
# --------------------------------------------------------------------------------------------

THERMAL_SIGMA_T = 0.01  # sigma_t of the thermal model
WEIGHT_NOISE_SCALE = 0.1  # 1 / sqrt(100): sigma_w = R_w / sqrt(100 E)


def _sqrt_e(e: torch.Tensor | float) -> torch.Tensor:
    return torch.sqrt(e if isinstance(e, torch.Tensor) else torch.tensor(float(e)))


def thermal_sigma(
    n_fan_in: int,
    r_w: torch.Tensor | float,
    r_x: torch.Tensor | float,
    e: torch.Tensor | float,
    sigma_t: float = THERMAL_SIGMA_T,
) -> torch.Tensor:
    """Thermal-noise std on a GEMM output: sigma = sigma_t * sqrt(N) * R_w * R_x / sqrt(E).

    Args:
        n_fan_in: N, the fan-in k_h * k_w * C_in (the seed code does not divide by groups
            for depthwise convs; pass what the caller's convention is).
        r_w: R_w = Delta_w * (2^b_w - 1), the full range of the quantized weights, per output
            channel (shape [C_out], arrange it to broadcast against y) or scalar.
        r_x: R_x = Delta_in * (2^b_a - 1), the full range of the quantized input; the seed code
            infers Delta_in as the smallest non-zero |input| seen during calibration.
        e: energy per MAC E (> 0), float or tensor.
        sigma_t: the thermal noise constant (a target's ``[analog] sigma_t``; the seed code's 0.01).

    Returns:
        The std of the noise added to the layer output (fixed scale relative to full scale).
    """
    return sigma_t * math.sqrt(n_fan_in) * r_w * r_x / _sqrt_e(e)


def shot_sigma(
    w_norm_per_channel: torch.Tensor, x_norm: torch.Tensor, n_fan_in: int, e: torch.Tensor | float
) -> torch.Tensor:
    """Shot-noise std on a GEMM output: sigma = ||w_j|| * ||x|| / (sqrt(N) * sqrt(E)).

    Args:
        w_norm_per_channel: ||w_j||, L2 norm of output channel j's (quantized) weight
            row / kernel; shape it to broadcast along y's channel axis, e.g. [1, C, 1, 1].
        x_norm: ||x||, L2 norm of the input patch feeding each output position, per sample
            (for a conv: sqrt of x^2 convolved with a ones kernel), e.g. [B, 1, H, W].
        n_fan_in: N, the layer's fan-in k_h * k_w * C_in / groups (what one output reduces over).
        e: energy per MAC E (> 0).

    Returns:
        sigma broadcast to the per-sample, per-channel, per-position shape; per-output SNR
        grows as E * N * cos^2(w, x).
    """
    return w_norm_per_channel * x_norm / (math.sqrt(n_fan_in) * _sqrt_e(e))


def weight_sigma(
    r_w: torch.Tensor | float, e: torch.Tensor | float, scale: float = WEIGHT_NOISE_SCALE
) -> torch.Tensor:
    """Weight-noise std, added to each quantized weight before the GEMM: scale * R_w / sqrt(E).

    Args:
        r_w: R_w = Delta_w * (2^b_w - 1), the weight range (per output channel or scalar).
        e: energy per MAC E (> 0).
        scale: the weight-noise constant (a target's ``[analog] weight_noise``; the seed code's 0.1).
    """
    return scale * r_w / _sqrt_e(e)
