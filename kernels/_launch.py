"""Shared launch helpers for the mpqc Triton kernels: backend choice, tensor layout, block sizes.

Also holds the two ``@triton.jit`` helpers every kernel needs (round half to even, and the
fp32 -> output-dtype cast), because the Triton CPU interpreter lacks libdevice and rounds
fp32 -> bf16 incorrectly (research/formats.md section 4.2).

Triton is optional: without it, ``triton``/``tl`` below are stubs that let the kernel modules
be imported (decorators and ``tl.constexpr`` annotations evaluate) and ``backend="auto"`` falls
back to the plain-PyTorch references.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:  # pragma: no branch - the branch taken depends on the install, not the test
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only wheels of torch ship without triton
    HAS_TRITON = False

    class _Stub:
        """Attribute sink standing in for ``triton`` / ``triton.language`` when absent."""

        def __getattr__(self, name: str) -> Any:
            return _Stub()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            # ``@triton.jit`` returns the function unchanged; anything else is a stub again.
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return _Stub()

    triton = _Stub()  # type: ignore[assignment]
    tl = _Stub()  # type: ignore[assignment]

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "INTERPRETER_MAX_BLOCK",
    "GPU_BLOCK",
    "block_size",
    "canonical_axis",
    "cast_to_output",
    "check_launchable",
    "needs_int64",
    "num_warps",
    "round_half_even",
    "split_shape",
    "tl",
    "triton",
    "use_triton",
]

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter costs 2-4 ms per program instance whatever its size (formats.md 4.2), so it
# gets big blocks. Tests lower this (unittest.mock.patch) to exercise multi-program masking.
INTERPRETER_MAX_BLOCK = 8192
# Memory-bound elementwise kernels: 4096 elements and 8 warps = 16 fp32 per thread, four
# 128-bit accesses. Not tuned on hardware yet (no GPU in the session that wrote this).
GPU_BLOCK = 4096


def use_triton(x: torch.Tensor, backend: str) -> bool:
    """Decide whether a call runs the Triton kernels or the PyTorch reference.

    Args:
        x: the main input; its device and dtype decide ``"auto"``.
        backend: ``"auto"`` (Triton for CUDA tensors when triton imports), ``"triton"`` or
            ``"torch"``.

    Returns:
        True for the Triton path.

    Raises:
        ValueError: unknown backend.
        RuntimeError: ``"triton"`` asked for but triton is not installed.
        TypeError: ``"triton"`` asked for with a dtype the kernels do not load.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch' or 'auto'")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton kernels take float32/float16/bfloat16 inputs, got {x.dtype}")
    return True


def check_launchable(kernel: Any, x: torch.Tensor) -> None:
    """Fail with an actionable message when a compiled kernel is about to get CPU tensors.

    ``@triton.jit`` picks interpreter or compiler when the decorator runs (module import), so
    setting TRITON_INTERPRET=1 later has no effect (formats.md 4.2).
    """
    if x.is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 in the "
            "environment before mpqc.kernels is first imported, or use backend='torch'"
        )


def canonical_axis(axis: int, ndim: int) -> int:
    """Map a possibly negative axis into ``[0, ndim)``.

    Raises:
        ValueError: axis out of range (or a rank-0 tensor).
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a tensor of rank {ndim}")
    return axis % ndim


def split_shape(shape: torch.Size, axis: int | None) -> tuple[int, int, int]:
    """View ``shape`` as ``[outer, C, inner]`` around ``axis`` (``C = 1`` when axis is None).

    Every kernel indexes the channel of a flat offset as ``(offset // inner) % C``, which
    handles any axis of a contiguous tensor without permuting it.
    """
    numel = math.prod(shape)
    if axis is None:
        return 1, 1, numel
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def block_size(n: int, device: torch.device) -> int:
    """Pick a power-of-two block for ``n`` elements (at least 16)."""
    cap = GPU_BLOCK if device.type == "cuda" else INTERPRETER_MAX_BLOCK
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def needs_int64(numel: int, block: int) -> bool:
    """Whether flat offsets (plus one block of overhang) can pass 2^31 and need int64 math."""
    return numel + block >= 2**31


def num_warps(block: int) -> int:
    """Warps for an elementwise block: 8 for >= 2048 elements, else 4."""
    return 8 if block >= 2048 else 4


@triton.jit
def round_half_even(v):
    """Round fp32 to the nearest integer, ties to even, exactly as ``torch.round``.

    libdevice ``rint`` is missing in the interpreter (triton issue #8825), so: take the floor,
    look at the exact fractional part, and step up when it exceeds 1/2 or equals 1/2 with an
    odd floor. ``v - floor(v)`` is exact in fp32, and |v| >= 2^23 is already integral
    (fraction 0), so no ``v + 0.5`` rounding trap (0.49999997 + 0.5 rounds to 1.0). The sign
    of ``v`` is copied onto the result so -0.3 -> -0.0 as ``rint`` does; NaN and inf pass
    through.
    """
    r = tl.floor(v)
    frac = v - r
    half = r * 0.5
    odd = (half - tl.floor(half)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    res = tl.where(up, r + 1.0, r)
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    mag = res.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return (mag | sign).to(tl.float32, bitcast=True)


@triton.jit
def channel_chunk(pid, C, inner, M, PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """The (channel, chunk) program layout of the backward kernels: program ``pid`` covers one chunk of
    channel ``c``'s M = outer * inner elements of an [outer, C, inner] view; returns (c, offsets, mask).

    Channel is the fastest-varying program index, so neighbouring programs read neighbouring memory and
    each program's partial sum belongs to a single channel (a deterministic reduction, no atomics).
    """
    c = pid % C
    chunk = pid // C
    j = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = j < M
    if PER_CHANNEL:
        o = j // inner
        offs = o * (C * inner) + c * inner + (j - o * inner)
    else:
        offs = j
    return c, offs, mask


@triton.jit
def cast_to_output(v, ptr):
    """Cast fp32 ``v`` to ``ptr``'s element type with round-to-nearest-even, as torch does.

    The interpreter's fp32 -> bf16 cast truncates (and its "rtne" mode rounds half up without
    carry: measured 49,677 mismatches in 100,000 against ``Tensor.to(torch.bfloat16)``), so
    bf16 is rounded by hand on the bit pattern, the same recipe as c10::BFloat16
    (bias 0x7FFF plus the lowest kept bit; NaN -> 0x7FC0). The result is identical on GPU.
    """
    if ptr.dtype.element_ty == tl.float32:
        return v
    elif ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)
