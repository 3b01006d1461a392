"""The TensorRT rule validator accepts ``trt`` exports and names the node of every hand-made violation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from mpqc.compiler.capture import capture
from mpqc.compiler.export import TrtRuleError, assert_trt_compatible, check_trt, export_qdq
from mpqc.compiler.export.qdq import apply_plan
from mpqc.compiler.quantize import LayerQuant, QuantizedModel, RangeMethod
from mpqc.compiler.zoo import DigitsCNN
from mpqc.errors import UserError


def _export(profile: str) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    cap = capture(model, (torch.randn(1, 1, 8, 8),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    plan = {op.name: LayerQuant(4, 6) for op in cap.graph.layers()}
    plan["conv3"] = LayerQuant(tuple(2 + c % 7 for c in range(32)), 8)
    apply_plan(qm, plan)
    calib = [torch.randn(16, 1, 8, 8)]
    qm.calibrate(calib)
    return export_qdq(qm, profile, calib=calib, check_trt=False).model


@pytest.fixture(scope="module")
def good() -> onnx.ModelProto:
    return _export("trt")


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def _mutate(good: onnx.ModelProto, fn) -> onnx.ModelProto:
    model = ir.from_proto(good)
    fn(model)
    return ir.to_proto(model)


def _rules(model) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for v in check_trt(model):
        out.setdefault(v.rule, set()).add(v.node)
    return out


def _set_init(model: ir.Model, value: ir.Value, array: np.ndarray, dtype=None) -> None:
    t = ir.Tensor(array, dtype=dtype, name=value.name) if dtype is not None else ir.tensor(array, name=value.name)
    value.const_value = t
    value.dtype = t.dtype
    value.shape = ir.Shape(array.shape)


def test_trt_export_is_accepted(good):
    assert check_trt(good) == []
    assert_trt_compatible(good)  # no exception


def test_asymmetric_zero_point_is_named(good):
    def fn(m):
        q = _node(m, "conv2/act_q") if any(n.name == "conv2/act_q" for n in m.graph) else next(
            n for n in m.graph if n.op_type == "QuantizeLinear")
        zp = ir.Value(name="bad_zp", type=ir.TensorType(ir.DataType.INT8), shape=ir.Shape([]),
                      const_value=ir.tensor(np.array(3, np.int8), name="bad_zp"))
        m.graph.register_initializer(zp)
        q.replace_input_with(2, zp)
        fn.node = q.name

    bad = _mutate(good, fn)
    assert fn.node in _rules(bad)["asymmetric-zero-point"]


def test_uint8_activations_are_named():
    ort_file = _export("ort")  # the onnxruntime layout: uint8 activations
    rules = _rules(ort_file)
    q = {n.name for n in ort_file.graph.node if n.op_type == "QuantizeLinear"}
    assert q and q <= rules["qdq-type"]
    assert "uint8" in str(next(v for v in check_trt(ort_file) if v.rule == "qdq-type" and v.node in q)).lower()


def test_per_channel_activation_scale_is_named(good):
    def fn(m):
        dq = next(n for n in m.graph if n.op_type == "DequantizeLinear" and n.name.endswith("act_dq")
                  and n.inputs[0].producer().op_type == "QuantizeLinear")
        q = dq.inputs[0].producer()
        channels = 16
        s = float(q.inputs[1].const_value.numpy())
        vec = ir.Value(name="vec_scale", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([channels]),
                       const_value=ir.tensor(np.full(channels, s, np.float32), name="vec_scale"))
        zp = ir.Value(name="vec_zp", type=ir.TensorType(ir.DataType.INT8), shape=ir.Shape([channels]),
                      const_value=ir.tensor(np.zeros(channels, np.int8), name="vec_zp"))
        m.graph.register_initializer(vec)
        m.graph.register_initializer(zp)
        for n in (q, dq):
            n.replace_input_with(1, vec)
            n.replace_input_with(2, zp)
            n.attributes["axis"] = ir.AttrInt64("axis", 1)
        fn.nodes = {q.name, dq.name}

    bad = _mutate(good, fn)
    assert fn.nodes <= _rules(bad)["per-channel-activation"]


def test_int4_weights_on_a_conv_are_named(good):
    def fn(m):
        dq = _node(m, "conv1/weight_dq")  # conv1 is 4-bit: its codes fit int4
        codes = dq.inputs[0].const_value.numpy()
        _set_init(m, dq.inputs[0], codes.astype(ml_dtypes.int4), ir.DataType.INT4)
        fn.node = dq.name

    bad = _mutate(good, fn)
    onnx.checker.check_model(bad, full_check=True)
    violations = [v for v in check_trt(bad) if v.rule == "int4-gemm-only"]
    assert violations and violations[0].node == fn.node and "Conv" in violations[0].message


def test_missing_qdq_on_a_residual_add_is_named(good):
    def fn(m):
        add = next(n for n in m.graph if n.op_type == "Add" and any(
            i.producer() is not None and i.producer().op_type == "DequantizeLinear" for i in n.inputs))
        dq_in = next(i for i in add.inputs if i.producer().op_type == "DequantizeLinear")
        q = dq_in.producer().inputs[0].producer()
        while q.op_type != "QuantizeLinear":
            q = q.inputs[0].producer()
        raw = q.inputs[0]
        raw = raw.producer().inputs[0] if raw.producer() is not None and raw.producer().op_type == "Clip" else raw
        add.replace_input_with(list(add.inputs).index(dq_in), raw)
        fn.node = add.name

    bad = _mutate(good, fn)
    violations = [v for v in check_trt(bad) if v.rule == "residual-add"]
    assert [v.node for v in violations] == [fn.node]


def test_weight_only_conv_and_float_weights_are_named(good):
    def fn(m):
        conv = _node(m, "conv2")
        v = conv.inputs[0]  # back through every Q/DQ/Clip (an 8-bit residual Q/DQ may sit before its own)
        while v.producer() is not None and v.producer().op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
            v = v.producer().inputs[0]
        conv.replace_input_with(0, v)
        conv4 = _node(m, "conv4")
        wdq = conv4.inputs[1].producer()
        codes, scale = wdq.inputs[0].const_value.numpy(), wdq.inputs[1].const_value.numpy()
        w = ir.Value(name="float_w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(codes.shape),
                     const_value=ir.tensor((codes * scale.reshape(-1, 1, 1, 1)).astype(np.float32), name="float_w"))
        m.graph.register_initializer(w)
        conv4.replace_input_with(1, w)

    rules = _rules(_mutate(good, fn))
    assert "conv2" in rules["weight-only-conv"]
    assert "conv4" in rules["float-weight"]


def test_integer_clip_between_q_and_dq_is_named():
    qcdq = _export("qcdq")
    clips = {n.name for n in qcdq.graph.node if n.op_type == "Clip" and n.name.endswith("act_qclip")}
    weight_clips = {n.name for n in qcdq.graph.node if n.op_type == "Clip" and n.name.endswith("weight_clip")}
    assert clips and weight_clips and clips | weight_clips <= _rules(qcdq)["integer-clip"]


def test_nonpositive_scale_is_named(good):
    def fn(m):
        q = next(n for n in m.graph if n.op_type == "QuantizeLinear")
        _set_init(m, q.inputs[1], np.array(-1.0, np.float32))
        fn.node = q.name

    rules = _rules(_mutate(good, fn))
    assert fn.node in rules["scale"]


def test_assert_raises_a_user_error_listing_violations():
    qcdq = _export("qcdq")
    with pytest.raises(TrtRuleError) as info:
        assert_trt_compatible(qcdq)
    assert isinstance(info.value, UserError)
    assert info.value.violations and "integer-clip" in str(info.value)
    assert "\n" not in str(info.value)  # the CLI prints one line


def test_trt_export_raises_on_violations_it_cannot_avoid():
    torch.manual_seed(0)
    cap = capture(DigitsCNN().eval(), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {"conv1": LayerQuant(4, None)})  # weight-only convolution: no TensorRT kernel for it
    with pytest.raises(TrtRuleError, match="weight-only-conv"):
        export_qdq(qm, "trt", calib=[torch.randn(8, 1, 8, 8)])


class _PostNormEncoder(torch.nn.Module):
    """nn.TransformerEncoderLayer (post-norm, fused attention, dropout before each residual add) on digits rows."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.enc = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.enc(self.proj(x.flatten(1, 2))).mean(1))


