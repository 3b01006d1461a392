"""Precision-boundary costs: converting an activation between the precisions of two adjacent layers.

Mixed precision adds convert ops that uniform precision does not have: a DequantizeLinear→QuantizeLinear pair
in onnxruntime, a reformat layer in TensorRT, a requantize pass on a bit-serial array. That is why alternating
4/8/4 can be slower than 4/4/4 (research/anchors.md §14.4). The model here is linear: an edge whose producer
and consumer run at different precisions costs ``per_element`` per activation element crossing it (at the
captured input shape, batch included, like the MACs and latencies of the row it joins), in the unit of the cost
row it is added to (``[costs.boundary] applies_to``: ms for latency, cycles, or the energy unit). The search
turns ``boundary_matrix`` into edge variables.

A precision is any hashable key: an activation bit-width, a ``(bits, format)`` pair, or ``None`` for float.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .protocols import ActLike


def _numel(act: ActLike | int) -> int:
    return int(act) if isinstance(act, (int, np.integer)) else int(act.numel)


def boundary_cost(act: ActLike | int, src: Any, dst: Any, per_element: float) -> float:
    """Cost of the tensor ``act`` (or its element count) crossing from precision ``src`` to ``dst``."""
    if per_element < 0:
        raise ValueError(f"per_element must be >= 0, not {per_element}")
    return 0.0 if src == dst else float(per_element * _numel(act))


def boundary_matrix(act: ActLike | int, src: Sequence[Any], dst: Sequence[Any], per_element: float) -> np.ndarray:
    """``M[i, j]`` = cost of the edge when the producer runs at ``src[i]`` and the consumer at ``dst[j]``."""
    return np.array([[boundary_cost(act, s, d, per_element) for d in dst] for s in src], dtype=float)


def target_boundary(target: Any) -> tuple[float, str] | None:
    """``(per_element, applies_to)`` of a target that prices boundaries, else None."""
    if "boundary" not in tuple(getattr(target, "cost_models", ())):
        return None
    spec = target.costs.boundary
    return float(spec.per_element), str(spec.applies_to)


def fit_per_element(rows: Sequence[Any]) -> float | None:
    """Least-squares slope through the origin of measured convert time vs elements.

    ``rows`` are latency rows of kind ``"boundary"`` (``mpqc profile`` times a QuantizeLinear→DequantizeLinear
    pair on each distinct activation shape) with ``median_ms`` and ``numel``; returns ms per element, or None
    when there are no usable rows.
    """
    pts = [(float(r.numel), float(r.median_ms)) for r in rows
           if getattr(r, "kind", None) == "boundary" and r.status == "ok" and r.numel > 0]
    if not pts:
        return None
    n, t = np.array(pts).T
    return float(np.dot(n, t) / np.dot(n, n))
