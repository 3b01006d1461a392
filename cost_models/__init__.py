"""Cost models: what a precision plan costs on a target (BitOPs, size, memory, cycles, energy, latency, noise).

Cost functions read duck-typed layers (``LayerLike``: the IR's ``Op`` fits) so this package never imports the
compiler. Units: MACs by exact geometry, BitOPs = Σ MACs·b_w·b_a, sizes in bits (reported in bytes, MiB = 2^20),
energy in the target's unit, latency in ms. The profilers (``profile_ort``, ``profile_cuda``, ``profile_trt``)
are imported on use: they pull in onnxruntime, CUDA or TensorRT.
"""

from __future__ import annotations

from .analog import (
    LayerStats,
    adc_variance,
    analog_energy,
    analog_layer_costs,
    e_grid,
    layer_noise_bits,
    noise_equivalent_bits,
    output_noise_variance,
    shot_sigma,
    snr_db,
    thermal_sigma,
    weight_sigma,
)
from .boundary import boundary_cost, boundary_matrix, fit_per_element, target_boundary
from .digital import (
    BITS_PER_MIB,
    act_mem_bits,
    act_mem_summary,
    bitops,
    bitserial_cycles,
    describe_units,
    digital_energy,
    layer_costs,
    weight_bits_total,
)
from .latency import LatencyEstimate, LatencyRow, LatencyTable, op_signature
from .protocols import OP_KINDS, QUANTIZABLE_KINDS, ActLike, LayerLike

__all__ = [
    "BITS_PER_MIB", "OP_KINDS", "QUANTIZABLE_KINDS", "ActLike", "LatencyEstimate", "LatencyRow", "LatencyTable",
    "LayerLike", "LayerStats", "act_mem_bits", "act_mem_summary", "adc_variance", "analog_energy",
    "analog_layer_costs", "bitops", "bitserial_cycles", "boundary_cost", "boundary_matrix", "describe_units",
    "digital_energy", "e_grid", "fit_per_element", "layer_costs", "layer_noise_bits", "noise_equivalent_bits",
    "op_signature", "output_noise_variance", "shot_sigma", "snr_db", "target_boundary", "thermal_sigma",
    "weight_bits_total", "weight_sigma",
]
