"""The TensorRT engine path against a stand-in ``tensorrt`` module (TensorRT cannot be installed here).

The stand-in implements only the documented calls the builder makes (formats.md §3.5-3.6) and records them, so
the test checks the call sequence, the optimization profile, error reporting and the fallback analysis.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import onnx
import pytest
import torch

from mpqc.compiler.capture import capture
from mpqc.compiler.export import export_qdq
from mpqc.compiler.export.qdq import apply_plan
from mpqc.compiler.export.tensorrt_engine import (
    EngineLayer,
    build_engine,
    compare_with_plan,
    load_tensorrt,
    parse_engine_info,
    planned_precisions,
    tensorrt_available,
)
from mpqc.compiler.quantize import LayerQuant, QuantizedModel, RangeMethod
from mpqc.compiler.zoo import DigitsCNN
from mpqc.errors import UserError


@pytest.fixture(scope="module")
def trt_file() -> onnx.ModelProto:
    torch.manual_seed(0)
    cap = capture(DigitsCNN().eval(), (torch.randn(1, 1, 8, 8),), fold_bn=True)
    qm = QuantizedModel(cap, method=RangeMethod.MINMAX)
    apply_plan(qm, {op.name: LayerQuant(8, 7) for op in cap.graph.layers()} | {"fc": LayerQuant(4, None)})
    calib = [torch.randn(16, 1, 8, 8)]
    qm.calibrate(calib)
    return export_qdq(qm, "trt", calib=calib).model


def _engine_json(fallback: str) -> str:
    layers = []
    for name in ("conv1", "conv2", "conv3", "conv4"):
        fmt = "Row major linear FP32" if name == fallback else "Int8 NC32HW32"
        layers.append({"Name": f"{name} + node_relu", "LayerType": "CaskConvolution",
                       "Inputs": [{"Name": "x", "Format/Datatype": fmt}],
                       "Outputs": [{"Name": "y", "Format/Datatype": "Int8 NC32HW32"}], "TacticName": "sm90_xmma"})
    layers.append({"Name": "fc", "LayerType": "Gemm", "Inputs": [{"Format/Datatype": "Half"}], "Outputs": []})
    return json.dumps({"Layers": layers, "Bindings": ["x", "out"]})


def fake_trt(*, parse_ok: bool = True, fallback: str = "conv2"):
    """A minimal stand-in for the documented TensorRT Python API; ``calls`` records what was used."""
    calls: dict = {}

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            calls["logger"] = severity

    class Tensor:
        name, shape = "x", (-1, 1, 8, 8)

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

    class Parser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network, logger):
            calls["parser"] = True

        def parse(self, data: bytes) -> bool:
            calls["parsed_bytes"] = len(data)
            return parse_ok

        def get_error(self, i):
            return f"In node {i}: unsupported"

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["profile"] = (name, tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def add_optimization_profile(self, p):
            calls["profiles"] = calls.get("profiles", 0) + 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["verbosity"] = getattr(config, "profiling_verbosity", None)
            return b"serialized-engine"

    class Inspector:
        def get_engine_information(self, fmt):
            calls["info_format"] = fmt
            return _engine_json(fallback)

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls["engine"] = blob
            return Engine()

    mod = SimpleNamespace(
        __version__="11.0.0-standin", Logger=Logger, Builder=Builder, OnnxParser=Parser, Runtime=Runtime,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0), ProfilingVerbosity=SimpleNamespace(DETAILED="detailed"),
        LayerInformationFormat=SimpleNamespace(JSON="json"))
    return mod, calls


def test_missing_tensorrt_is_a_clear_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(UserError, match="TensorRT is not installed"):
        load_tensorrt()
    assert not tensorrt_available()


def test_build_engine_follows_the_documented_api_and_lists_silent_fallbacks(trt_file):
    trt, calls = fake_trt(fallback="conv2")
    blob, report = build_engine(trt_file, max_batch=8, workspace_mib=256, profile_runs=0, trt=trt)
    assert blob == b"serialized-engine"
    assert calls["flags"] == 1 << 1  # STRONGLY_TYPED (ignored by 11.x, required on 10.x)
    assert calls["workspace"] == 256 << 20 and calls["verbosity"] == "detailed" and calls["info_format"] == "json"
    assert calls["profile"] == ("x", (1, 1, 8, 8), (1, 1, 8, 8), (8, 1, 8, 8)) and calls["profiles"] == 1
    assert [(f.layer, f.planned, f.got) for f in report.fallbacks] == [("conv2", "int8", "fp32")]
    assert report.unmatched == [] and report.trt_version == "11.0.0-standin"
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["precision"] == "int8"


def test_parser_errors_are_reported(trt_file):
    trt, _ = fake_trt(parse_ok=False)
    with pytest.raises(UserError, match="In node 0: unsupported; In node 1"):
        build_engine(trt_file, profile_runs=0, trt=trt)


def test_planned_precisions_read_the_export(trt_file):
    planned = planned_precisions(trt_file)
    assert planned["conv1"] == ("conv1", "int8")
    assert planned["fc"][1] == "int4-weight-only"


def test_engine_info_parsing_and_matching_by_node_name():
    layers = parse_engine_info({"Layers": ["conv1 + relu", {"Name": "PWN(conv2 + add)", "LayerType": "x",
                                                            "Inputs": [{"Format/Datatype": "Half"}]}]})
    assert layers[0].precision == "?" and layers[1].precision == "fp16"
    fallbacks, unmatched = compare_with_plan(layers, {"conv2": ("conv2", "int8"), "conv9": ("conv9", "int8")})
    assert [f.engine_layer for f in fallbacks] == ["PWN(conv2 + add)"] and unmatched == ["conv9"]
    assert EngineLayer("l", "t", ["Int8 NC/32HW32"], []).precision == "int8"
