"""Bit-exact PyTorch twin of Triton's counter-based ``tl.randn`` (triton/language/random.py).

Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) keyed by
the seed, with the 64-bit element counter in the first two words, as ``tl.randint4x`` does;
then Triton's int -> uniform map and its Box-Muller transform. Same (seed, counter) gives the
same number anywhere, which is what makes analog-noise training reproducible and lets the
backward pass regenerate the noise instead of storing it.

Integer part: int64 tensors masked to 32 bits; 32x32-bit products are split into 16-bit
halves so nothing overflows int64. Float part: the Triton CPU interpreter evaluates
``tl.math.log/cos/sin/sqrt`` with numpy float32 ufuncs, and torch's float32 versions differ
from numpy's in the last bit for ~20% of inputs (measured here: log 419k, cos 377k, sqrt 342k
of 2M on AVX512, torch 2.14 / numpy 2.4), so those four functions are computed with numpy
too. On a GPU the compiled kernel uses CUDA's own log/sin/cos: the Philox integers and the
uniforms still match exactly, the normals to a few ulp.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["philox4x32", "randint4x", "randn", "uint_to_uniform_float"]

_M32 = 0xFFFFFFFF
# Philox 4x32 constants (Triton random.py; Salmon et al. 2011).
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
N_ROUNDS = 10


def _mulhilo(const: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``const * b`` for 32-bit unsigned values held in int64."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    t = c_lo * b  # < 2^48
    s = c_hi * b + (t >> 16)  # < 2^49
    hi = (s >> 16) & _M32
    lo = (((s & 0xFFFF) << 16) | (t & 0xFFFF)) & _M32
    return hi, lo


def philox4x32(seed: int, c0, c1, c2, c3, n_rounds: int = N_ROUNDS):
    """Philox 4x32 with Triton's round structure; counters are int64 tensors in [0, 2^32).

    Args:
        seed: 64-bit key; low word is k0, high word k1 (``triton.language.random.philox``).
        c0, c1, c2, c3: counter words.
        n_rounds: 10 for Philox 4x32-10.

    Returns:
        The four output words as int64 tensors in [0, 2^32).
    """
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def randint4x(seed: int, counter: torch.Tensor):
    """``tl.randint4x(seed, counter)`` for an int64 counter tensor (four uint32 as int64)."""
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    zero = torch.zeros_like(c0)
    return philox4x32(seed, c0, c1, zero, zero)


def uint_to_uniform_float(i: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) map: bitcast to int32, fold negatives with ~x, times 2^-31."""
    x = torch.where(i >= 2**31, i - 2**32, i)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def randn(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, counter)`` bit for bit (versus the Triton CPU interpreter).

    Args:
        seed: non-negative int below 2^63.
        counter: int64 tensor of non-negative counters (any shape, any device).

    Returns:
        float32 tensor of standard normals, same shape and device as ``counter``.
    """
    dev = counter.device
    i1, i2, _, _ = randint4x(seed, counter.detach().to("cpu", torch.int64))
    u1 = uint_to_uniform_float(i1).numpy()
    u2 = uint_to_uniform_float(i2).numpy()
    # Box-Muller exactly as triton.language.random.pair_uniform_to_normal, in numpy float32.
    u1 = np.maximum(np.float32(1.0e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return torch.from_numpy(r * np.cos(th)).to(dev)
