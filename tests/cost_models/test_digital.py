"""Digital cost models against values computed by hand from torchvision resnet18's module shapes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torchvision

from mpqc.compiler.capture import capture
from mpqc.cost_models import (
    BITS_PER_MIB,
    act_mem_bits,
    act_mem_summary,
    bitops,
    bitserial_cycles,
    digital_energy,
    layer_costs,
    weight_bits_total,
)
from mpqc.targets import load_target


@pytest.fixture(scope="module")
def resnet():
    """The IR of resnet18, and hand-computed (MACs, weight numel) per module from forward hooks."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    hand: dict[str, tuple[int, int]] = {}

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, torch.nn.Conv2d):
                per_out = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                per_out = mod.in_features
            hand[name] = (out.numel() * per_out, mod.weight.numel())
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in model.named_modules()
               if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    graph = capture(model, (x,)).graph
    return graph, hand


def _mixed(name: str) -> tuple[int, int]:
    if name in ("conv1", "fc"):
        return 8, 8
    if name.startswith("layer1."):
        return 2, 4
    return 4, 8


def test_resnet18_bitops_and_size_at_uniform_w4a8(resnet):
    graph, hand = resnet
    layers = graph.weighted_layers()
    assert {ly.name for ly in layers} == set(hand)
    assert sum(m for m, _ in hand.values()) == 1_814_073_344  # the well-known 1.81 GMACs of resnet18
    assert sum(bitops(ly, 4, 8) for ly in layers) == sum(m * 4 * 8 for m, _ in hand.values())
    size_bits = sum(weight_bits_total(ly, 4) for ly in layers)
    assert size_bits == sum(n * 4 for _, n in hand.values())
    assert size_bits / BITS_PER_MIB == pytest.approx(11_678_912 * 4 / 8 / 2**20)  # conv+fc weights, no bias/BN


def test_resnet18_bitops_and_size_of_a_mixed_plan(resnet):
    graph, hand = resnet
    layers = graph.weighted_layers()
    got = sum(bitops(ly, *_mixed(ly.name)) for ly in layers)
    want = sum(m * _mixed(n)[0] * _mixed(n)[1] for n, (m, _) in hand.items())
    assert got == want
    assert sum(weight_bits_total(ly, _mixed(ly.name)[0]) for ly in layers) == \
        sum(numel * _mixed(n)[0] for n, (_, numel) in hand.items())


def test_per_channel_costs_sum_to_the_layer_cost(resnet):
    graph, _ = resnet
    layer = graph.layer("layer2.0.conv1")
    c = layer.out_channels
    for fn in (lambda ch: bitops(layer, 4, 8, channel=ch), lambda ch: weight_bits_total(layer, 4, channel=ch),
               lambda ch: bitserial_cycles(layer, 4, 8, 2, channel=ch)):
        assert sum(fn(ch) for ch in range(c)) == pytest.approx(fn(None))
    # kernel-wise bits: half the channels at 2 bits, half at 8
    bits = [2] * (c // 2) + [8] * (c - c // 2)
    assert bitops(layer, bits, 8) == pytest.approx(layer.macs * 8 * (2 + 8) / 2)
    assert weight_bits_total(layer, bits) == pytest.approx(layer.weight_numel * (2 + 8) / 2)
    with pytest.raises(ValueError, match="per-channel bit-widths"):
        bitops(layer, [4, 8], 8)


def test_bitserial_cycles_round_up_slices():
    layer = SimpleNamespace(name="l", macs=1000, out_channels=10, weight_numel=100, weight_shape=[10, 10])
    assert bitserial_cycles(layer, 4, 8, 2) == 1000 * 2 * 4
    assert bitserial_cycles(layer, 2, 2, 2) == 1000
    assert bitserial_cycles(layer, 3, 5, 2) == 1000 * 2 * 3  # ceil(3/2) * ceil(5/2)
    assert bitserial_cycles(layer, 8, 8, 2, macs_per_cycle=4) == 1000 * 16 / 4


def test_energy_follows_the_target_coefficients(resnet):
    graph, hand = resnet
    t = load_target("bitserial")
    e = t.costs.energy
    total = sum(digital_energy(ly, 4, 8, e) for ly in graph.weighted_layers())
    assert total == pytest.approx(sum(m for m, _ in hand.values()) * (e.c0 + e.c_wa * 32))
    assert digital_energy(graph.layer("fc"), 8, 8, e) == pytest.approx(512_000 * 0.23)


def test_layer_costs_price_only_the_targets_models(resnet):
    graph, _ = resnet
    layer = graph.layer("layer1.0.conv1")
    b = layer_costs(layer, 4, 8, load_target("bitserial"))
    assert set(b) == {"bitops", "size", "cycles", "energy"}
    assert b["cycles"] == layer.macs * 2 * 4 and b["bitops"] == layer.macs * 32
    g = layer_costs(layer, 4, 8, load_target("generic"))
    assert set(g) == {"bitops", "size"}
    one = layer_costs(layer, 4, 8, load_target("generic"), channel=3)
    assert one["size"] == pytest.approx(g["size"] / layer.out_channels)


def test_float_operands_count_as_the_targets_float_bits(resnet):
    graph, _ = resnet
    fc = graph.layer("fc")
    assert bitops(fc, 4, None) == fc.macs * 4 * 32  # int4 weight-only, fp32 activations
    assert layer_costs(fc, 4, None, load_target("cuda"), lut=_FakeLut())["bitops"] == fc.macs * 4 * 16
    assert weight_bits_total(fc, None) == fc.weight_numel * 32


def test_matmul_without_weights_has_no_size():
    mm = SimpleNamespace(name="attn", kind="matmul", macs=4096, weight_shape=None, weight_numel=0, out_channels=0)
    assert bitops(mm, 8, 4) == 4096 * 32  # the w slot is the second operand's bits
    assert weight_bits_total(mm, 8) == 0.0


def test_activation_memory(resnet):
    graph, _ = resnet
    acts = graph.act_groups()
    bits = {a.name: 8 for a in acts}
    s = act_mem_summary(acts, bits)
    numels = [math.prod(a.shape[1:]) for a in acts]
    assert s["sum"] == 8 * sum(numels) and s["max"] == 8 * max(numels)
    assert act_mem_bits(acts[0], 4) == 4 * 3 * 224 * 224


class _FakeLut:
    def lookup(self, layer, w_bits, a_bits, **kw):
        return SimpleNamespace(ms=1.0)
