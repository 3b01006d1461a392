"""TensorRT explicit-quantization rules, checked on an ONNX file before anyone tries to build an engine.

The rules (research/formats.md §3.2-3.4, anchors.md §12), each with the id a violation carries:

- ``qdq-type``: Q/DQ carry INT8, FP8 (E4M3FN) or, for DQ of constant weights only, INT4. uint8, uint4, int2 and
  int16 are rejected by the parser.
- ``asymmetric-zero-point``: the zero-point is absent or all zeros (symmetric quantization only).
- ``scale``: the scale is a build-time constant, finite and strictly positive.
- ``per-channel-activation``: per-channel (1-D) or blocked scales only on constant weights.
- ``int4-gemm-only``: INT4 only as weight-only MatMul/Gemm weights, block-wise along K (no INT4 convolution,
  no INT4 with a quantized activation operand).
- ``integer-clip``: no Clip between Q and DQ (the parser's Clip takes floats; put a float Clip before Q).
- ``qdq-pair``: a DQ reading a Q uses the same scale and zero-point.
- ``weight-only-conv`` / ``float-weight`` / ``matmul-operands``: a weighted op quantizes all its inputs or none
  (weight-only is a GEMM feature).
- ``weight-axis``: per-channel weight scales run along the op's output channels: axis 0 of a Conv weight, axis 1
  of a ConvTranspose weight (C_in, C_out/groups, k...; ungrouped), the N axis of a Gemm or MatMul weight.
- ``residual-add``: an Add after a quantized conv/GEMM reads quantized values on every input except the one
  weighted-op output it fuses into; otherwise the add runs unfused in higher precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from mpqc.errors import UserError

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_COMMUTING = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "Slice",
              "Concat", "Split", "Expand")
_TYPES_Q = {ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN}
_TYPES_DQ = _TYPES_Q | {ir.DataType.INT4}


@dataclass(frozen=True)
class Violation:
    """One broken rule: its id, the offending node's name and what to change."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message} [{self.rule}]"


def _load(model) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    return ir.from_proto(model)


def _const(v: ir.Value | None) -> np.ndarray | None:
    """The value of a constant (initializer or Constant node output), else None."""
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None


def _is_weight(v: ir.Value | None) -> bool:
    """A constant, or a DQ/Transpose/Reshape/Cast of one (a weight tensor)."""
    for _ in range(4):
        if v is None:
            return False
        if _const(v) is not None:
            return True
        p = v.producer()
        if p is None or p.op_type not in ("DequantizeLinear", "Transpose", "Reshape", "Cast", "Clip"):
            return False
        v = p.inputs[0]
    return False


