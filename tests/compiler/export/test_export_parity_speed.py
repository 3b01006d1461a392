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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


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
