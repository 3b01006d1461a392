"""Deployment targets as data: what each target runs (bit-widths, formats, rules) and how it prices a plan.

``load_target("bitserial")`` reads a built-in description (``mpqc/targets/*.toml``), ``load_target(path)`` a
user's own; the schema is documented in ``targets/schema.py``.
"""

from __future__ import annotations

from .loader import list_targets, load_target, target_from_dict, target_to_dict
from .schema import (
    AnalogSpec,
    BoundarySpec,
    Candidate,
    CostSpec,
    CyclesSpec,
    EnergySpec,
    LatencySpec,
    OperandSpec,
    Rule,
    SchemaError,
    Target,
)

__all__ = [
    "AnalogSpec", "BoundarySpec", "Candidate", "CostSpec", "CyclesSpec", "EnergySpec", "LatencySpec",
    "OperandSpec", "Rule", "SchemaError", "Target", "list_targets", "load_target", "target_from_dict",
    "target_to_dict",
]
