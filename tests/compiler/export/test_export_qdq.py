"""QDQ export: resnet18, mobilenet_v2 (depthwise) and a BERT-style encoder under plans mixing 2..8 bits.

Each export must pass ``onnx.checker`` with full checking, agree with its fake-quant model in onnxruntime (graph
optimisations on and off), store weights as integer codes that dequantize to the fake-quantized weights bit for
bit, use the profile's containers, and (``trt``) pass the TensorRT rule validator.

The CNNs are random-init, with BatchNorm statistics from one pass over random images, and their classifier
fitted by least squares to the *quantized* features of the very inputs the parity check uses, so that every input
has a clear decision: an untrained network's near-tied logits would make top-1 agreement measure ties, not the
export. Exactness is checked separately: with graph optimisations off, most outputs equal the reference exactly.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper

from mpqc.compiler.capture import capture
from mpqc.compiler.export import (
    ParityError,
    Profile,
    apply_plan,
    check_parity,
    check_trt,
    export_qdq,
    ort_session,
)
from mpqc.compiler.ir import OpKind
from mpqc.compiler.quantize import LayerQuant, QuantizedModel, RangeMethod
from mpqc.errors import UserError
from mpqc.kernels import fake_quant
from tests.models import TinyBert

HW = 24
HELD_OUT = 64
CYCLE_W = [8, 6, 4, 7, 5, 3, 8]
CYCLE_A = [8, 6, 7, 5, 8]


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, HW, HW, generator=torch.Generator().manual_seed(seed))


def mixed_plan(graph) -> dict[str, LayerQuant]:
    """Weights 3..8 bits per layer, every third layer per-channel mixed 2..8; activations 5..8 bits."""
    plan = {}
    for i, op in enumerate(graph.layers()):
        w = CYCLE_W[i % len(CYCLE_W)] if op.weight_shape else None
        if w is not None and i % 3 == 1 and op.out_channels > 1:
            w = tuple(2 + (c % 7) for c in range(op.out_channels))
        a = None if op.kind == OpKind.EMBEDDING else CYCLE_A[i % len(CYCLE_A)]
        plan[op.name] = LayerQuant(w, a)
    return plan


def _cnn(name: str, head: str, **kw):
    """(QuantizedModel, calibration batches, held-out inputs) for a torchvision CNN under the mixed plan."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **kw)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(_images(64, 1))
    model.eval()
    cap = capture(model, (torch.randn(1, 3, HW, HW),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    plan = mixed_plan(cap.graph)
    apply_plan(qm, plan)
    calib = [_images(32, 2), _images(32, 3)]
    qm.calibrate(calib)
    held = _images(HELD_OUT, 4)
    _fit_head(qm, head, held, plan[head])
    return qm, calib, held


@torch.no_grad()
def _fit_head(qm: QuantizedModel, head: str, x: torch.Tensor, lq: LayerQuant) -> None:
    """A least-squares classifier on the quantized features of ``x``: each input gets a clear class."""
    feats = []
    hook = qm.act_quantizers(head)[0].register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    qm(x)
    hook.remove()
    f = torch.cat([feats[0], torch.ones(len(feats[0]), 1)], 1).double()
    target = torch.nn.functional.one_hot(torch.arange(len(x)) % 10, 10).double() * 10 - 5
    sol = torch.linalg.lstsq(f, target, driver="gelsd").solution.float()
    op = qm.graph_ir.ops[head]
    qm.weight(head).copy_(sol[:-1].T)
    qm._param(op.bias_fqn).copy_(sol[-1])
    qm.set_precision(head, w_bits=lq.w_bits)


@pytest.fixture(scope="module")
def resnet():
    return _cnn("resnet18", "fc")


# torchvision's MobileNetV2 with fewer inverted-residual stages (t, c, n, s): depthwise convs, expansion and
# projection 1x1 convs, residual adds, ReLU6; a third of the full graph keeps the test fast
MOBILENET_STAGES = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 2, 2]]


