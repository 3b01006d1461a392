"""Where an exported model first departs from its reference: activation codes compared quantizer by quantizer.

The parity check compares outputs. When they disagree, a user needs the place: this compares the integer codes
of every activation quantization point, in onnxruntime and in the torch reference, on the same samples
(anchors.md §14.12: bit-exact checks that localise mismatches). Every activation ``DequantizeLinear`` the
exporter writes carries its quantizer's key (metadata ``mpqc.point``); its input is the code tensor (after the
integer Clip of a sub-8-bit grid). A copy of the model lists those tensors as extra outputs and runs at the
check's optimisation level; the reference's quantizer of the same key gives its codes through a forward hook
(its fake-quant output over its own step, rounded: exact, as the output is code × step in fp32).

A one-code difference is what float accumulation order does to a value on a rounding tie. Such flips carry
downstream and grow where a coarse grid feeds a fine one: one code at a 3-bit input moves the next 8-bit tensor
by several, and in exports that pass the parity check deep tensors differ on up to 6 % of their elements, by up
to 28 codes. No fixed threshold tells that from a bug, so each point gets its own floor, measured the way the
parity check measures ties: the reference against itself with every quantizer's input scaled by 1 + u·1e-6
(``parity.TIE_EPS``), which flips only values within float rounding of a tie and lets the flips carry as they
do in onnxruntime. A point departs where its share of differing elements (or of elements FAR codes off) is
above TIE_FACTOR times its floor plus MARGIN: a wrong scale, zero point, bias or fused requantization does
that where it happens. Points are listed in the graph's topological order, so the first departure is where to
look; the points after it inherit its error.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

POINT_KEY = "mpqc.point"  # metadata of an activation DequantizeLinear: the quantizer's key in the reference
FAR = 2  # codes: more than one rounding tie
TIE_FACTOR = 3.0  # a point departs where its differing share is above TIE_FACTOR x its tie floor + MARGIN
MARGIN = 0.01


@dataclass
class PointDiff:
    """One activation quantization point: how far onnxruntime's codes are from the reference's."""

    key: str  # the quantizer's module path in the reference (e.g. ``aq.layer1_0_conv1``)
    tensor: str  # the IR tensor it quantizes
    max_codes: int  # the largest |code difference| over all elements and samples
    frac_differ: float  # share of elements whose codes differ at all
    frac_far: float  # share that differ by FAR codes or more
    tie_differ: float = 0.0  # the same two shares for the reference against itself under tie noise: the floor
    tie_far: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _points(model: onnx.ModelProto) -> list[tuple[str, str, str, float, int]]:
    """(key, tensor, code tensor name, zero point) of every integer activation point, in graph order."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        meta = {p.key: p.value for p in n.metadata_props}
        if POINT_KEY not in meta or n.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[n.input[1]])
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else None
        if scale.size != 1 or (zp is not None and zp.dtype.kind not in "iu"):
            continue  # per-channel or float8 points are not activation integer grids
        out.append((meta[POINT_KEY], meta.get("mpqc.tensor", meta[POINT_KEY]), n.input[0],
                    int(zp.reshape(())) if zp is not None else 0))
    return out


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = {i.name: i.data_type for i in m.graph.initializer}
    for n in m.graph.node:  # the code tensors are Q or Clip outputs: their type is the zero point's
        if n.op_type in ("QuantizeLinear", "Clip") and len(n.input) > 2 and n.input[2] in types:
            for o in n.output:
                types.setdefault(o, types[n.input[2]])
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.UINT8),
                                                                     None))
    return m


class _Stats:
    """Running max and counts of |code differences| at one point."""

    def __init__(self):
        self.max, self.differ, self.far, self.total = 0, 0, 0, 0

    def add(self, d: np.ndarray) -> None:
        self.max = max(self.max, int(d.max()) if d.size else 0)
        self.differ += int((d > 0).sum())
        self.far += int((d >= FAR).sum())
        self.total += d.size

    def shares(self) -> tuple[float, float]:
        return self.differ / max(self.total, 1), self.far / max(self.total, 1)


