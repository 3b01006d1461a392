"""QDQ ONNX export of a calibrated ``QuantizedModel``, for onnxruntime, TensorRT or Brevitas-style QCDQ readers.

How, and why this way (research/formats.md §5, §7):

1. **Deploy graph (torch).** A copy of the QuantizedModel's GraphModule (BN already folded) with the profile's
   placement changes, each one exact or recorded in ``notes``: the activation quantizer after a MaxPool is also
   applied before it (max commutes with a monotone quantizer, so the values are identical and onnxruntime can
   fuse the conv before the pool); residual ``Add`` inputs read quantized values (TensorRT fuses such an add into
   the conv epilogue, onnxruntime into ``QLinearAdd``), and an input without a quantizer of at least 8 bits
   gets a new 8-bit quantizer calibrated on ``calib`` (a block input the next conv reads at fewer bits: that
   conv's quantizer then requantizes the 8-bit codes); for onnxruntime, conv biases sit on the int32
   accumulator grid (what QLinearConv adds); TensorRT has no uint8, so an 8-bit unsigned activation becomes
   7 bits over the same range; ``fp8`` layers get FP8 (E4M3FN) quantizers and ``bf16``/``fp16`` layers none.
   The caller's model is not changed, and this copy *is* the reference the parity check compares with.
2. **Float export with named quantization points.** ``torch.onnx.export`` (dynamo, opset ≥ 21) of the deploy
   graph with every quantizer replaced by an identity custom op ``mpqc_export::point(x, key)``; its custom
   translation emits one ``mpqc.export::Point`` node carrying the quantizer's key. Stock fake-quant translation is
   not used: it only handles 8-bit ranges (formats.md §5.2).
3. **Q/DQ insertion with onnx-ir**, keyed by the quantizer (and so by the IR's layer and tensor names): a weight
   point becomes integer codes in a container (int8, or int4 where the runtime gains from it) plus per-channel
   scales and a ``DequantizeLinear``; an activation point becomes ``QuantizeLinear → DequantizeLinear`` with the
   range of a sub-8-bit grid limited by a Clip: a float Clip before Q for TensorRT (its Clip takes floats), an
   integer Clip between Q and DQ for onnxruntime (uint8, which it fuses) and QCDQ readers.

Exactness: ONNX Q computes ``saturate(round_half_even(x / s) + zp)`` and DQ ``(q - zp) · s`` in fp32, which is
the fake-quant formula of ``kernels/fake_quant.py`` with the same fp32 division; weight codes are computed in
torch by the quantizer's own numerics and stored, so the DQ output equals the fake-quantized weight bit for bit.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.fx
from onnx.defs import OpSchema
from torch import nn

from mpqc.compiler.deploy_grid import narrow_unsigned_int8
from mpqc.compiler.passes import packet
from mpqc.compiler.quantize import (
    LINEAR_TARGETS,
    ActQuantizer,
    BiasQuantizer,
    LayerQuant,
    QuantizedModel,
    WeightQuantizer,
    bias_sites,
    weight_codes,
)
from mpqc.compiler.residual import RESIDUAL_BITS, active, is_quantizer, nonnegative_nodes, quantize_residual_adds
from mpqc.errors import UserError, first_line

log = logging.getLogger(__name__)

MARKER_DOMAIN = "mpqc.export"
DEFAULT_OPSET = 21  # int4 and blocked Q/DQ (formats.md §1.1); TensorRT 10.x parsers read it
FORMATS = ("int", "fp8", "bf16", "fp16")  # int: integer Q/DQ; fp8: FLOAT8E4M3FN Q/DQ; bf16/fp16: left float
FP8_MAX = 448.0  # largest finite float8 e4m3fn value; Q saturates to it


class Profile(str, enum.Enum):
    """Which consumer the QDQ file is laid out for (formats.md §7)."""

    ORT = "ort"  # onnxruntime CPU: uint8 activations (signed ones with zero-point 128), int32 conv biases
    TRT = "trt"  # TensorRT explicit quantization: symmetric int8, INT4 weight-only GEMM, residual Q/DQ
    QCDQ = "qcdq"  # Brevitas/QONNX readers: Q -> integer Clip -> DQ, int8/uint8 containers


# ---------------------------------------------------------------------------------------------------------
# the marker op: identity in torch, one custom-domain node in ONNX
@torch.library.custom_op("mpqc_export::point", mutates_args=())
def _point(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.clone()


@_point.register_fake
def _point_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    return torch.empty_like(x)


def _point_op():
    """The onnxscript op behind the translation; built lazily so importing mpqc stays lean."""
    from onnxscript import values
    from onnxscript._internal.values import Op

    schema = OpSchema(
        "Point", MARKER_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter("x", "T")], outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "any float")],
        attributes=[OpSchema.Attribute("key", OpSchema.AttrType.STRING, "the quantizer's module path")])
    return Op(values.Opset(MARKER_DOMAIN, 1), "Point", schema)  # schema passed, never registered globally


# ---------------------------------------------------------------------------------------------------------
# plan -> quantized model
def assignment_from_plan(plan) -> dict[str, LayerQuant]:
    """``{layer: LayerQuant}`` from a ``Plan`` (or pass a ready assignment through)."""
    if isinstance(plan, Mapping):
        return dict(plan)
    out = {}
    for name, lp in plan.layers.items():
        w = lp.w_bits
        out[name] = LayerQuant(tuple(w) if isinstance(w, list) else w, lp.a_bits)
    return out


def apply_plan(qm: QuantizedModel, plan) -> dict[str, str]:
    """Set ``qm``'s precision from a ``Plan`` or ``{layer: LayerQuant}``; returns ``{layer: format}``.

    ``QuantizedModel.apply_plan`` does the setting (the one place plans become quantizer settings, shared with
    fine-tuning, so a fine-tuned state dict loads onto the quantizers the exporter sees); this checks first that
    every width is one QDQ carries (weights 2..8, activations 1..8) and turns mismatches into a ``UserError``.
    """
    assignment = assignment_from_plan(plan)
    bits_ok = lambda b, low: b is None or low <= b <= 8  # noqa: E731
    for name, lq in assignment.items():
        ws = lq.w_bits if isinstance(lq.w_bits, tuple) else (lq.w_bits,)
        if not all(bits_ok(b, 2) for b in ws) or not bits_ok(lq.a_bits, 1):
            raise UserError(f"layer {name}: QDQ export carries 2..8-bit weights and 1..8-bit activations, "
                            f"not w_bits={lq.w_bits} a_bits={lq.a_bits}")
    for tensor, bits in ({} if isinstance(plan, Mapping) else plan.act_groups).items():
        if not bits_ok(bits, 1):
            raise UserError(f"activation group {tensor}: QDQ export carries 1..8-bit activations, not {bits}")
    try:
        qm.apply_plan(plan)
    except KeyError as e:
        raise UserError(f"the plan does not fit this model: {e.args[0]}") from None
    except ValueError as e:
        raise UserError(f"the plan does not fit this model: {e}") from None
    return {} if isinstance(plan, Mapping) else {name: lp.format for name, lp in plan.layers.items()}


def _tensor_keys(qm: QuantizedModel) -> dict[str, list[str]]:
    """IR tensor name -> the activation quantizer keys that quantize it."""
    out: dict[str, list[str]] = {}
    for op in qm.graph_ir.layers():
        for t, key in zip(op.act_inputs, qm.act_keys.get(op.name, [])):
            if key not in out.setdefault(t, []):
                out[t].append(key)
    return out


# ---------------------------------------------------------------------------------------------------------
# step 1: the deploy graph
_MAXPOOL = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d"}


@dataclass
class _Deploy:
    gm: torch.fx.GraphModule
    notes: list[str]
    residual: list[str]  # keys of the residual quantizers added


class FP8WeightQuantizer(nn.Module):
    """FP8 (E4M3FN) fake-quant of a weight, one scale per output channel: absmax / 448."""

    enabled = True

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        absmax = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12)
        self.register_buffer("scale", absmax / FP8_MAX)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """float8_e4m3fn codes (round to nearest even, saturating at ±448, as ONNX Q does)."""
        s = self.scale.reshape(-1, *[1] * (w.dim() - 1))
        return (w.detach().float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (self.codes(w).float() * self.scale.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype)


class FP8ActQuantizer(nn.Module):
    """FP8 (E4M3FN) fake-quant of an activation, one scale per tensor: the calibrated range / 448."""

    enabled = True

    def __init__(self, absmax: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(max(absmax, 1e-12) / FP8_MAX, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (x.float() / self.scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return (q.float() * self.scale).to(x.dtype)


def _apply_formats(gm: torch.fx.GraphModule, qm: QuantizedModel, formats: Mapping[str, str],
                   notes: list[str]) -> None:
    """In the deploy copy: fp8 layers get FP8 quantizers, bf16/fp16 layers none (they run in float)."""
    special = {k: f for k, f in formats.items() if f != "int"}
    if not special:
        return
    wq_keys = {id(m): k for k, m in qm.wq.items()}
    for layer, fmt in special.items():
        if layer not in qm.act_keys:
            raise UserError(f"layer {layer}: format {fmt!r} for a layer the model does not quantize")
        wq = qm.weight_quantizer(layer)
        if wq is None or not wq.enabled:
            continue
        key = wq_keys[id(wq)]
        if fmt == "fp8":
            gm.wq[key] = FP8WeightQuantizer(qm.weight(layer))
        else:
            gm.wq[key].enabled = False
    readers: dict[str, set[str]] = {}
    for layer, keys in qm.act_keys.items():
        for k in keys:
            readers.setdefault(k, set()).add(formats.get(layer, "int"))
    for key, fmts in readers.items():
        aq = gm.aq[key]
        if not (fmts & set(special.values())) or not aq.enabled:
            continue
        if len(fmts) > 1:
            raise UserError(f"activation {key} is read by layers of formats {sorted(fmts)}; one tensor has one "
                            "format: give its readers the same format in the plan")
        fmt = next(iter(fmts))
        if fmt == "fp8":
            rng = float(aq.scale.detach().abs()) * (2 ** (aq.bits - (1 if aq.signed else 0)) - 1)
            gm.aq[key] = FP8ActQuantizer(rng)
        else:
            aq.bits = None
    notes.append("formats: " + ", ".join(f"{layer} {fmt}" for layer, fmt in sorted(special.items())))


def _deploy_graph(qm: QuantizedModel, profile: Profile, calib: Iterable | None,
                  formats: Mapping[str, str] | None = None) -> _Deploy:
    gm = copy.deepcopy(qm.gm)
    gm.train(False)
    notes: list[str] = []
    _apply_formats(gm, qm, formats or {}, notes)
    g = gm.graph
    nodes = list(g.nodes)
    if profile == Profile.ORT:
        _prequantize_maxpools(gm, nodes, notes)
    residual = _quantize_residual_adds(gm, qm, profile, notes)
    g.lint()
    gm.recompile()
    if residual:
        if calib is None:
            raise UserError(f"the {profile.value} profile quantizes residual-add inputs "
                            f"({len(residual)} new quantizers) and needs calibration data; pass --data")
        _calibrate_new(gm, residual, calib)
    if profile == Profile.TRT:
        trained = sum(getattr(m, "narrowed_from", None) == 8 for m in gm.modules())
        if trained:
            notes.append(f"{trained} unsigned 8-bit activations were fine-tuned as 7 bits (codes 0..127 in int8), "
                         "the grid TensorRT runs them on")
        for name in narrow_unsigned_int8(gm.named_modules()):  # not trained so (compiler/deploy_grid.py)
            notes.append(f"{name}: TensorRT has no uint8; the 8-bit unsigned activation is carried as 7 bits "
                         "(codes 0..127 in int8) over the same range (fine-tuning did not train it so)")
    if profile == Profile.ORT:
        _quantize_biases(gm, notes)
    g.lint()
    gm.recompile()
    return _Deploy(gm, notes, residual)


def _quantize_biases(gm: torch.fx.GraphModule, notes: list[str]) -> None:
    """Put a ``BiasQuantizer`` on the bias of every conv and linear whose input and weight are quantized.

    onnxruntime rounds such a bias to int32 at s_in·s_w when it fuses (QLinearConv, and a Gemm's bias too); a
    float linear bias left in the file made the fused run differ from the file's own semantics by up to half a
    step of that grid, which at 4-bit inputs and weights is several codes of the output (export/localize.py
    found it)."""
    bq = nn.ModuleDict()
    gm.add_submodule("bq", bq)
    counts = {"conv": 0, "linear": 0}
    for node, bias, key, act, weight in bias_sites(gm, ("aq.", "rq.")):
        bq[key] = BiasQuantizer(act, weight)
        with gm.graph.inserting_after(bias):
            q = gm.graph.call_module(f"bq.{key}", (bias,))
        node.replace_input_with(bias, q)
        counts["linear" if packet(node) in LINEAR_TARGETS else "conv"] += 1
    if len(bq):
        what = " and ".join(f"{n} {k}" for k, n in counts.items() if n)
        notes.append(f"{what} biases quantized to int32 at scale s_in·s_w (as QLinearConv and a fused Gemm add them)")


def _prequantize_maxpools(gm: torch.fx.GraphModule, nodes: list, notes: list[str]) -> None:
    """Apply the quantizer that follows a MaxPool also to its input (exact: max commutes with rounding)."""
    for n in nodes:
        if not (is_quantizer(n, ("aq.",)) and active(gm, n)):
            continue
        pool = n.args[0]
        if not (isinstance(pool, torch.fx.Node) and pool.op == "call_function" and packet(pool) in _MAXPOOL):
            continue
        src = pool.args[0]
        if not isinstance(src, torch.fx.Node) or any(is_quantizer(u) for u in src.users):
            continue
        with gm.graph.inserting_after(src):
            q = gm.graph.call_module(str(n.target), (src,))
        pool.replace_input_with(src, q)
        notes.append(f"{n.target}: also applied before {pool.name} so the conv before the pool fuses (exact)")


def _quantize_residual_adds(gm: torch.fx.GraphModule, qm: QuantizedModel, profile: Profile,
                            notes: list[str]) -> list[str]:
    """Make residual adds read quantized inputs (compiler/residual.py); returns the keys of the quantizers that
    had to be added here, that is, that fine-tuning did not already train. TRT: every input but one weighted-op
    output (the one the add fuses into); ORT: every input (QLinearAdd). Adds next to float layers are left alone.
    """
    if profile == Profile.QCDQ:
        return []
    if "rq" not in dict(gm.named_children()):
        gm.add_submodule("rq", nn.ModuleDict())
    trained = len(qm.rq)
    added = quantize_residual_adds(gm, gm.get_submodule("rq"), nonnegative_nodes(qm),
                                   fuse_one=profile == Profile.TRT)
    if trained:
        notes.append(f"{trained} residual-add quantizers at {RESIDUAL_BITS} bits were trained with the model")
    for r in added:
        notes.append(f"{r.key}: new {RESIDUAL_BITS}-bit quantizer on {r.tensor}, an input of the residual add "
                     f"{r.add} (fine-tuning did not place it; calibrated here)")
        # a narrower quantizer on the same tensor (the next conv reading a block input at 2 bits) requantizes the
        # 8-bit codes, so the tensor keeps one quantizer (and onnxruntime still fuses the add that produced it)
        for u in r.requantizing:
            notes.append(f"{u}: requantizes the {RESIDUAL_BITS}-bit codes of {r.key} (the add {r.add} reads "
                         f"{r.tensor} at {RESIDUAL_BITS} bits, not at its narrower width)")
    return [r.key for r in added]


@torch.no_grad()
def _calibrate_new(gm: torch.fx.GraphModule, keys: list[str], calib: Iterable, max_batches: int = 8) -> None:
    mods = [gm.get_submodule(k) for k in keys]
    bits = [m.bits for m in mods]
    for m in mods:
        m.observing = True
    try:
        for i, batch in enumerate(calib):
            if i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            gm(*(x if isinstance(x, tuple) else (x,)))
    finally:
        for m, b in zip(mods, bits):
            m.observing = False
            m.bits = b
            m.init_scale()


# ---------------------------------------------------------------------------------------------------------
# step 2: float export with markers
def _marker_graph(deploy: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """A copy of the deploy graph with quantizers replaced by markers; returns it and {weight key: param FQN}."""
    gm = copy.deepcopy(deploy)
    weights: dict[str, str] = {}
    for n in list(gm.graph.nodes):
        if is_quantizer(n):
            src = n.args[0]
            if str(n.target).startswith("wq.") and src.op == "get_attr":
                weights[str(n.target)] = str(src.target)
            with gm.graph.inserting_before(n):
                p = gm.graph.call_function(torch.ops.mpqc_export.point.default, (src, str(n.target)))
            n.replace_all_uses_with(p)
            gm.graph.erase_node(n)
        elif n.op == "call_module" and str(n.target) == "_guards_fn":
            gm.graph.erase_node(n)  # torch.export's input-shape guards; the re-export makes its own
    gm.graph.lint()
    gm.recompile()
    return gm, weights


def example_inputs_of(gm: torch.fx.GraphModule, batch: int = 2) -> tuple:
    """Example inputs shaped like the graph's placeholders, with batch ``batch`` (ints are zeros: valid ids)."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise UserError(f"graph input {n.name} has no recorded shape; re-capture the model")
        shape = [batch if i == 0 else int(s) for i, s in enumerate(val.shape)]
        out.append(torch.randn(shape).to(val.dtype) if val.dtype.is_floating_point
                   else torch.zeros(shape, dtype=val.dtype))
    return tuple(out)


def _torch_export(gm: torch.fx.GraphModule, example: tuple, opset: int, dynamic_batch: bool = True) -> onnx.ModelProto:
    import warnings

    op = _point_op()

    def point(x, key: str):
        return op(x, key=key)

    table = {torch.ops.mpqc_export.point.default: point}
    errors = []
    for dynamic in ((True, False) if dynamic_batch else (False,)):
        shapes = tuple({0: torch.export.Dim("batch")} for _ in example) if dynamic else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(gm, example, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                         custom_translation_table=table, optimize=True, verbose=False)
            return prog.model_proto
        except Exception as e:  # noqa: BLE001 - a dynamic batch is a convenience; retry static, then report
            errors.append(first_line(e, 300))
            log.info("torch.onnx.export (dynamic batch=%s) failed: %s", dynamic, errors[-1])
    raise UserError(f"torch.onnx.export failed: {errors[-1]}")


# ---------------------------------------------------------------------------------------------------------
# step 3: Q/DQ insertion
_INT = {  # container -> (onnx-ir dtype, numpy dtype, min, max)
    "int8": (ir.DataType.INT8, np.int8, -128, 127),
    "uint8": (ir.DataType.UINT8, np.uint8, 0, 255),
    "int4": (ir.DataType.INT4, ml_dtypes.int4, -8, 7),
    "int2": (ir.DataType.INT2, ml_dtypes.int2, -2, 1),
}
_GEMM = ("MatMul", "Gemm")


@dataclass
class _WeightPoint:
    key: str
    layer: str
    quantizer: WeightQuantizer
    weight: torch.Tensor
    weight_only: bool


@dataclass
class _Fp8Point:
    key: str
    name: str  # the layer (weight) or tensor (activation)
    quantizer: nn.Module
    weight: torch.Tensor | None


@dataclass
class _BiasPoint:
    key: str
    layer: str
    quantizer: BiasQuantizer


@dataclass
class _ActPoint:
    key: str
    tensor: str
    quantizer: ActQuantizer


class _Inserter:
    """Replaces every marker node of ``model`` by the profile's Q/DQ pattern."""

    def __init__(self, model: ir.Model, points: dict, profile: Profile, opset: int):
        self.model, self.graph, self.points, self.profile, self.opset = model, model.graph, points, profile, opset
        self.inits: dict[str, ir.Value] = {}
        self.layers: dict[str, dict] = {}
        self.notes: list[str] = []
        self.names = {n.name for n in model.graph}
        self.compute: dict[ir.Node, str] = {}  # the op that consumes each quantized weight -> its IR layer

    def _name(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    # -- helpers -----------------------------------------------------------------------------------------
    def _init(self, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        if name in self.inits:
            return self.inits[name]
        base, k = name, 1
        while name in self.graph.initializers:
            k += 1
            name = f"{base}_{k}"
        t = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.graph.register_initializer(v)
        self.inits[base] = v
        return v

    def _replace(self, marker: ir.Node, new: ir.Value, nodes: list[ir.Node]) -> None:
        old = marker.outputs[0]
        if nodes:
            self.graph.insert_before(marker, nodes)
        if old.is_graph_output():
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name = name
        else:
            old.replace_all_uses_with(new)
        self.graph.remove(marker, safe=True)

    # -- driver ------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph):
            if node.domain != MARKER_DOMAIN:
                continue
            key = node.attributes["key"].as_string()
            point = self.points.get(key)
            if isinstance(point, _WeightPoint) and point.quantizer.enabled:
                self._weight(node, point)
            elif isinstance(point, _ActPoint) and point.quantizer.enabled:
                self._act(node, point)
            elif isinstance(point, _BiasPoint):
                self._bias(node, point)
            elif isinstance(point, _Fp8Point):
                self._fp8(node, point)
            else:
                self._replace(node, node.inputs[0], [])

    def tag_layers(self, fx_names: Mapping[str, str]) -> None:
        """Name each layer's compute node after the IR layer and tag it ``mpqc.layer`` (engine reports use it).

        Weighted layers are found through their weight's DequantizeLinear; activation matmuls through the value
        name the exporter gives their output (the fx node name).
        """
        found = dict(self.compute)
        for node in self.graph:
            out = node.outputs[0].name if node.outputs else None
            if out in fx_names and node not in found and fx_names[out] not in found.values():
                found[node] = fx_names[out]
        for node, layer in found.items():
            node.metadata_props["mpqc.layer"] = layer
            if layer not in self.names:
                self.names.discard(node.name)
                node.name = layer
                self.names.add(layer)

    # -- weights -----------------------------------------------------------------------------------------
    def _consumer(self, value: ir.Value) -> tuple[ir.Node | None, ir.Node | None]:
        """(transpose to fold or None, the op that uses the weight)."""
        users = list(value.consumers())
        if len(users) != 1:
            return None, None
        u = users[0]
        perm = u.attributes.get("perm")
        if u.op_type == "Transpose" and perm is not None:
            perm = list(perm.as_ints())
            nxt = list(u.outputs[0].consumers())
            nxt_op = nxt[0].op_type if len(nxt) == 1 else ""
            # x @ Wᵀ (a 2-D swap), or a transposed conv's weight stored (C_out, C_in, k...) read as (C_in, C_out, k...)
            if perm == [1, 0] or (perm[:2] == [1, 0] and perm[2:] == list(range(2, len(perm)))
                                  and nxt_op == "ConvTranspose"):
                return u, (nxt[0] if len(nxt) == 1 else None)
        return None, u

    def _weight(self, marker: ir.Node, p: _WeightPoint) -> None:
        codes_t, scale_t = weight_codes(p.quantizer, p.weight)
        codes = codes_t.numpy().astype(np.int8)
        scale = scale_t.detach().float().numpy().astype(np.float32)
        bits = [int(b) for b in p.quantizer.bits.tolist()]
        transpose, user = self._consumer(marker.outputs[0])
        op_type = user.op_type if user is not None else ""
        axis = 0
        if transpose is not None:  # the stored codes take the layout the op reads; the scales stay per output channel
            codes, axis = np.ascontiguousarray(np.swapaxes(codes, 0, 1)), 1
        container, block = self._weight_container(op_type, max(bits), p.weight_only, codes.shape, axis, user)
        lo, hi = _INT[container][2:]
        assert codes.min(initial=0) >= lo and codes.max(initial=0) <= hi, "codes outside the container"
        name = p.layer
        dq_attrs: dict = {"axis": axis}
        if block:
            # blocks along K with every block of a channel sharing the channel's scale: same numbers as
            # per-channel, in the layout TensorRT's INT4 GEMM takes (formats.md §3.2)
            k_axis = 1 - axis
            reps = codes.shape[k_axis] // block
            scale = np.repeat(np.expand_dims(scale, k_axis), reps, axis=k_axis)
            dq_attrs = {"axis": k_axis, "block_size": block}
        dtype, npdt = _INT[container][:2]
        w = self._init(f"{name}.weight_q", codes.astype(npdt), dtype)
        s = self._init(f"{name}.weight_scale", scale)
        tape = ir.tape.Tape()
        x = w
        if self.profile == Profile.QCDQ and max(bits) < 8:
            q_lo, q_hi = -(1 << (max(bits) - 1)), (1 << (max(bits) - 1)) - 1
            x = tape.op("Clip", [w, self._init(f"{name}.weight_qmin", np.array(q_lo, np.int8)),
                                 self._init(f"{name}.weight_qmax", np.array(q_hi, np.int8))],
                        name=self._name(f"{name}/weight_clip"))
        meta = {"mpqc.layer": p.layer, "mpqc.bits": json.dumps(bits if len(set(bits)) > 1 else bits[0])}
        y = tape.op("DequantizeLinear", [x, s], attributes=dq_attrs, name=self._name(f"{name}/weight_dq"),
                    metadata_props=meta)
        y.name = f"{name}.weight_dq"
        y.dtype, y.shape = ir.DataType.FLOAT, ir.Shape(codes.shape)
        self._splice_weight(marker, y, tape, transpose, user, p.layer)
        widths = [int(b) for b in bits] if len(set(bits)) > 1 else int(bits[0])
        self.layers.setdefault(p.layer, {}).update(
            {"w_bits": widths, "w_container": container, "w_scale": "per-block" if block else
             f"per-channel (axis {axis})", "weight_op": op_type})

    def _weight_container(self, op_type: str, bits: int, weight_only: bool, shape, axis: int,
                          user: ir.Node | None) -> tuple[str, int]:
        """The narrowest container the profile's runtime handles well, and a block size (0: per channel)."""
        gemm = op_type in _GEMM
        if self.profile == Profile.ORT:
            if bits <= 2 and self.opset >= 25 and op_type == "MatMul" and weight_only:
                return "int2", 0  # MatMulNBits 2-bit; never into a Conv (formats.md §2.2 int2 bug)
            if bits <= 4 and ((gemm and weight_only) or op_type == "Gather"):
                return "int4", 0  # MatMulNBits / smaller tables; int4 convs run unfused, so they stay int8
            return "int8", 0
        if self.profile == Profile.TRT and bits <= 4 and gemm and weight_only and len(shape) == 2:
            k_axis = 1 - axis
            if op_type == "Gemm" and user is not None:
                tb = user.attributes.get("transB")
                k_axis = 1 if (tb is not None and tb.as_int()) else 0
                if k_axis == axis:
                    return "int8", 0
            k = shape[k_axis]
            block = next((b for b in (128, 64, 32, 16) if k % b == 0), 0)
            if block and shape[-1] % 2 == 0:
                return "int4", block
            self.notes.append(f"weight of {op_type} with K={k}: no INT4 block size divides K; kept in int8")
        return "int8", 0

    def _splice_weight(self, marker: ir.Node, y: ir.Value, tape, transpose: ir.Node | None, user: ir.Node | None,
                       layer: str) -> None:
        """Put the dequantized weight ``y`` (built on ``tape``) where the weight marker was; a transpose between
        the weight and its user is folded into the stored codes, so ``y`` replaces the transpose's output."""
        if transpose is not None:
            self._replace(marker, marker.inputs[0], [])  # marker out; the transpose is folded into the codes
            self.graph.insert_before(transpose, list(tape.nodes))
            out = transpose.outputs[0]
            out.replace_all_uses_with(y, replace_graph_outputs=out.is_graph_output())
            self.graph.remove(transpose, safe=True)
        else:
            self._replace(marker, y, list(tape.nodes))
        if user is not None:
            self.compute[user] = layer

    def _fp8(self, marker: ir.Node, p: _Fp8Point) -> None:
        f8 = ir.DataType.FLOAT8E4M3FN
        tape = ir.tape.Tape()
        if p.weight is not None:  # weight: stored codes + per-channel DequantizeLinear
            codes = p.quantizer.codes(p.weight).view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            scale = p.quantizer.scale.float().numpy()
            transpose, user = self._consumer(marker.outputs[0])
            axis = 0
            if transpose is not None:
                codes, axis = np.ascontiguousarray(codes.T), 1
            w = self._init(f"{p.name}.weight_fp8", codes, f8)
            s = self._init(f"{p.name}.weight_scale", scale)
            meta = {"mpqc.layer": p.name, "mpqc.format": "fp8"}
            y = tape.op("DequantizeLinear", [w, s], attributes={"axis": axis},
                        name=self._name(f"{p.name}/weight_dq"), metadata_props=meta)
            y.dtype, y.shape = ir.DataType.FLOAT, ir.Shape(codes.shape)
            self._splice_weight(marker, y, tape, transpose, user, p.name)
            self.layers.setdefault(p.name, {}).update({"w_format": "fp8", "w_container": "float8e4m3fn",
                                                       "w_scale": f"per-channel (axis {axis})"})
            return
        s = self._init(f"{p.key}.scale", p.quantizer.scale.float().numpy())
        z = self._init(f"{p.key}.zero_point", np.array(0, dtype=ml_dtypes.float8_e4m3fn), f8)
        meta = {"mpqc.tensor": p.name, "mpqc.format": "fp8"}
        q = tape.op("QuantizeLinear", [marker.inputs[0], s, z], name=self._name(f"{p.name}/act_q"),
                    metadata_props=meta)
        q.dtype = f8
        y = tape.op("DequantizeLinear", [q, s, z], name=self._name(f"{p.name}/act_dq"), metadata_props=meta)
        y.dtype, y.shape = ir.DataType.FLOAT, marker.outputs[0].shape
        self._replace(marker, y, list(tape.nodes))
        self.layers.setdefault(f"tensor:{p.name}", {}).update({"a_format": "fp8", "a_container": "float8e4m3fn"})

    def _bias(self, marker: ir.Node, p: _BiasPoint) -> None:
        b = marker.inputs[0].const_value
        if b is None:
            self._replace(marker, marker.inputs[0], [])
            return
        codes = p.quantizer.codes(torch.from_numpy(np.array(b.numpy()))).numpy()
        scale = p.quantizer.scale().numpy().astype(np.float32)
        name = p.layer
        q = self._init(f"{name}.bias_q", codes.astype(np.int32))
        s = self._init(f"{name}.bias_scale", scale)
        tape = ir.tape.Tape()
        y = tape.op("DequantizeLinear", [q, s], attributes={"axis": 0}, name=self._name(f"{name}/bias_dq"))
        y.dtype, y.shape = ir.DataType.FLOAT, ir.Shape(codes.shape)
        self._replace(marker, y, list(tape.nodes))

    # -- activations -------------------------------------------------------------------------------------
    def _act(self, marker: ir.Node, p: _ActPoint) -> None:
        q = p.quantizer
        bits, signed = int(q.bits), bool(q.signed)
        s = np.array(float(q.scale.detach().abs().clamp_min(1e-12)), dtype=np.float32)
        qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if self.profile == Profile.ORT:
            # uint8 throughout, signed codes shifted by 128: onnxruntime fuses Q -> Clip(uint8) -> DQ on both
            # sides of a conv, but neither Q -> Clip(int8) -> DQ nor a float Clip after a conv (formats.md §2.2)
            container, zp = "uint8", (0 if not signed else 128)
        elif self.profile == Profile.TRT or signed:
            container, zp = "int8", 0
        else:
            container, zp = "uint8", 0
        if self.profile == Profile.TRT and not signed and bits > 7:
            raise AssertionError("8-bit unsigned activations are narrowed to 7 bits in the TRT deploy graph")
        dtype, npdt = _INT[container][:2]
        base = p.tensor
        scale = self._init(f"{p.key}.scale", s)
        zero = self._init(f"{p.key}.zero_point", np.array(zp, dtype=npdt), dtype)
        tape = ir.tape.Tape()
        x = marker.inputs[0]
        full = (qmin + zp, qmax + zp) == (_INT[container][2], _INT[container][3])
        integer_clip = self.profile in (Profile.QCDQ, Profile.ORT)
        meta = {"mpqc.tensor": p.tensor, "mpqc.bits": str(bits), "mpqc.signed": str(signed).lower(),
                "mpqc.point": p.key}  # the reference's quantizer (export/localize.py compares codes by it)
        if not full and not integer_clip:
            # float Clip before Q (C-QDQ): identical to QCDQ, and TensorRT's Clip takes floats (formats.md §3.3)
            lo = self._init(f"{p.key}.clip_min", np.array(qmin, np.float32) * s)
            hi = self._init(f"{p.key}.clip_max", np.array(qmax, np.float32) * s)
            x = tape.op("Clip", [x, lo, hi], name=self._name(f"{base}/act_clip"), metadata_props=meta)
        y = tape.op("QuantizeLinear", [x, scale, zero], name=self._name(f"{base}/act_q"), metadata_props=meta)
        y.dtype = dtype
        if not full and integer_clip:
            lo = self._init(f"{p.key}.qmin", np.array(qmin + zp, dtype=npdt), dtype)
            hi = self._init(f"{p.key}.qmax", np.array(qmax + zp, dtype=npdt), dtype)
            y = tape.op("Clip", [y, lo, hi], name=self._name(f"{base}/act_qclip"), metadata_props=meta)
            y.dtype = dtype
        out = tape.op("DequantizeLinear", [y, scale, zero], name=self._name(f"{base}/act_dq"), metadata_props=meta)
        out.dtype, out.shape = ir.DataType.FLOAT, marker.outputs[0].shape
        self._replace(marker, out, list(tape.nodes))
        self.layers.setdefault(f"tensor:{p.tensor}", {}).update(
            {"a_bits": bits, "signed": signed, "a_container": container})


# ---------------------------------------------------------------------------------------------------------
# the result and the entry point
@dataclass
class ExportedModel:
    """A QDQ ONNX model with what produced it.

    ``reference`` is the deploy graph in torch (the fake-quant model the parity check compares with);
    ``float_model`` is the same graph exported without quantization (fp32, BN folded) for speed comparisons.
    """

    model: onnx.ModelProto
    float_model: onnx.ModelProto
    reference: torch.fx.GraphModule
    profile: Profile
    layers: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save(self, path: str) -> None:
        """Write the QDQ model atomically (temp file, then rename)."""
        save_model(self.model, path)


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Serialize ``model`` to ``path`` atomically; a kill never leaves half a file."""
    from mpqc.atomic import atomic_write_bytes

    atomic_write_bytes(str(path), model.SerializeToString())


def export_qdq(qm: QuantizedModel, profile: Profile | str = Profile.ORT, *, calib: Iterable | None = None,
               formats: Mapping[str, str] | None = None, example_inputs: tuple | None = None,
               opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, check_trt: bool = True) -> ExportedModel:
    """Export a calibrated ``QuantizedModel`` as QDQ ONNX for ``profile`` (see the module docstring).

    Args:
        qm: the model at its plan's precision, calibrated (or with a fine-tuned state loaded).
        profile: ``ort``, ``trt`` or ``qcdq``.
        calib: batches (tensors or (x, y) pairs) to calibrate the residual-add quantizers the profile adds.
        formats: per-layer number format from the plan: ``int`` (default), ``fp8`` (E4M3FN Q/DQ, per-channel
            weights), ``bf16``/``fp16`` (left float: the runtime picks the half type).
        example_inputs: inputs for ``torch.onnx.export``; default: zeros/randn shaped like the graph's inputs.
        opset: ONNX opset (≥ 21; ≥ 25 lets onnxruntime weight-only matmuls use int2).
        dynamic_batch: a symbolic batch dimension (export takes about twice as long); else batch 1.
        check_trt: run the TensorRT rule validator on ``trt`` exports and raise on violations.

    Returns:
        The exported model, its torch reference, the fp32 twin, a per-layer summary and notes.
    """
    profile = Profile(profile)
    if opset < DEFAULT_OPSET:
        raise UserError(f"--opset {opset}: QDQ export needs opset >= {DEFAULT_OPSET} (int4 and blocked Q/DQ)")
    for layer, fmt in (formats or {}).items():
        if fmt not in FORMATS:
            raise UserError(f"layer {layer}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        if fmt == "fp8" and profile == Profile.QCDQ:
            raise UserError(f"layer {layer}: the qcdq profile carries integers only; export fp8 with --profile trt")
    deploy = _deploy_graph(qm, profile, calib, formats)
    marked, weights = _marker_graph(deploy.gm)
    example = example_inputs if example_inputs is not None else \
        example_inputs_of(deploy.gm, batch=2 if dynamic_batch else 1)  # export specialises a batch of 1
    proto = _torch_export(marked, example, opset, dynamic_batch)

    points = _points(qm, deploy.gm, weights)
    model = ir.from_proto(proto)
    ins = _Inserter(model, points, profile, opset)
    ins.run()
    ins.tag_layers({op.attrs["node"]: op.name for op in qm.graph_ir.layers() if "node" in op.attrs})
    _finish(model, profile, ins.layers, deploy.notes + ins.notes)
    qdq = ir.to_proto(model)
    onnx.checker.check_model(qdq, full_check=True)

    fp32 = ir.from_proto(proto)
    _Inserter(fp32, {}, profile, opset).run()
    _finish(fp32, None, {}, [])
    result = ExportedModel(qdq, ir.to_proto(fp32), deploy.gm, profile, _layer_summary(qm, ins.layers),
                           deploy.notes + ins.notes)
    if profile == Profile.TRT and check_trt:
        from .trt_rules import assert_trt_compatible

        assert_trt_compatible(qdq)
    return result


def _points(qm: QuantizedModel, deploy: torch.fx.GraphModule, weights: dict[str, str]) -> dict:
    """Marker key -> what it quantizes, with the deploy graph's (possibly adjusted) quantizer."""
    points: dict = {}
    tensor_of: dict[str, str] = {}
    for t, keys in _tensor_keys(qm).items():
        for k in keys:
            tensor_of[f"aq.{k}"] = t
    layer_of = {}
    for op in qm.graph_ir.weighted_layers():
        wq = qm.weight_quantizer(op.name)
        if wq is not None:
            key = next(k for k, m in qm.wq.items() if m is wq)
            layer_of[f"wq.{key}"] = op
    for name, mod in deploy.named_modules():
        if isinstance(mod, WeightQuantizer) and name in layer_of:
            op = layer_of[name]
            fqn = weights.get(name, op.weight_fqn)
            w = deploy.get_parameter(fqn) if fqn in dict(deploy.named_parameters()) else deploy.get_buffer(fqn)
            weight_only = not any(q.enabled for q in (deploy.get_submodule(f"aq.{k}")
                                                      for k in qm.act_keys.get(op.name, [])))
            points[name] = _WeightPoint(name, op.name, mod, w, weight_only)
        elif isinstance(mod, ActQuantizer):
            points[name] = _ActPoint(name, tensor_of.get(name, name), mod)
        elif isinstance(mod, FP8WeightQuantizer):
            op = layer_of[name]
            fqn = weights.get(name, op.weight_fqn)
            w = deploy.get_parameter(fqn) if fqn in dict(deploy.named_parameters()) else deploy.get_buffer(fqn)
            points[name] = _Fp8Point(name, op.name, mod, w)
        elif isinstance(mod, FP8ActQuantizer):
            points[name] = _Fp8Point(name, tensor_of.get(name, name), mod, None)
        elif isinstance(mod, BiasQuantizer):
            op = layer_of.get(f"wq.{name[3:]}")
            points[name] = _BiasPoint(name, op.name if op is not None else name, mod)
    return points


def _finish(model: ir.Model, profile: Profile | None, layers: dict, notes: list[str]) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, TopologicalSortPass

    for p in (RemoveUnusedNodesPass(), TopologicalSortPass(), RemoveUnusedOpsetsPass()):
        p(model)
    model.opset_imports.pop(MARKER_DOMAIN, None)
    stray = [n.name for n in model.graph if n.domain == MARKER_DOMAIN]
    assert not stray, f"markers left in the graph: {stray[:3]}"
    from mpqc import __version__

    model.producer_name, model.producer_version = "mpqc", __version__
    if profile is not None:
        model.metadata_props["mpqc.profile"] = profile.value
        model.metadata_props["mpqc.layers"] = json.dumps(layers, sort_keys=True)
        if notes:
            model.metadata_props["mpqc.notes"] = json.dumps(notes)


def _layer_summary(qm: QuantizedModel, inserted: dict[str, dict]) -> dict[str, dict]:
    """Per IR layer: the kind and what was exported for its weight and inputs."""
    out: dict[str, dict] = {}
    keys = _tensor_keys(qm)
    for op in qm.graph_ir.layers():
        d = {"kind": op.kind.value, **inserted.get(op.name, {})}
        acts = [inserted.get(f"tensor:{t}") for t in op.act_inputs if keys.get(t)]
        if any(acts):
            d["inputs"] = {t: a for t, a in zip(op.act_inputs, acts) if a}
        out[op.name] = d
    return out


def quantization_step(model: onnx.ModelProto) -> float | None:
    """The scale of the DequantizeLinear that produces the first graph output, if it is quantized."""
    g = model.graph
    out = g.output[0].name
    inits = {i.name: i for i in g.initializer}
    for n in g.node:
        if out in n.output and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            s = onnx.numpy_helper.to_array(inits[n.input[1]])
            return float(s.max()) if s.size else None
    return None


def bits_summary(layers: Mapping[str, dict]) -> str:
    """One line: how many layers export at each weight container."""
    counts: dict[str, int] = {}
    for d in layers.values():
        c = d.get("w_container")
        if c:
            counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no quantized weights"


__all__ = ["DEFAULT_OPSET", "FORMATS", "BiasQuantizer", "ExportedModel", "FP8ActQuantizer", "FP8WeightQuantizer",
           "Profile", "apply_plan", "assignment_from_plan",
           "bits_summary", "example_inputs_of", "export_qdq", "quantization_step", "save_model"]
