"""WeightQuantizer keeps its uniform bit-width on the host, and must notice every change of the bits buffer;
BiasQuantizer puts a conv bias on the integer accumulator grid."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.compiler.quantize import ActQuantizer, BiasQuantizer, WeightQuantizer


def test_uniform_bits_follows_set_bits_and_state_dict_loads():
    w = torch.randn(4, 3, 3, 3)
    q = WeightQuantizer(w, bits=4)
    assert q.uniform_bits == 4
    q.set_bits([2, 2, 3, 2], w)
    assert q.uniform_bits is None
    q.set_bits(3, w)
    assert q.uniform_bits == 3
    other = WeightQuantizer(w, bits=[5, 6, 5, 5])
    q.load_state_dict(other.state_dict())
    assert q.uniform_bits is None and q.bits.tolist() == [5, 6, 5, 5]
    q.load_state_dict(WeightQuantizer(w, bits=6).state_dict())
    assert q.uniform_bits == 6
    out = q(w)  # the cached width is the one the forward quantizes with: 6-bit codes at most 31 steps
    codes = torch.round(out / q.scale.abs().reshape(-1, 1, 1, 1))
    assert codes.abs().max() <= 32 and torch.equal(out, q(w))


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 16), w_bits=st.integers(2, 8), a_bits=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_bias_quantizer_rounds_onto_the_accumulator_grid_and_passes_gradients_straight(c, w_bits, a_bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 3, 3, 3, generator=g)
    act = ActQuantizer(signed=False)
    with torch.no_grad():
        act.scale.fill_(float(torch.rand((), generator=g)) + 0.05)
    act.bits = a_bits
    bq = BiasQuantizer(act, WeightQuantizer(w, bits=w_bits))
    b = (torch.randn(c, generator=g) * 3).requires_grad_(True)
    s = bq.scale()
    out = bq(b)
    assert torch.equal(out, bq.codes(b).float() * s)  # exactly what the exported DequantizeLinear computes
    assert (out - b).abs().max() <= 0.5 * s.max() * (1 + 1e-6)
    up = torch.randn(c, generator=g)
    (out * up).sum().backward()
    assert torch.equal(b.grad, up)  # straight through
    assert bq(out.detach()).equal(out.detach())  # idempotent on the grid
