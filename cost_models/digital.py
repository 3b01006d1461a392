"""Digital cost models: BitOPs, weight size, activation memory, energy per MAC and bit-serial cycles.

Units (DESIGN.md):
- MACs are the IR's exact geometry (conv: C_out·H_out·W_out·(C_in/groups)·k_h·k_w; batch included).
- BitOPs = MACs·b_w·b_a. Size = numel(W)·b_w **bits** (report bytes, MiB = 2^20 bytes). Activation memory =
  per-sample elements·b_a bits.
- A float operand (``None`` bits) counts as the target's ``float_bits``: 32 where floats run as fp32 (so an
  int4 weight-only linear on ORT CPU costs MACs·4·32 BitOPs), 16 where they run as bf16/fp16 (cuda,
  tensorrt). Without a target the default is 32.
- For an activation x activation matmul the ``w_bits`` slot carries the second operand's bits; it has no
  weights, so its size is 0.
- Energy is in the target's unit (``[costs.energy] unit``, pJ for the built-ins); cycles are MAC-slice
  cycles divided by ``macs_per_cycle``.

Weight bits may be one int for the layer, or a sequence with one entry per output channel (kernel-wise
precision). ``channel=c`` prices output channel ``c`` alone: it holds 1/C_out of the layer's weights and MACs,
so the per-channel costs of a layer sum to the layer's cost.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

from .protocols import ActLike, LayerLike

FLOAT_BITS = 32
BITS_PER_MIB = 8 * 2**20


def _b(bits: int | None, float_bits: int) -> int:
    return float_bits if bits is None else int(bits)


def _shares(layer: LayerLike, w_bits: Any, channel: int | None, float_bits: int) -> Iterator[tuple[float, int]]:
    """(fraction of the layer, weight bits) pieces: the whole layer, one channel, or one piece per channel."""
    per_channel = isinstance(w_bits, Sequence) and not isinstance(w_bits, str)
    if channel is None and not per_channel:
        yield 1.0, _b(w_bits, float_bits)
        return
    c_out = layer.out_channels
    if not c_out:
        raise ValueError(f"{layer.name}: per-channel costs need a weight with output channels")
    if per_channel and len(w_bits) != c_out:
        raise ValueError(f"{layer.name}: {len(w_bits)} per-channel bit-widths for {c_out} output channels")
    if channel is not None:
        if not 0 <= channel < c_out:
            raise ValueError(f"{layer.name}: channel {channel} out of range 0..{c_out - 1}")
        yield 1.0 / c_out, _b(w_bits[channel] if per_channel else w_bits, float_bits)
        return
    for b in w_bits:
        yield 1.0 / c_out, _b(b, float_bits)


def bitops(layer: LayerLike, w_bits, a_bits: int | None, *, float_bits: int = FLOAT_BITS,
           channel: int | None = None) -> float:
    """BitOPs = MACs·b_w·b_a of one forward pass (of one output channel with ``channel``)."""
    b_a = _b(a_bits, float_bits)
    return sum(frac * layer.macs * b_w * b_a for frac, b_w in _shares(layer, w_bits, channel, float_bits))


def weight_bits_total(layer: LayerLike, w_bits, *, float_bits: int = FLOAT_BITS, channel: int | None = None) -> float:
    """Weight storage in bits: numel(W)·b_w (biases and norms are not included; see DESIGN.md)."""
    numel = layer.weight_numel if layer.weight_shape else 0
    if not numel:
        return 0.0
    return sum(frac * numel * b_w for frac, b_w in _shares(layer, w_bits, channel, float_bits))


def act_mem_bits(act: ActLike, a_bits: int | None, *, float_bits: int = FLOAT_BITS) -> float:
    """Activation memory of one tensor in bits: per-sample elements·b_a."""
    return float(act.numel * _b(a_bits, float_bits))


def act_mem_summary(acts: Sequence[ActLike], a_bits: dict[str, int | None], *,
                    float_bits: int = FLOAT_BITS) -> dict[str, float]:
    """Activation memory as the sum over tensors and as the largest single tensor (bits), keyed sum/max."""
    sizes = [act_mem_bits(a, a_bits.get(a.name), float_bits=float_bits) for a in acts]
    return {"sum": float(sum(sizes)), "max": float(max(sizes, default=0.0))}


def digital_energy(layer: LayerLike, w_bits, a_bits: int | None, energy: Any, *, float_bits: int = FLOAT_BITS,
                   channel: int | None = None) -> float:
    """Σ MACs·e_mac(b_w, b_a), with ``energy.per_mac`` from the target (``[costs.energy]``), in its unit."""
    b_a = _b(a_bits, float_bits)
    return sum(frac * layer.macs * energy.per_mac(b_w, b_a)
               for frac, b_w in _shares(layer, w_bits, channel, float_bits))


def bitserial_cycles(layer: LayerLike, w_bits, a_bits: int | None, slice_bits: int, *,
                     macs_per_cycle: float = 1.0, float_bits: int = FLOAT_BITS, channel: int | None = None) -> float:
    """Bit-serial cycles: MACs·⌈b_w/s⌉·⌈b_a/s⌉/macs_per_cycle (s = slice width in bits)."""
    slices_a = math.ceil(_b(a_bits, float_bits) / slice_bits)
    return sum(frac * layer.macs * math.ceil(b_w / slice_bits) * slices_a / macs_per_cycle
               for frac, b_w in _shares(layer, w_bits, channel, float_bits))


def layer_costs(layer: LayerLike, w_bits, a_bits: int | None, target: Any, *, channel: int | None = None,
                lut: Any = None, strict: bool = False, fmt: str | None = None) -> dict[str, float]:
    """Every per-layer cost the target prices, for one precision of ``layer`` (or of one of its channels).

    Keys (only those in ``target.cost_models``): ``bitops``, ``size`` (bits), ``cycles``, ``energy`` (target
    unit) and ``latency`` (ms, from ``lut``: a ``LatencyTable``; a channel gets 1/C_out of the layer's time).
    ``act_mem`` and ``boundary`` are priced per tensor / per edge (``act_mem_bits``, ``cost_models.boundary``);
    analog energy per E is ``analog.analog_layer_costs``.
    """
    models = tuple(target.cost_models)
    fb = int(getattr(target, "float_bits", FLOAT_BITS))
    out: dict[str, float] = {}
    if "bitops" in models:
        out["bitops"] = bitops(layer, w_bits, a_bits, float_bits=fb, channel=channel)
    if "size" in models:
        out["size"] = weight_bits_total(layer, w_bits, float_bits=fb, channel=channel)
    if "cycles" in models:
        c = target.costs.cycles
        out["cycles"] = bitserial_cycles(layer, w_bits, a_bits, c.slice_bits, macs_per_cycle=c.macs_per_cycle,
                                         float_bits=fb, channel=channel)
    if "energy" in models and getattr(target, "kind", "digital") == "digital":
        out["energy"] = digital_energy(layer, w_bits, a_bits, target.costs.energy, float_bits=fb, channel=channel)
    if "latency" in models:
        if lut is None:
            raise ValueError(f"target {target.name} prices latency: pass lut= (a LatencyTable from `mpqc profile`)")
        if isinstance(w_bits, Sequence):
            raise ValueError(f"{layer.name}: latency is measured per layer; per-channel bit-widths have no row")
        est = lut.lookup(layer, w_bits, a_bits, fmt=fmt, strict=strict)
        out["latency"] = est.ms / (layer.out_channels or 1) if channel is not None else est.ms
    return out


def describe_units(target: Any) -> dict[str, str]:
    """The unit of each cost key for reports."""
    energy = getattr(getattr(target, "costs", None), "energy", None)
    analog = getattr(target, "analog", None)
    unit = analog.unit if analog is not None else (energy.unit if energy is not None else "")
    return {"bitops": "bit-ops", "size": "bits", "act_mem": "bits", "cycles": "cycles", "energy": unit,
            "latency": "ms", "emac": f"{unit}/MAC"}