@pytest.fixture(scope="module")
def mobilenet():
    return _cnn("mobilenet_v2", "classifier.1", width_mult=0.5, inverted_residual_setting=MOBILENET_STAGES)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = TinyBert().eval()
    cap = capture(model, model.example_inputs(), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    plan = mixed_plan(cap.graph)
    plan["layers.0.ff1"] = LayerQuant(4, None)  # weight-only 4 bit: int4 MatMulNBits (ort), INT4 blocked (trt)
    plan["layers.1.ff2"] = LayerQuant(3, None)
    plan["layers.1.attn/matmul_2"] = LayerQuant(None, 6)  # an attention matmul at 6 bits
    plan["tok"] = LayerQuant(4, None)  # a 4-bit embedding table: int4 Gather data in onnxruntime
    apply_plan(qm, plan)
    ids = lambda n, s: torch.randint(0, 100, (n, 12), generator=torch.Generator().manual_seed(s))  # noqa: E731
    calib = [ids(16, 1), ids(16, 2)]
    qm.calibrate(calib)
    return qm, calib, ids(HELD_OUT, 3)


_EXPORTS: dict = {}


def _export(request, fixture: str, profile: str, **kw):
    key = (fixture, profile, tuple(sorted(kw.items())))
    if key not in _EXPORTS:
        qm, calib, held = request.getfixturevalue(fixture)
        _EXPORTS[key] = (export_qdq(qm, profile, calib=calib, **kw), held)
    return _EXPORTS[key]


CASES = [("resnet", "ort", {}), ("resnet", "trt", {}), ("mobilenet", "ort", {"dynamic_batch": False}),
         ("bert", "ort", {}), ("bert", "trt", {}), ("bert", "qcdq", {})]


def _ids(case):
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_export_passes_full_checker_and_onnxruntime_parity(request, case):
    exported, held = _export(request, case[0], case[1], **case[2])
    onnx.checker.check_model(exported.model, full_check=True)
    report = check_parity(exported.model, exported.reference, held)
    assert report.passed and report.samples == len(held)
    assert {m.mode for m in report.modes} == {"no-opt", "opt"}
    for m in report.modes:
        assert m.top1_agreement >= 0.995 and np.isfinite(m.err_max_lsb)
    # exactness: without onnxruntime's fused kernels most outputs equal the fake-quant model's up to the float
    # rounding of the last (unquantized) layer; a float kernel summing in another order moves a few values
    # across a rounding boundary, and the network amplifies those
    assert next(m for m in report.modes if m.mode == "no-opt").exact_fraction >= 0.5
    assert not any(n.domain == "mpqc.export" for n in exported.model.graph.node)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "trt"], ids=_ids)
def test_trt_exports_pass_the_tensorrt_rules(request, case):
    exported, _ = _export(request, case[0], case[1], **case[2])
    assert check_trt(exported.model) == []
    for n in exported.model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert _init(exported.model, n.input[2]).dtype == np.int8
            assert not np.any(_init(exported.model, n.input[2]))


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _producer(model: onnx.ModelProto, value: str):
    return next((n for n in model.graph.node if value in n.output), None)


def test_weight_codes_dequantize_to_the_fake_quantized_weight_bit_for_bit(request, resnet):
    qm = resnet[0]
    exported, _ = _export(request, "resnet", "ort")
    mixed = [op for op in qm.graph_ir.weighted_layers() if qm.weight_quantizer(op.name).uniform_bits is None]
    assert mixed, "the plan has per-channel mixed bit-widths"
    for op in mixed[:3] + qm.graph_ir.weighted_layers()[:2]:
        dq = next(n for n in exported.model.graph.node if n.name == f"{op.name}/weight_dq")
        codes, scale = _init(exported.model, dq.input[0]), _init(exported.model, dq.input[1])
        assert codes.dtype == np.int8 and scale.shape == (codes.shape[0],)
        wq = qm.weight_quantizer(op.name)
        bits = wq.bits.numpy()
        per_row = codes.reshape(len(codes), -1)
        assert np.all(per_row.max(1) <= 2 ** (bits - 1) - 1) and np.all(per_row.min(1) >= -(2 ** (bits - 1)))
        deq = torch.from_numpy(codes.astype(np.float32)) * torch.tensor(scale).reshape(-1, *[1] * (codes.ndim - 1))
        want = fake_quant(qm.weight(op.name).detach(), wq.scale.detach().abs().clamp_min(1e-12), wq.bits, axis=0,
                          backend="torch")
        assert torch.equal(deq, want)


