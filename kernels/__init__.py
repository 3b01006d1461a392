"""mpqc.kernels: fused fake-quantization and analog-noise kernels (Triton) with PyTorch twins.

The bottom layer of mpqc: imports nothing else from the package. Every op takes
``backend="auto" | "triton" | "torch"``; "auto" runs Triton on CUDA tensors and the
plain-PyTorch reference elsewhere. To run the Triton kernels on CPU, set TRITON_INTERPRET=1
before this package is first imported.
"""

from .analog_noise import (
    analog_noise,
    analog_noise_log_e,
    analog_noise_log_e_reference,
    analog_noise_reference,
    philox_randn,
    shot_sigma,
    thermal_sigma,
    weight_sigma,
)
from .fake_quant import fake_quant, fake_quant_reference, quant_range
from .fake_quant_dxmax import fake_quant_dxmax, fake_quant_dxmax_reference, inferred_bits, pow2_round

__all__ = [
    "analog_noise",
    "analog_noise_log_e",
    "analog_noise_log_e_reference",
    "analog_noise_reference",
    "fake_quant",
    "fake_quant_dxmax",
    "fake_quant_dxmax_reference",
    "fake_quant_reference",
    "inferred_bits",
    "philox_randn",
    "pow2_round",
    "quant_range",
    "shot_sigma",
    "thermal_sigma",
    "weight_sigma",
]
