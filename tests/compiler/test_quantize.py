"""WeightQuantizer keeps its uniform bit-width on the host, and must notice every change of the bits buffer."""

import torch

from mpqc.compiler.quantize import WeightQuantizer


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