def _from_dq(v: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear that produces ``v``, looking through ops TensorRT moves DQ across."""
    for _ in range(8):
        p = v.producer() if v is not None else None
        if p is None:
            return None
        if p.op_type == "DequantizeLinear":
            return p
        if p.op_type not in _COMMUTING:
            return None
        v = p.inputs[0]
    return None


def _weighted_producer(v: ir.Value | None) -> ir.Node | None:
    """The Conv/Gemm/MatMul that produces ``v``, looking through a bias Add with a constant."""
    p = v.producer() if v is not None else None
    if p is not None and p.op_type == "Add" and any(_const(i) is not None for i in p.inputs):
        p = next(i for i in p.inputs if _const(i) is None).producer()
    return p if p is not None and p.op_type in _WEIGHTED else None


def _name(n: ir.Node) -> str:
    return n.name or f"<{n.op_type}>"


def _operands(n: ir.Node) -> tuple[list[ir.Value], list[ir.Value]]:
    """(activation inputs, weight inputs) of a weighted op."""
    ins = [i for i in n.inputs[:2] if i is not None]
    if n.op_type in ("Conv", "ConvTranspose"):
        return ins[:1], ins[1:2]
    acts = [i for i in ins if not _is_weight(i)]
    return acts, [i for i in ins if _is_weight(i)]


def check_trt(model) -> list[Violation]:
    """Every TensorRT explicit-quantization rule ``model`` breaks (an ONNX file, ModelProto or onnx-ir Model)."""
    m = _load(model)
    out: list[Violation] = []
    for n in m.graph.all_nodes():
        if n.op_type in _QDQ:
            out += _check_qdq(n)
        elif n.op_type in _WEIGHTED:
            out += _check_weighted(n)
        elif n.op_type == "Add":
            out += _check_add(n)
        elif n.op_type == "Clip":
            out += _check_clip(n)
    return out


def _check_clip(n: ir.Node) -> list[Violation]:
    x = n.inputs[0] if n.inputs else None
    p = x.producer() if x is not None else None
    dtype = x.dtype if x is not None else None
    if dtype is None and p is not None and p.op_type == "QuantizeLinear" and len(p.inputs) > 2 and p.inputs[2]:
        dtype = p.inputs[2].dtype
    if dtype in (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4):
        where = "between QuantizeLinear and DequantizeLinear" if p is not None and p.op_type == "QuantizeLinear" \
            else f"on {dtype.name} values"
        return [Violation("integer-clip", _name(n), f"integer Clip {where} is not a TensorRT pattern (its Clip "
                          "takes float, int32 or int64); clip the float input before Q instead")]
    return []


def _check_qdq(n: ir.Node) -> list[Violation]:
    out: list[Violation] = []
    name = _name(n)
    x, scale_v = n.inputs[0], n.inputs[1] if len(n.inputs) > 1 else None
    zp_v = n.inputs[2] if len(n.inputs) > 2 else None
    dtype = (n.outputs[0].dtype if n.op_type == "QuantizeLinear" else x.dtype) if x is not None else None
    if zp_v is not None and zp_v.dtype is not None:
        dtype = zp_v.dtype
    if dtype is None and n.op_type == "QuantizeLinear" and "output_dtype" in n.attributes:
        dtype = ir.DataType(n.attributes["output_dtype"].as_int())
    allowed = _TYPES_Q if n.op_type == "QuantizeLinear" else _TYPES_DQ
    if dtype is not None and dtype not in allowed:
        hint = ("TensorRT has no uint8: use signed int8 with zero-point 0 (unsigned values of up to 7 bits fit)"
                if dtype == ir.DataType.UINT8 else "carry 2..7-bit values in int8")
        out.append(Violation("qdq-type", name, f"{n.op_type} of type {dtype.name} is not supported; {hint}"))
    zp = _const(zp_v)
    if zp_v is not None and (zp is None or np.any(zp.astype(np.float64) != 0)):
        out.append(Violation("asymmetric-zero-point", name, "zero-point is not all zeros; TensorRT only supports "
                             "symmetric quantization (omit the zero-point or make it 0)"))
    scale = _const(scale_v)
    if scale is None:
        out.append(Violation("scale", name, "scale is not a constant; TensorRT needs build-time scales"))
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        out.append(Violation("scale", name, "scale is not finite and strictly positive"))
    weight = _is_weight(x)
    if scale is not None and scale.size > 1 and not weight:
        out.append(Violation("per-channel-activation", name, f"per-channel scale ({scale.size} values) on an "
                             "activation; TensorRT allows per-channel and block scales only for weights"))
    if n.op_type == "DequantizeLinear":
        out += _check_dq(n, name, dtype, scale, zp)
    return out


def _check_dq(n: ir.Node, name: str, dtype, scale, zp) -> list[Violation]:
    out: list[Violation] = []
    src = n.inputs[0].producer() if n.inputs[0] is not None else None
    if src is not None and src.op_type == "QuantizeLinear":
        s2, z2 = _const(src.inputs[1]), _const(src.inputs[2]) if len(src.inputs) > 2 else None
        same_s = scale is not None and s2 is not None and np.array_equal(scale, s2)
        same_z = (zp is None and z2 is None) or (zp is not None and z2 is not None and np.array_equal(zp, z2))
        if not (same_s and same_z):
            out.append(Violation("qdq-pair", name, f"scale/zero-point differ from those of {_name(src)}"))
    if dtype == ir.DataType.INT4:
        users = _users_through(n.outputs[0], ("Transpose", "Reshape"))
        gemm = [u for u in users if u.op_type in ("MatMul", "Gemm")]
        if not users or len(gemm) != len(users):
            what = ", ".join(sorted({u.op_type for u in users})) or "nothing"
            out.append(Violation("int4-gemm-only", name, f"INT4 weights feed {what}; TensorRT runs INT4 only as "
                                 "weight-only MatMul/Gemm (no INT4 convolution): use an int8 container"))
        for g in gemm:
            acts, _ = _operands(g)
            if any(_from_dq(a) is not None for a in acts):
                out.append(Violation("int4-gemm-only", name, f"INT4 weights of {_name(g)} with a quantized "
                                     "activation; TensorRT's INT4 is weight-only"))
        rank = len(n.inputs[0].shape) if n.inputs[0] is not None and n.inputs[0].shape is not None else None
        if scale is not None and (scale.ndim != rank or "block_size" not in n.attributes):
            out.append(Violation("int4-gemm-only", name, "INT4 weights need block quantization along K "
                                 "(scale of the weight's rank and a block_size)"))
    return out


def _users_through(v: ir.Value, passthrough: tuple[str, ...]) -> list[ir.Node]:
    out = []
    for u in v.consumers():
        if u.op_type in passthrough:
            out += _users_through(u.outputs[0], passthrough)
        else:
            out.append(u)
    return out


def _check_weighted(n: ir.Node) -> list[Violation]:
    acts, weights = _operands(n)
    name = _name(n)
    act_q = [_from_dq(a) is not None for a in acts]
    w_q = [_from_dq(w) is not None for w in weights]
    out: list[Violation] = []
    for w in weights:
        out += _check_weight_axis(n, w)
    if n.op_type in ("Conv", "ConvTranspose"):
        if any(w_q) and not all(act_q):
            out.append(Violation("weight-only-conv", name, "quantized weights with a float input; TensorRT has "
                                 "no weight-only convolution (quantize the input too, or neither)"))
        if all(act_q) and act_q and weights and not any(w_q):
            out.append(Violation("float-weight", name, "quantized input with float weights; put a "
                                 "DequantizeLinear on the weights too"))
    elif weights:
        if all(act_q) and act_q and not any(w_q):
            out.append(Violation("float-weight", name, "quantized input with float weights; put a "
                                 "DequantizeLinear on the weights too"))
    elif len(acts) == 2 and act_q[0] != act_q[1]:
        out.append(Violation("matmul-operands", name, "only one operand of an activation matmul is quantized; "
                             "quantize both or neither"))
    return out


def _output_axis(n: ir.Node, rank: int, first: bool = False) -> int | None:
    """The axis of ``n``'s weight input that indexes its output channels (None: no single such axis); ``first``:
    the weight is a MatMul's left operand (W @ x, its rows are the outputs)."""
    if n.op_type == "Conv":
        return 0
    if n.op_type == "ConvTranspose":
        g = n.attributes.get("group")
        return 1 if g is None or g.as_int() == 1 else None
    if n.op_type == "Gemm":
        tb = n.attributes.get("transB")
        return 0 if tb is not None and tb.as_int() else 1
    return rank - 2 if first else rank - 1  # MatMul: x @ W with W (..., K, N), or W (..., M, K) @ x


def _check_weight_axis(n: ir.Node, w: ir.Value) -> list[Violation]:
    """A per-channel weight DQ (read directly or through a Transpose) whose scales do not run along ``n``'s output
    channels: TensorRT quantizes weights per output channel only."""
    p = w.producer()
    perm = None
    if p is not None and p.op_type == "Transpose":
        a = p.attributes.get("perm")
        perm = list(a.as_ints()) if a is not None else None
        p = p.inputs[0].producer()
    if p is None or p.op_type != "DequantizeLinear" or "block_size" in p.attributes:
        return []
    scale = _const(p.inputs[1]) if len(p.inputs) > 1 else None
    data = p.inputs[0]
    rank = len(data.shape) if data.shape is not None else None
    if scale is None or scale.ndim != 1 or scale.size <= 1 or rank is None:
        return []
    a = p.attributes.get("axis")
    axis = (a.as_int() if a is not None else 1) % rank
    seen = perm.index(axis) if perm is not None else axis  # where that axis lands in what the op reads
    want = _output_axis(n, rank, first=n.op_type == "MatMul" and n.inputs[0] is w)
    if want is None or seen != want:
        return [Violation("weight-axis", _name(n), f"per-channel weight scales along axis {seen} of what the "
                          f"{n.op_type} reads, not its output channels" + (f" (axis {want})" if want is not None
                                                                           else " (a grouped ConvTranspose has no "
                                                                           "such axis)") +
                          "; quantize the weight per output channel")]
    return []


def _check_add(n: ir.Node) -> list[Violation]:
    ins = [i for i in n.inputs if i is not None]
    if len(ins) != 2 or any(_const(i) is not None for i in ins):
        return []
    producers = [_weighted_producer(i) for i in ins]
    quantized_gemm = [p for p in producers if p is not None and
                      any(_from_dq(a) is not None for a in _operands(p)[0] + _operands(p)[1])]
    if not quantized_gemm:
        return []
    free = 1  # one weighted-op output may stay float: the add fuses into that op's epilogue
    out = []
    for v, p in zip(ins, producers):
        if _from_dq(v) is not None:
            continue
        if p is not None and free:
            free -= 1
            continue
        src = v.producer()
        what = f"{src.op_type} {_name(src)}" if src is not None else "a graph input"
        out.append(Violation("residual-add", _name(n), f"input {v.name} (from {what}) is not quantized; TensorRT "
                             "fuses a residual add into the conv only when its other input comes from a "
                             "DequantizeLinear"))
    return out


class TrtRuleError(UserError):
    """An export breaks TensorRT's rules; ``violations`` lists them all (the message names the first few)."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        shown = "; ".join(str(v) for v in violations[:3])
        more = f"; and {len(violations) - 3} more" if len(violations) > 3 else ""
        super().__init__(f"{len(violations)} TensorRT explicit-quantization rule violation(s): {shown}{more}")


def assert_trt_compatible(model) -> None:
    """Raise ``TrtRuleError`` (a ``UserError``) when ``model`` breaks any rule."""
    vs = check_trt(model)
    if vs:
        raise TrtRuleError(vs)


__all__ = ["TrtRuleError", "Violation", "assert_trt_compatible", "check_trt"]
