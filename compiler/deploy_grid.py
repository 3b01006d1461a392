"""Fit a QuantizedModel to the grid an export profile's runtime computes on, before fine-tuning.

Fine-tuning should train the network that is deployed, not a neighbour of it. Two things differ between the plan's
fake-quant model and what a runtime executes: the 8-bit quantizers a runtime needs on residual-add inputs
(compiler/residual.py), and TensorRT's lack of uint8, which carries an unsigned 8-bit activation as 7 bits over
the same range (codes 0..127 in int8; research/formats.md). :func:`fit_to_profile` applies both; the exporter
applies them again and finds them done. A checkpoint records the profile it was trained for
(:func:`trained_for`) so that ``mpqc export --checkpoint`` can rebuild the same quantizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .quantize import ActQuantizer, QuantizedModel
from .residual import ResidualQuantizer, quantize_residuals_for

PROFILES = ("ort", "trt", "qcdq")
INT8_UNSIGNED_BITS = 7  # TensorRT: int8 only, so unsigned values keep codes 0..127


@dataclass(frozen=True)
class DeployGrid:
    """What :func:`fit_to_profile` changed."""

    profile: str
    residual: tuple[ResidualQuantizer, ...]  # residual-add quantizers placed (uncalibrated)
    narrowed: tuple[str, ...]  # unsigned 8-bit activation quantizers now at 7 bits (TensorRT)


def narrow_unsigned_int8(quantizers: Iterable[tuple[str, ActQuantizer]]) -> list[str]:
    """Carry every active unsigned 8-bit activation quantizer as 7 bits over the same range (step x 255/127).

    TensorRT has no uint8. Before calibration the step is reset anyway; after it, the range is kept."""
    names = []
    for name, m in quantizers:
        if isinstance(m, ActQuantizer) and m.enabled and not m.signed and m.bits == 8:
            with torch.no_grad():
                m.scale.mul_(255.0 / 127.0)
            m.bits = INT8_UNSIGNED_BITS
            m.narrowed_from = 8  # the plan's width, so a report can say what was trained at 7 bits and why
            names.append(name)
    return names


def fit_to_profile(qm: QuantizedModel, profile: str, *, residual_quant: bool = True) -> DeployGrid:
    """Make ``qm`` compute what ``profile``'s runtime will: its residual-add quantizers (unless
    ``residual_quant`` is off) and, for ``trt``, 7-bit codes for unsigned 8-bit activations. Call it after the
    plan is applied and before ``qm.calibrate``."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: use {', '.join(PROFILES)}")
    residual = quantize_residuals_for(qm, profile) if residual_quant else []
    narrowed: list[str] = []
    if profile == "trt":
        named = [(f"aq.{k}", m) for k, m in qm.aq.items()] + [(f"rq.{k}", m) for k, m in qm.rq.items()]
        narrowed = narrow_unsigned_int8(named)
    return DeployGrid(profile, tuple(residual), tuple(narrowed))


def trained_for(profile: str, residual_quant: bool) -> dict:
    """The record a checkpoint keeps of the grid it was fine-tuned on."""
    return {"profile": profile, "residual_quant": bool(residual_quant)}


def model_checkpoint(q: QuantizedModel, profile: str, residual_quant: bool) -> dict:
    """What ``model_q.pt`` holds: the state dict, the grid it was trained on, and the precision of every quantizer
    (which the state dict does not say), so that ``mpqc export --checkpoint`` can refuse another plan."""
    from .finetune.driver import precision_signature

    return {"model": q.state_dict(), "trained_for": trained_for(profile, residual_quant),
            "precision": precision_signature(q)}


__all__ = ["DeployGrid", "INT8_UNSIGNED_BITS", "PROFILES", "fit_to_profile", "model_checkpoint",
           "narrow_unsigned_int8", "trained_for"]
