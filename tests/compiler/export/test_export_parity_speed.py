"""Parity report details (LSB source, failure as a UserError) and the latency comparison."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mpqc.compiler.export import (
    ParityError,
    check_parity,
    compare_latency,
    quantization_step,
    speed_report,
)
from mpqc.errors import UserError


def _qdq_identity(scale: float) -> onnx.ModelProto:
    """x -> Q -> DQ -> y with an int8 step ``scale``: a model whose output is quantized."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # what the exporter writes; onnx's default follows onnx, which onnxruntime may lag
    return model


class _FakeQuant(torch.nn.Module):
    def __init__(self, scale: float, shift: float = 0.0):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return torch.clamp(torch.round(x / self.scale), -128, 127) * self.scale + self.shift


def test_the_output_step_comes_from_the_output_dequantize():
    model = _qdq_identity(0.05)
    assert quantization_step(model) == pytest.approx(0.05)
    x = torch.randn(64, 4) * 3
    report = check_parity(model, _FakeQuant(0.05), x)
    assert report.passed and report.lsb == pytest.approx(0.05)
    assert report.lsb_source == "scale of the output DequantizeLinear"
    assert all(m.err_max_lsb == 0 and m.top1_agreement == 1.0 for m in report.modes)
    assert report.to_dict()["passed"] is True and "LSB" in report.summary()
    assert not any("MatMulNBits" in n for n in report.notes)  # no sub-byte weights: nothing to run exactly


def test_the_matmulnbits_note_is_given_where_sub_byte_weights_are():
    from mpqc.compiler.export.parity import _has_sub_byte_weights

    model = _qdq_identity(0.05)
    assert not _has_sub_byte_weights(model)
    model.graph.initializer.append(helper.make_tensor("w4", TensorProto.INT4, [2], [1, -2]))
    assert _has_sub_byte_weights(model)


def test_a_disagreeing_reference_raises_a_parity_error():
    x = torch.randn(64, 4)
    with pytest.raises(ParityError) as info:
        check_parity(_qdq_identity(0.05), _FakeQuant(0.05, shift=torch.tensor([0, 0, 0, 5.0])), x)
    assert isinstance(info.value, UserError) and not info.value.report.passed
    report = check_parity(_qdq_identity(0.05), _FakeQuant(0.05, shift=torch.tensor([0, 0, 0, 5.0])), x,
                          raise_on_failure=False)
    assert report.modes[0].err_max_lsb == pytest.approx(100.0)


def test_latency_comparison_reports_both_models():
    model = _qdq_identity(0.05)
    lat = compare_latency({"a": model, "b": model.SerializeToString()}, threads=1, runs=20, warmup=2, rounds=2)
    assert set(lat) == {"a", "b"} and all(v.median_ms > 0 and v.runs == 20 for v in lat.values())
    rep = speed_report(model, model, threads=1, runs=10, warmup=1)
    assert rep["speedup"] > 0 and rep["machine"]
    assert compare_latency({"a": model}, threads=1, runs=4, warmup=1, rounds=2, clock="cpu")["a"].clock == "cpu"
    with pytest.raises(ValueError, match="threads=1"):
        compare_latency({"a": model}, threads=2, clock="cpu")


def _act_reference(bits: int = 8) -> torch.nn.Module:
    from mpqc.compiler.quantize import ActQuantizer

    aq = ActQuantizer(signed=True, bits=bits)
    with torch.no_grad():
        aq.scale.fill_(1.0)
    return torch.nn.Sequential(aq).eval()


def test_tie_agreement_measures_only_the_references_own_rounding_ties():
    """Rows whose two leading values sit exactly on a rounding tie flip under float32-level noise; rows a
    tenth of a step away never do."""
    from mpqc.compiler.export.parity import tie_agreement

    ref = _act_reference()
    k = torch.arange(64, dtype=torch.float32).remainder(20)[:, None]
    ties = torch.cat([k + 0.5, k + 0.5, torch.zeros(64, 2) - 30], 1)
    clear = torch.cat([k + 0.4, k + 0.1, torch.zeros(64, 2) - 30], 1)
    assert tie_agreement(ref, (ties,)) < 0.95
    assert tie_agreement(ref, (clear,)) == 1.0
    assert tie_agreement(torch.nn.Identity(), (ties,)) == 1.0  # no activation quantizer, nothing to jitter


def test_parity_threshold_drops_to_the_tie_noise_floor_and_no_further():
    from mpqc.compiler.export import ModeResult, ParityReport

    def report(top1: float, tie: float | None) -> ParityReport:
        return ParityReport(samples=256, lsb=1.0, lsb_source="given", min_top1=0.995,
                            modes=[ModeResult("opt", top1, 3.0, 0.5, 3.0, 0.5)], tie_agreement=tie)

    assert not report(0.9727, None).passed  # 7 of 256 answers changed: fails on its own
    assert report(0.9727, 0.9844).passed  # ... but the reference changes 4 of 256 under tie noise alone
    assert report(0.9727, 0.9844).threshold == pytest.approx(0.9844 - 2 * (0.9844 * 0.0156 / 256) ** 0.5 - 1 / 256)
    assert not report(0.90, 0.9844).passed  # far below the floor: an export bug, not ties
    assert report(0.99, 1.0).threshold == 0.995  # a tie-proof reference keeps the full bar ...
    assert report(0.99, 0.996).threshold == 0.995  # ... and so does one whose tie noise stays within it
    assert report(0.9727, 0.9844).to_dict()["threshold"] == pytest.approx(report(0.9727, 0.9844).threshold)