@torch.no_grad()
def localize(model: onnx.ModelProto, reference: torch.nn.Module, samples, *, mode: str = "opt",
             batch_size: int = 32, threads: int | None = None, exact_matmulnbits: bool = True) -> list[PointDiff]:
    """Every activation point's code difference between onnxruntime (at ``mode``) and ``reference``, with its
    tie floor, in graph order. ``samples`` and the session settings as for ``check_parity``."""
    from .parity import MODES, TIE_SEEDS, _as_inputs, _batches, opt_disabled, ort_session, tie_noise

    points = _points(model)
    if not points:
        return []
    codes = [p[2] for p in points]
    sess = ort_session(_with_outputs(model, codes), level=MODES[mode], threads=threads,
                       exact_matmulnbits=exact_matmulnbits,
                       disabled_optimizers=opt_disabled(model) if mode == "opt" else ())
    names = [i.name for i in sess.get_inputs()]
    mods = {key: reference.get_submodule(key) for key, *_ in points}
    # the reference's codes are its output over its own step (the file's may be the thing that is wrong)
    ref_scale = {key: float(m.scale.detach().abs().clamp_min(1e-12)) for key, m in mods.items()}
    seen: dict[str, list[torch.Tensor]] = {}  # a quantizer applied twice (before and after a max-pool) has two

    def keep(key):  # a copy: the graph may add into the quantizer's output in place (add_)
        return lambda _m, _a, y: seen.setdefault(key, []).append(y.detach().float().clone())

    def reference_codes(batch, seed: int | None) -> list[np.ndarray | None]:
        seen.clear()
        with tie_noise(reference, seed) if seed is not None else contextlib.nullcontext():
            reference(*batch)
        return [np.rint(seen[key][nth[i]].cpu().numpy().astype(np.float64) / ref_scale[key]).astype(np.int64)
                if len(seen.get(key, ())) > nth[i] else None for i, (key, *_) in enumerate(points)]

    hooks = [m.register_forward_hook(keep(key)) for key, m in mods.items()]
    nth = [sum(q[0] == p[0] for q in points[:i]) for i, p in enumerate(points)]  # which call of its quantizer
    ort_stats = [_Stats() for _ in points]
    tie_stats = [[_Stats() for _ in points] for _ in range(TIE_SEEDS)]
    dim0 = sess.get_inputs()[0].shape[0]
    size = dim0 if isinstance(dim0, int) and dim0 > 0 else batch_size
    try:
        for b in _batches(_as_inputs(samples), size):
            if b[0].shape[0] != size and isinstance(dim0, int):
                break  # a static-batch model cannot take the ragged tail
            got = sess.run(codes, {k: v.numpy() for k, v in zip(names, b)})
            ref = reference_codes(b, None)
            for i, (*_, zp) in enumerate(points):
                ours = got[i].astype(np.int64) - zp
                if ref[i] is not None and ours.shape == ref[i].shape:
                    ort_stats[i].add(np.abs(ours - ref[i]))
            for seed in range(TIE_SEEDS):
                for i, jittered in enumerate(reference_codes(b, seed)):
                    if ref[i] is not None and jittered is not None:
                        tie_stats[seed][i].add(np.abs(jittered - ref[i]))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, (key, tensor, *_) in enumerate(points):
        s = ort_stats[i]
        if not s.total:
            continue
        floor = [max(t[i].shares()[j] for t in tie_stats) for j in (0, 1)]
        out.append(PointDiff(key, tensor, s.max, *s.shares(), *floor))
    return out


def departs(d: PointDiff) -> bool:
    """More than rounding ties (see the module docstring)."""
    return (d.frac_differ > TIE_FACTOR * d.tie_differ + MARGIN) or (d.frac_far > TIE_FACTOR * d.tie_far + MARGIN)


def first_departure(diffs: list[PointDiff]) -> PointDiff | None:
    """The earliest point that departs (None: every difference there is rounding ties)."""
    return next((d for d in diffs if departs(d)), None)


__all__ = ["FAR", "MARGIN", "POINT_KEY", "TIE_FACTOR", "PointDiff", "departs", "first_departure", "localize"]