def test_a_post_norm_transformer_exports_within_the_trt_rules():
    """Two faults made every nn.TransformerEncoder model fail its trt export: the fused attention's ONNX form
    hid its operands behind a scale Mul and kept the softmax float (one operand of each product quantized), and
    the residual adds, reached through a dropout, got no quantizers."""
    from mpqc.compiler.residual import quantize_residuals_for, residual_adds

    torch.manual_seed(0)
    model = _PostNormEncoder().eval()
    x = torch.randn(16, 1, 8, 8)
    cap = capture(model, (x[:1],), fold_bn=True)
    layers = {op.name: op for op in cap.graph.layers()}
    products = [op for op in layers.values() if op.kind.value == "matmul"]
    assert len(products) == 2 and all(len(op.act_inputs) == 2 for op in products)  # q·kᵀ and softmax·v
    with torch.no_grad():
        assert torch.allclose(cap.gm(x), model(x), atol=1e-5)  # the explicit attention computes the same
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {name: LayerQuant(8, 8) for name in layers})
    assert len(list(residual_adds(qm.gm))) == 2  # both post-norm adds, each reached through a dropout
    quantize_residuals_for(qm, "trt")
    qm.calibrate([x])
    assert check_trt(export_qdq(qm, "trt", calib=[x], check_trt=False).model) == []