def test_ort_profile_fuses_every_conv_and_residual_add(request, tmp_path):
    exported, _ = _export(request, "resnet", "ort")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "r18_opt.onnx")
    ort.InferenceSession(exported.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 20 and ops["Conv"] == 0
    assert ops["QLinearAdd"] >= 7
    # activations are uint8; sub-8-bit ranges are an integer Clip between Q and DQ (fusable in onnxruntime)
    q = [n for n in exported.model.graph.node if n.op_type == "QuantizeLinear"]
    assert {_init(exported.model, n.input[2]).dtype for n in q} == {np.dtype(np.uint8)}
    assert any(_producer(exported.model, n.input[0]).op_type == "Clip" for n in exported.model.graph.node
               if n.op_type == "DequantizeLinear" and _producer(exported.model, n.input[0]) is not None)
    assert any("int32" in note for note in exported.notes)


def test_no_int2_or_int4_weights_feed_a_conv(request):
    for fixture in ("resnet", "mobilenet"):
        kw = {"dynamic_batch": False} if fixture == "mobilenet" else {}
        exported, _ = _export(request, fixture, "ort", **kw)
        for n in exported.model.graph.node:
            if n.op_type == "Conv":
                dq = _producer(exported.model, n.input[1])
                assert dq.op_type == "DequantizeLinear"
                assert _init(exported.model, dq.input[0]).dtype == np.int8


def test_mobilenet_depthwise_convs_are_exported_per_channel(request, mobilenet):
    exported, held = _export(request, "mobilenet", "ort", dynamic_batch=False)
    groups = [n for n in exported.model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(groups) == sum(n for _, _, n, _ in MOBILENET_STAGES)  # one depthwise conv per block
    sess = ort_session(exported.model)
    assert sess.get_inputs()[0].shape[0] == 1  # static batch 1 when asked


def test_bert_weight_only_linears_use_int4_and_matmuls_quantize_both_operands(request):
    ort_exp, _ = _export(request, "bert", "ort")
    trt_exp, _ = _export(request, "bert", "trt")
    for exp, blocked in ((ort_exp, False), (trt_exp, True)):
        dq = next(n for n in exp.model.graph.node if n.name == "layers.0.ff1/weight_dq")
        assert _init(exp.model, dq.input[0]).dtype.name == "int4"
        assert (any(a.name == "block_size" for a in dq.attribute)) == blocked
        user = next(n for n in exp.model.graph.node if dq.output[0] in n.input)
        assert user.op_type in ("MatMul", "Gemm")  # the weight transpose is folded into the codes
    att = next(n for n in ort_exp.model.graph.node if n.name == "layers.1.attn/matmul_2")
    assert [_producer(ort_exp.model, i).op_type for i in att.input] == ["DequantizeLinear"] * 2
    emb = next(n for n in ort_exp.model.graph.node if n.name == "tok/weight_dq")
    assert _init(ort_exp.model, emb.input[0]).dtype.name == "int4"
    emb = next(n for n in trt_exp.model.graph.node if n.name == "tok/weight_dq")
    assert _init(trt_exp.model, emb.input[0]).dtype.name == "int8"  # TensorRT: INT4 only for GEMM weights


def test_qcdq_profile_puts_an_integer_clip_between_q_and_dq(request):
    exported, _ = _export(request, "bert", "qcdq")
    clips = [n for n in exported.model.graph.node if n.op_type == "Clip"
             and _producer(exported.model, n.input[0]) is not None
             and _producer(exported.model, n.input[0]).op_type == "QuantizeLinear"]
    assert clips
    assert {_init(exported.model, c.input[1]).dtype for c in clips} <= {np.dtype(np.int8), np.dtype(np.uint8)}
    assert not any(n.op_type == "Clip" and _producer(exported.model, n.input[0]) is not None
                   and any(u.op_type == "QuantizeLinear" and n.output[0] in u.input for u in exported.model.graph.node)
                   for n in exported.model.graph.node)  # no float Clip before Q in this profile
    assert {p.key: p.value for p in exported.model.metadata_props}["mpqc.profile"] == "qcdq"


def test_trt_profile_carries_low_bits_in_int8_with_a_float_clip(request):
    exported, _ = _export(request, "resnet", "trt")
    q = [n for n in exported.model.graph.node if n.op_type == "QuantizeLinear"]
    clipped = [n for n in q if _producer(exported.model, n.input[0]) is not None
               and _producer(exported.model, n.input[0]).op_type == "Clip"]
    assert clipped and all(_init(exported.model, n.input[2]).dtype == np.int8 for n in q)
    for n in clipped:
        clip = _producer(exported.model, n.input[0])
        lo, hi, s = (_init(exported.model, clip.input[1]), _init(exported.model, clip.input[2]),
                     _init(exported.model, n.input[1]))
        qlo, qhi = round(float(lo / s)), round(float(hi / s))
        assert -128 <= qlo < qhi <= 127 and (qlo, qhi) != (-128, 127)  # a narrower grid than int8
    residual = [x for x in exported.notes if "residual add" in x]
    # the downsample branches of layer2..4, plus every block input that the next conv reads at fewer than 8
    # bits: the add gets its own 8-bit quantizer, which the narrower one then requantizes
    requant = {x.split("codes of ")[1].split(" ")[0] for x in exported.notes if "requantizes" in x}
    assert requant and len(residual) == 3 + len(requant)


def test_dynamic_batch_runs_any_batch(request):
    exported, held = _export(request, "resnet", "ort")
    sess = ort_session(exported.model)
    out = sess.run(None, {sess.get_inputs()[0].name: held[:3].numpy()})[0]
    assert out.shape == (3, 10)


def test_layers_are_named_and_tagged_by_the_ir(request, resnet):
    exported, _ = _export(request, "resnet", "trt")
    tagged = {p.value for n in exported.model.graph.node for p in n.metadata_props if p.key == "mpqc.layer"}
    assert {op.name for op in resnet[0].graph_ir.weighted_layers()} <= tagged
    assert any(n.name == "layer1.0.conv1" and n.op_type == "Conv" for n in exported.model.graph.node)
    assert exported.layers["layer1.0.conv1"]["w_container"] == "int8"


def test_a_corrupted_export_fails_the_parity_check(request):
    exported, held = _export(request, "bert", "ort")
    bad = onnx.ModelProto()
    bad.CopyFrom(exported.model)
    for init in bad.graph.initializer:
        if init.name.endswith("weight_scale") and "cls" in init.name:
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(arr[::-1].copy() * 3, init.name))
    with pytest.raises(ParityError, match="top-1 agreement"):
        check_parity(bad, exported.reference, held)


LOCALIZE_CASES = [("resnet", "ort", {}), ("resnet", "trt", {}), ("mobilenet", "ort", {"dynamic_batch": False})]


@pytest.mark.parametrize("case", LOCALIZE_CASES, ids=_ids)
def test_a_faithful_export_departs_nowhere(request, case):
    """Every activation point's integer codes match the reference's to within a rounding tie, in both modes,
    and every enabled activation quantizer of the reference is compared."""
    from mpqc.compiler.export.localize import first_departure, localize
    from mpqc.compiler.quantize import ActQuantizer

    exported, held = _export(request, case[0], case[1], **case[2])
    enabled = {name for name, m in exported.reference.named_modules() if isinstance(m, ActQuantizer) and m.enabled}
    for mode in ("no-opt", "opt"):
        diffs = localize(exported.model, exported.reference, held, mode=mode)
        assert {d.key for d in diffs} == enabled
        assert first_departure(diffs) is None, [d for d in diffs if d.max_codes > 1]


def _point_scale(model: onnx.ModelProto, key: str) -> str:
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
              and any(p.key == "mpqc.point" and p.value == key for p in n.metadata_props))
    return dq.input[1]


