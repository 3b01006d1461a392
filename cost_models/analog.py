"""Analog in-memory compute: energy Σ MACs·E and the output noise of Garg et al. as a function of E.

"Dynamic precision" repeats an analog MAC E times and averages, so energy is linear in E and the noise
variance falls as 1/E (research/seeds.md §2.2). The three noise models, as standard deviations:

- thermal: σ = (σ_t/√E)·√N·R_w·R_x, added to each output (σ_t = 0.01; R_w, R_x the full ranges of the
  quantized weights (per output channel) and inputs, R = Δ·(2^b − 1)).
- shot:    σ = ‖w_j‖·‖x_patch‖/(√N·√E), added to each output (‖w_j‖ the L2 norm of output channel j's weights,
  ‖x_patch‖ the L2 norm of the receptive field of that output).
- weight:  σ_w = 0.1·R_w/√E = R_w/√(100·E), added to every weight; on an output this is σ_w²·‖x_patch‖².

N is the fan-in of the dot product one output actually computes: (C_in/groups)·k_h·k_w. For a depthwise
conv that is k_h·k_w, not the k_h·k_w·C_in of the original code (a quirk that overstates thermal noise by √C_in
and understates shot noise by the same factor); the physical array sums N products, so we use N = fan-in.

Energy is in the unit of E (the target's ``[analog] unit``). The σ functions use only arithmetic, so they
accept floats, numpy arrays or torch tensors (gradients flow to a learnable E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .protocols import LayerLike

SQRT12 = math.sqrt(12.0)
SIGMA_T = 0.01  # thermal noise constant of the original code
WEIGHT_NOISE = 0.1  # σ_w = WEIGHT_NOISE·R_w/√E, i.e. 1/√(100·E)


def e_grid(e_min: float, e_max: float, points: int) -> np.ndarray:
    """``points`` energies per MAC geometrically spaced from ``e_min`` to ``e_max``."""
    return np.geomspace(e_min, e_max, points)


def analog_energy(layer: LayerLike, e, *, channel: int | None = None) -> float:
    """Σ MACs·E: one E for the layer, or one per output channel (a sequence); ``channel`` prices one channel."""
    per_channel = isinstance(e, (Sequence, np.ndarray)) and np.ndim(e) == 1
    c_out = layer.out_channels or 1
    if channel is not None:
        return float(layer.macs / c_out * (e[channel] if per_channel else e))
    if per_channel:
        if len(e) != c_out:
            raise ValueError(f"{layer.name}: {len(e)} energies for {c_out} output channels")
        return float(layer.macs / c_out * np.sum(e))
    return float(layer.macs * e)


def analog_layer_costs(layer: LayerLike, e, target: Any = None, *, channel: int | None = None) -> dict[str, float]:
    """``{"energy": MACs·E, "emac_weight": MACs}`` (of one channel with ``channel``).

    The ``--emac`` budget is the MAC-weighted mean E, Σ MACs·E ≤ emac·Σ MACs: ``energy`` is its left side and
    ``emac_weight`` the layer's share of the right side.
    """
    macs = layer.macs / (layer.out_channels or 1) if channel is not None else layer.macs
    return {"energy": analog_energy(layer, e, channel=channel), "emac_weight": float(macs)}


def thermal_sigma(n_fan_in, r_w, r_x, e, sigma_t: float = SIGMA_T):
    """Thermal noise std on each output: (σ_t/√E)·√N·R_w·R_x."""
    return sigma_t / e**0.5 * n_fan_in**0.5 * r_w * r_x


def shot_sigma(w_row_norm, x_norm, n_fan_in, e):
    """Shot noise std on one output: ‖w_j‖·‖x_patch‖/(√N·√E)."""
    return w_row_norm * x_norm / (n_fan_in * e) ** 0.5


def weight_sigma(r_w, e, scale: float = WEIGHT_NOISE):
    """Weight noise std on each weight element: 0.1·R_w/√E."""
    return scale * r_w / e**0.5


def noise_equivalent_bits(r_out, sigma):
    """Bits of the uniform quantizer over range R_out whose error std Δ/√12 equals σ: log2⌈R_out/(√12·σ) + 1⌉."""
    return np.log2(np.ceil(np.asarray(r_out, dtype=float) / (SQRT12 * np.asarray(sigma, dtype=float)) + 1.0))


def adc_variance(r_out, adc_bits: int):
    """Quantization noise variance of an ADC with ``adc_bits`` over range R_out: (R_out/(2^b − 1))²/12."""
    return (r_out / (2**adc_bits - 1)) ** 2 / 12.0


@dataclass(frozen=True)
class LayerStats:
    """Per-layer statistics the noise models need (arrays are per output channel).

    ``r_w``: full weight range R_w; ``r_x``: full input range R_x; ``w_row_norms``: ‖w_j‖; ``x_patch_sq``:
    the mean over samples and output positions of ‖x_patch‖² (a scalar, or per output channel for grouped
    convs, whose channels see different inputs); ``r_out``: the output quantizer's range (for the ADC term and
    noise-equivalent bits), optional.
    """

    r_w: np.ndarray
    r_x: float
    w_row_norms: np.ndarray
    x_patch_sq: Any
    r_out: float | None = None

    def __post_init__(self):
        for k in ("r_w", "w_row_norms", "x_patch_sq"):
            v = np.asarray(getattr(self, k), dtype=float)
            if np.any(~np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"LayerStats.{k} must be finite and >= 0")
            object.__setattr__(self, k, v)
        if np.shape(self.r_w) != np.shape(self.w_row_norms):
            raise ValueError(f"LayerStats: r_w {np.shape(self.r_w)} and w_row_norms {np.shape(self.w_row_norms)} "
                             "must both have one entry per output channel")
        if not (math.isfinite(self.r_x) and self.r_x >= 0):
            raise ValueError("LayerStats.r_x must be finite and >= 0")

    @classmethod
    def from_tensors(cls, weight, x, *, groups: int = 1, stride=1, padding=0, dilation=1, r_out: float | None = None,
                     w_symmetric: bool = True, x_symmetric: bool = False) -> LayerStats:
        """Statistics from a (quantized) weight and a batch of inputs; conv2d (4-D weight) or linear (2-D).

        Symmetric ranges are 2·max|v| (the symmetric quantizer's Δ·(2^b − 1)); asymmetric ones max − min.
        """
        import torch
        import torch.nn.functional as F

        w = torch.as_tensor(weight).detach().double()
        x = torch.as_tensor(x).detach().double()
        rows = w.reshape(w.shape[0], -1)
        r_w = 2 * rows.abs().amax(1) if w_symmetric else rows.amax(1) - rows.amin(1)
        r_x = float(2 * x.abs().max() if x_symmetric else x.max() - x.min())
        if w.dim() == 4:
            cols = F.unfold(x, w.shape[2:], dilation=dilation, padding=padding, stride=stride)  # (B, C·kh·kw, L)
            per_group = cols.reshape(cols.shape[0], groups, -1, cols.shape[-1]).pow(2).sum(2).mean((0, 2))
            x_sq = per_group.repeat_interleave(w.shape[0] // groups).cpu().numpy()
        elif w.dim() == 2:
            x_sq = float(x.reshape(-1, x.shape[-1]).pow(2).sum(-1).mean())
        else:
            raise ValueError(f"LayerStats.from_tensors handles conv2d and linear weights, not {w.dim()}-D ones")
        return cls(r_w.cpu().numpy(), r_x, rows.norm(dim=1).cpu().numpy(), x_sq, r_out)


def output_noise_variance(layer: LayerLike, e, target: Any, stats: LayerStats) -> np.ndarray:
    """Noise variance of each output element of ``layer`` at energy per MAC ``e``, per output channel.

    ``e`` is a scalar or one value per output channel; the model is ``target.analog.noise``. With
    ``stats.r_out`` the ADC quantization variance of ``target.analog.adc_bits`` is added.
    """
    a = target.analog
    n = layer.fan_in  # the dot-product length, also for depthwise convs (see the module docstring)
    if n <= 0:
        raise ValueError(f"{layer.name}: fan-in {n} is not positive")
    e = np.asarray(e, dtype=float)
    if np.any(e <= 0):
        raise ValueError(f"{layer.name}: energy per MAC must be > 0")
    if a.noise == "thermal":
        var = thermal_sigma(n, stats.r_w, stats.r_x, e, a.sigma_t) ** 2
    elif a.noise == "shot":
        var = stats.w_row_norms**2 * stats.x_patch_sq / (n * e)
    elif a.noise == "weight":
        var = weight_sigma(stats.r_w, e, a.weight_noise) ** 2 * stats.x_patch_sq
    else:
        raise ValueError(f"unknown noise model {a.noise!r}")
    if stats.r_out is not None:
        var = var + adc_variance(stats.r_out, a.adc_bits)
    return np.broadcast_to(np.asarray(var, dtype=float), np.shape(stats.r_w)).copy()


def layer_noise_bits(layer: LayerLike, e, target: Any, stats: LayerStats) -> np.ndarray:
    """Noise-equivalent bits of each output channel at ``e`` (needs ``stats.r_out``)."""
    if stats.r_out is None:
        raise ValueError(f"{layer.name}: noise-equivalent bits need the output range (LayerStats.r_out)")
    return noise_equivalent_bits(stats.r_out, np.sqrt(output_noise_variance(layer, e, target, stats)))


def snr_db(signal_var, noise_var):
    """Signal-to-noise ratio in dB: 10·log10(var_signal/var_noise)."""
    return 10.0 * np.log10(np.asarray(signal_var, dtype=float) / np.asarray(noise_var, dtype=float))