def test_per_channel_weight_scales_off_the_output_axis_are_named(good):
    """TensorRT quantizes weights per output channel: scales along a Conv weight's input channels (axis 1) are a
    model it cannot build, as an (in, out) weight exported with axis 0 was."""
    def fn(m):
        dq = _node(m, "conv4/weight_dq")  # 32 x 32 x 3 x 3: the 32 scales fit axis 1 as well
        assert dq.inputs[0].const_value.numpy().shape[:2] == (32, 32)
        dq.attributes["axis"] = ir.AttrInt64("axis", 1)
        fn.node = next(iter(dq.outputs[0].consumers())).name

    assert "weight-axis" not in _rules(good)
    bad = _mutate(good, fn)
    onnx.checker.check_model(bad, full_check=True)
    assert _rules(bad)["weight-axis"] == {fn.node}


class _DropoutResidual(torch.nn.Module):
    """A residual add that reads a layer through an nn.Dropout module and torchvision's stochastic depth."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.drop, self.head = torch.nn.Dropout(0.1), torch.nn.Linear(16, 10)

    def forward(self, x):
        import torchvision

        h = torch.relu(self.fc0(x))
        h = h + self.drop(self.fc1(h))
        h = h + torchvision.ops.stochastic_depth(self.fc2(h), 0.2, "row", self.training)
        return self.head(h)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_residual_adds_behind_inference_no_ops_are_quantized_on_both_capture_paths(method):
    """torch.fx kept nn.Dropout and stochastic depth as nodes between a layer and its residual add, so the add got no
    quantizers and every post-norm block (EfficientNet, ViT, Swin under fx) broke TensorRT's residual-add rule."""
    torch.manual_seed(0)
    model, x = _DropoutResidual().eval(), torch.randn(8, 16)
    cap = capture(model, (x,), fold_bn=True, method=method)
    assert not any("dropout" in op.target.lower() or "stochastic" in op.target.lower() for op in cap.graph.ops.values())
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {op.name: LayerQuant(8, 8) for op in cap.graph.layers()})
    qm.calibrate([x])
    assert check_trt(export_qdq(qm, "trt", calib=[x], check_trt=False).model) == []


def test_a_left_factor_weight_scaled_along_its_rows_meets_the_weight_axis_rule():
    """``W @ x`` (token mixing): W's rows are the outputs, so per-channel scales along axis 0 are right for it; the
    rule took every MatMul weight for the right factor and would have named it."""
    from tests.compiler.test_capture import _TokenMixer

    torch.manual_seed(0)
    cap = capture(_TokenMixer().eval(), (torch.randn(1, 8, 16),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {"tok": LayerQuant((4,) * 6 + (8,) * 6, 8), "head": LayerQuant(8, 8)})
    calib = [torch.randn(32, 8, 16)]
    qm.calibrate(calib)
    model = export_qdq(qm, "trt", calib=calib, check_trt=False).model
    dq = next(n for n in model.graph.node if n.name == "tok/weight_dq")
    (mm,) = [n for n in model.graph.node if dq.output[0] in n.input]
    assert mm.op_type == "MatMul" and mm.input[0] == dq.output[0] and check_trt(model) == []