def _with_scale(model: onnx.ModelProto, key: str, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` with one activation point's scale (shared by its Q and DQ) multiplied by ``factor``."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    name = _point_scale(bad, key)
    init = next(i for i in bad.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))
    return bad


@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
def test_a_wrong_activation_scale_is_found_at_its_own_point(request, where):
    """A scale four times too large at one activation point: the codes depart there and nowhere before it."""
    from mpqc.compiler.export.localize import departs, first_departure, localize

    exported, held = _export(request, "resnet", "ort")
    keys = [d.key for d in localize(exported.model, exported.reference, held[:8], mode="no-opt")]
    key = keys[int(where * len(keys))]
    diffs = localize(_with_scale(exported.model, key, 4.0), exported.reference, held, mode="no-opt")
    first = first_departure(diffs)
    assert first is not None and first.key == key, first
    assert not any(departs(d) for d in diffs[: [d.key for d in diffs].index(key)])  # only ties before it


def test_a_failed_parity_check_says_where_the_codes_depart(request):
    exported, held = _export(request, "resnet", "ort")
    key = "aq.layer2_0_relu__relu__5"
    with pytest.raises(ParityError, match=r"its codes first depart at layer2\.0\.relu/relu__5") as e:
        check_parity(_with_scale(exported.model, key, 50.0), exported.reference, held)
    report = e.value.report
    assert report.localized["first"] == key and report.localized["mode"] in ("no-opt", "opt")
    assert "the activation codes first depart at layer2.0.relu/relu__5" in report.summary()


def test_fp8_and_half_layers_where_the_plan_says(bert):
    qm, calib, held = bert
    formats = {"layers.0.ff2": "fp8", "layers.1.attn.o": "fp8", "cls": "bf16"}
    exported = export_qdq(qm, "trt", calib=calib, formats=formats)
    assert check_trt(exported.model) == []
    dq = next(n for n in exported.model.graph.node if n.name == "layers.0.ff2/weight_dq")
    assert _init(exported.model, dq.input[0]).dtype.name == "float8_e4m3fn"
    assert not any(n.name == "cls/weight_dq" for n in exported.model.graph.node)  # bf16: left float
    assert qm.weight_quantizer("cls").enabled  # the caller's model is not changed
    assert check_parity(exported.model, exported.reference, held).passed
    with pytest.raises(UserError, match="qcdq"):
        export_qdq(qm, "qcdq", calib=calib, formats={"cls": "fp8"})


def test_float8_weights_turn_the_qdq_fusions_off_on_the_releases_that_reject_them(bert, monkeypatch):
    """onnxruntime 1.30-1.31 fuse an fp8 weight's DequantizeLinear -> MatMul into MatMulIntegerToFloat and then
    refuse the graph; the check turns those fusions off there, and only for files with float8 weights."""
    from mpqc.compiler.export import parity

    qm, calib, held = bert
    fp8 = export_qdq(qm, "trt", calib=calib, formats={"layers.0.ff2": "fp8"}).model
    int8 = export_qdq(qm, "trt", calib=calib).model
    monkeypatch.setattr(parity, "_ort_version", lambda: (1, 30))
    assert parity.opt_disabled(fp8) == ("WeightBiasQuantization", "QDQSelectorActionTransformer")
    assert parity.opt_disabled(int8) == ("WeightBiasQuantization",)
    monkeypatch.setattr(parity, "_ort_version", lambda: (1, 32))
    assert parity.opt_disabled(fp8) == ("WeightBiasQuantization",)


def test_profiles_are_an_enum():
    assert Profile("trt") is Profile.TRT
    with pytest.raises(ValueError):
        Profile("tensorrt")


class _HandWrittenLinear(torch.nn.Module):
    """``x @ W + b`` with W stored (in, out), as hand-written models and JAX ports spell a dense layer."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(16, 32) / 4)
        self.b = torch.nn.Parameter(torch.randn(32))
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(x @ self.W + self.b))


@pytest.mark.parametrize("profile", ["ort", "trt"])
def test_a_weight_stored_in_out_exports_per_output_channel_with_its_bias(profile):
    """The product gets one scale (and here one bit-width) per output channel along the DQ axis its Gemm reads as
    N, and the bias added after it joins the layer, on the integer accumulator grid where onnxruntime fuses."""
    torch.manual_seed(0)
    cap = capture(_HandWrittenLinear().eval(), (torch.randn(4, 16),), fold_bn=True)
    op = cap.graph.layer("W")
    assert op.bias_fqn == "b" and op.weight_shape == [32, 16]
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {"W": LayerQuant((3,) * 16 + (8,) * 16, 8), "head": LayerQuant(4, 8)})
    calib = [torch.randn(32, 16, generator=torch.Generator().manual_seed(1))]
    qm.calibrate(calib)
    exported = export_qdq(qm, profile, calib=calib)
    report = check_parity(exported.model, exported.reference, torch.randn(64, 16))
    assert report.passed and all(m.top1_agreement == 1.0 for m in report.modes)
    dq = next(n for n in exported.model.graph.node if n.name == "W/weight_dq")
    codes, scale = _init(exported.model, dq.input[0]), _init(exported.model, dq.input[1])
    gemm = next(n for n in exported.model.graph.node if dq.output[0] in n.input)
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    assert gemm.op_type == "Gemm" and codes.shape[axis] == 32 == scale.shape[0] and axis == (0 if trans_b else 1)
    rows = np.moveaxis(codes, axis, 0)
    assert rows[:16].max() <= 3 and rows[:16].min() >= -4 and rows[16:].max() > 3  # 3-bit channels are 3-bit
    assert len(gemm.input) == 3  # the bias is the Gemm's C, not a float Add after it
    if profile == "trt":
        assert check_trt(exported.model) == []


class _Decoder(torch.nn.Module):
    """A conv, an upsampling ConvTranspose2d, a grouped one (stays float) and a 1x1 head: a segmentation decoder."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.up_g = torch.nn.ConvTranspose2d(6, 6, 2, stride=2, groups=2)
        self.head = torch.nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up_g(torch.relu(self.up(torch.relu(self.enc(x)))))))


@pytest.mark.parametrize("profile", ["ort", "trt"])
def test_a_transposed_conv_is_quantized_per_output_channel_and_exports_along_axis_1(profile):
    """ConvTranspose2d stayed float (its weight (C_in, C_out, k, k) has no output-channel axis 0). Ungrouped, it is
    now a quantized layer with exact MACs, per-output-channel widths, and a DequantizeLinear along axis 1 straight
    into the ONNX ConvTranspose (no Transpose left between), where TensorRT takes per-channel deconv weights."""
    torch.manual_seed(0)
    model = _Decoder().eval()
    cap = capture(model, (torch.randn(1, 3, 8, 8),), fold_bn=True)
    up = cap.graph.layer("up")
    assert up.kind == OpKind.CONV and up.attrs["transposed"] and up.weight_shape == [6, 8, 3, 3]
    assert up.macs == 8 * 8 * 8 * 6 * 9 and up.out_channels == 6  # every input element scatters C_out·k² products
    assert [v["op"] for v in cap.graph.meta["unquantized"].values()] == ["conv_transpose2d"]  # the grouped one
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {"enc": LayerQuant(8, 8), "up": LayerQuant((3, 3, 3, 8, 8, 8), 8), "head": LayerQuant(8, 8)})
    calib = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))]
    qm.calibrate(calib)
    exported = export_qdq(qm, profile, calib=calib)
    report = check_parity(exported.model, exported.reference, torch.randn(64, 3, 8, 8))
    assert report.passed and next(m for m in report.modes if m.mode == "no-opt").exact_fraction == 1.0
    dq = next(n for n in exported.model.graph.node if n.name == "up/weight_dq")
    (user,) = [n for n in exported.model.graph.node if dq.output[0] in n.input]
    codes, scale = _init(exported.model, dq.input[0]), _init(exported.model, dq.input[1])
    assert user.op_type == "ConvTranspose" and codes.shape == (8, 6, 3, 3) and scale.shape == (6,)
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert np.abs(codes[:, :3]).max() <= 4 and np.abs(codes[:, 3:]).max() > 4  # 3-bit output channels are 3-bit
    if profile == "trt":
        assert check_trt(exported.model) == []
