"""Analog cost models: Garg et al.'s noise formulas on random tensors, noise-equivalent bits, energy totals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpqc.cost_models import (
    LayerStats,
    adc_variance,
    analog_energy,
    analog_layer_costs,
    layer_noise_bits,
    noise_equivalent_bits,
    output_noise_variance,
    shot_sigma,
    thermal_sigma,
    weight_sigma,
)
from mpqc.targets import load_target


def _target(noise: str, **kw):
    analog = SimpleNamespace(noise=noise, sigma_t=0.01, weight_noise=0.1, adc_bits=8, **kw)
    return SimpleNamespace(analog=analog)


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.rand(32, 64, generator=g)  # post-ReLU inputs
    layer = SimpleNamespace(name="fc", kind="linear", macs=16 * 64, fan_in=64, out_channels=16, groups=1)
    return layer, w.double(), x.double()


def test_thermal_noise_matches_the_closed_form(linear):
    layer, w, x = linear
    stats = LayerStats.from_tensors(w, x)
    r_w = (2 * w.abs().amax(1)).numpy()  # symmetric weights: R_w = Δ(2^b - 1) = 2 max|w|
    r_x = float(x.max() - x.min())
    e = 37.0
    want = (0.01 / math.sqrt(e) * math.sqrt(64) * r_w * r_x) ** 2
    assert np.allclose(output_noise_variance(layer, e, _target("thermal"), stats), want)
    assert np.allclose(thermal_sigma(64, r_w, r_x, e), np.sqrt(want))


def test_shot_noise_matches_the_closed_form_averaged_over_outputs(linear):
    layer, w, x = linear
    stats = LayerStats.from_tensors(w, x)
    e = 250.0
    # exact per-output sigma for every (sample, channel), then the mean variance per channel
    sig = shot_sigma(w.norm(dim=1)[None, :], x.norm(dim=1)[:, None], 64, e)
    want = (sig**2).mean(0).numpy()
    assert np.allclose(output_noise_variance(layer, e, _target("shot"), stats), want)


def test_weight_noise_matches_a_monte_carlo_simulation(linear):
    layer, w, x = linear
    stats = LayerStats.from_tensors(w, x)
    e = 10.0
    sw = torch.as_tensor(weight_sigma(stats.r_w, e))  # per channel, on every weight element
    g = torch.Generator().manual_seed(1)
    noisy = w + sw[:, None] * torch.randn((4000, *w.shape), generator=g, dtype=w.dtype)
    draws = torch.einsum("bk,dck->dbc", x, noisy)  # (draw, sample, channel)
    empirical = draws.var(0).mean(0).numpy()  # per channel, averaged over samples
    predicted = output_noise_variance(layer, e, _target("weight"), stats)
    assert np.allclose(empirical, predicted, rtol=0.08)


def test_noise_falls_as_one_over_e(linear):
    layer, w, x = linear
    stats = LayerStats.from_tensors(w, x)
    for noise in ("thermal", "shot", "weight"):
        v1 = output_noise_variance(layer, 1.0, _target(noise), stats)
        v100 = output_noise_variance(layer, 100.0, _target(noise), stats)
        assert np.allclose(v1 / v100, 100.0)


def test_depthwise_conv_uses_the_real_fan_in():
    g = torch.Generator().manual_seed(0)
    c = 8
    w = torch.randn(c, 1, 3, 3, generator=g).double()
    x = torch.randn(4, c, 10, 10, generator=g).double()
    stats = LayerStats.from_tensors(w, x, groups=c, padding=1)
    cols = F.unfold(x, 3, padding=1)  # (B, C*9, L): channel j's patch is rows 9j..9j+8
    want = cols.reshape(4, c, 9, -1).pow(2).sum(2).mean((0, 2)).numpy()
    assert np.allclose(stats.x_patch_sq, want)  # each channel sees only its own input
    layer = SimpleNamespace(name="dw", kind="conv", macs=c * 100 * 9, fan_in=9, out_channels=c, groups=c)
    v = output_noise_variance(layer, 1.0, _target("thermal"), stats)
    assert np.allclose(v, (0.01 * 3 * stats.r_w * stats.r_x) ** 2)  # sqrt(N) = 3, not sqrt(9*C_in)


def test_noise_equivalent_bits():
    assert noise_equivalent_bits(1.0, 1.0 / (math.sqrt(12) * 255)) == pytest.approx(8.0)
    assert noise_equivalent_bits(1.0, 1.0 / (math.sqrt(12) * 15)) == pytest.approx(4.0)
    bits = noise_equivalent_bits(2.0, np.array([1e-4, 1e-2, 1.0]))
    assert np.all(np.diff(bits) < 0)  # more noise, fewer bits
    assert bits[-1] == pytest.approx(1.0)  # log2(ceil(2/3.46 + 1)) = log2(2)


def test_adc_term_and_noise_bits_of_a_layer(linear):
    layer, w, x = linear
    stats = LayerStats.from_tensors(w, x, r_out=4.0)
    t = _target("thermal")
    with_adc = output_noise_variance(layer, 1e6, t, stats)
    assert np.allclose(with_adc - output_noise_variance(layer, 1e6, t, LayerStats.from_tensors(w, x)),
                       adc_variance(4.0, 8))
    assert np.all(layer_noise_bits(layer, 1e6, t, stats) <= 8.0)  # never better than the 8-bit ADC


def test_energy_totals():
    layer = SimpleNamespace(name="c", kind="conv", macs=1200, fan_in=12, out_channels=4, groups=1)
    assert analog_energy(layer, 5.0) == 6000.0
    assert analog_energy(layer, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(300 * 10)  # per channel E
    assert analog_energy(layer, [1.0, 2.0, 3.0, 4.0], channel=3) == pytest.approx(300 * 4)
    costs = analog_layer_costs(layer, 5.0, load_target("analog"))
    assert costs == {"energy": 6000.0, "emac_weight": 1200.0}
    grid = load_target("analog").analog.e_grid()
    assert sum(analog_energy(layer, e) for e in grid) == pytest.approx(1200 * grid.sum())


def test_sigma_functions_are_differentiable_in_e():
    log_e = torch.tensor(math.log(100.0), requires_grad=True)
    s = thermal_sigma(64, 1.0, 1.0, log_e.exp())
    s.backward()
    assert log_e.grad is not None and log_e.grad.item() == pytest.approx(-0.5 * s.item())  # σ ∝ E^-1/2
