"""Build a TensorRT engine from a ``trt``-profile QDQ export and check that every layer ran at its planned precision.

Written against the documented Python API of TensorRT 10.x and 11.x (research/formats.md §3.5-3.6); TensorRT cannot
be installed on our machines, so this path is import-guarded and unit-tested with a stand-in module:

1. ``trt.Builder`` + ``create_network`` (the ``STRONGLY_TYPED`` flag on 10.x, where weak typing is deprecated;
   11.x networks are always strongly typed and ignore it), ``trt.OnnxParser`` (every parser error is reported).
2. A builder config with a workspace limit, ``ProfilingVerbosity.DETAILED`` (layer names and formats survive into
   the engine) and an optimization profile for a symbolic batch. No precision flags: with Q/DQ in a strongly
   typed network the graph alone decides precision (``BuilderFlag.INT8`` is gone in 11.x).
3. ``build_serialized_network``, then the engine inspector's JSON: each fused layer with its input formats.
4. Optionally a timed run with an ``IProfiler`` (per-layer milliseconds; needs CUDA tensors from torch).
5. Each planned layer (ONNX nodes carry the IR layer name) is matched to the engine layer containing it; a layer
   planned int8/fp8 whose engine layer reads float inputs is a *silent fallback*.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from mpqc.errors import UserError

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed (its wheels come from NVIDIA's package index and it needs an NVIDIA GPU); "
                "export with --format onnx --profile trt and build the engine where TensorRT runs, e.g. "
                "`trtexec --onnx=model.onnx --profilingVerbosity=detailed --exportLayerInfo=layers.json`")


def load_tensorrt() -> Any:
    """The ``tensorrt`` module, or a ``UserError`` saying how to get an engine without it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return trt


def tensorrt_available() -> bool:
    """True when ``import tensorrt`` works (a GPU is still needed to build)."""
    try:
        load_tensorrt()
    except UserError:
        return False
    return True


@dataclass
class EngineLayer:
    """One layer of the built engine: its (fused) name, type, input/output precisions and time."""

    name: str
    type: str
    inputs: list[str]
    outputs: list[str]
    tactic: str = ""
    ms: float | None = None

    @property
    def precision(self) -> str:
        """The compute precision read from the first input's format (int8, fp8, int4, fp16, fp32 or ?)."""
        return _precision(self.inputs[0]) if self.inputs else "?"


@dataclass
class Fallback:
    """A layer the plan quantized that the engine runs in another precision."""

    layer: str
    planned: str
    engine_layer: str
    got: str


@dataclass
class EngineReport:
    """What the build produced: per-layer precision and time, and the silent fallbacks."""

    trt_version: str
    layers: list[EngineLayer] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"trt_version": self.trt_version, "layers": [{**asdict(x), "precision": x.precision}
                                                             for x in self.layers],
                "fallbacks": [asdict(f) for f in self.fallbacks], "unmatched": self.unmatched}


def _precision(fmt: str) -> str:
    f = fmt.lower()
    for key, name in (("int8", "int8"), ("fp8", "fp8"), ("float8", "fp8"), ("int4", "int4"), ("half", "fp16"),
                      ("fp16", "fp16"), ("bf16", "bf16"), ("float", "fp32"), ("fp32", "fp32")):
        if key in f:
            return name
    return "?"


def planned_precisions(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """IR layer -> (ONNX node name, planned precision) from the export's ``mpqc.layer`` node tags."""
    out: dict[str, tuple[str, str]] = {}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        layer = meta.get("mpqc.layer")
        if layer is None or n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        srcs = [producers.get(i) for i in n.input[:2]]
        quant = [s is not None and s.op_type == "DequantizeLinear" for s in srcs]
        types = {_dq_type(model, s) for s in srcs if s is not None and s.op_type == "DequantizeLinear"}
        if all(quant):
            planned = "fp8" if "FLOAT8E4M3FN" in types else "int8"
        elif any(quant):
            planned = "int4-weight-only" if "INT4" in types else "int8-weight-only"
        else:
            planned = "float"
        out[layer] = (n.name, planned)
    return out


def _dq_type(model: onnx.ModelProto, dq: onnx.NodeProto) -> str:
    for i in model.graph.initializer:
        if i.name == dq.input[0]:
            return onnx.TensorProto.DataType.Name(i.data_type)
    return ""


def parse_engine_info(info: str | dict) -> list[EngineLayer]:
    """Engine layers from the inspector's JSON (``ProfilingVerbosity.DETAILED``; names only otherwise)."""
    data = json.loads(info) if isinstance(info, str) else info
    layers = []
    for entry in data.get("Layers", []):
        if isinstance(entry, str):
            layers.append(EngineLayer(entry, "?", [], []))
            continue
        fmt = lambda xs: [str(x.get("Format/Datatype", x.get("Datatype", ""))) for x in xs or []]  # noqa: E731
        layers.append(EngineLayer(str(entry.get("Name", "")), str(entry.get("LayerType", "?")),
                                  fmt(entry.get("Inputs")), fmt(entry.get("Outputs")),
                                  str(entry.get("TacticName", entry.get("Tactic", "")))))
    return layers


def compare_with_plan(layers: list[EngineLayer], planned: dict[str, tuple[str, str]]) -> tuple[list[Fallback],
                                                                                              list[str]]:
    """Silent fallbacks (planned int8/fp8, engine layer reads something else) and planned layers not found."""
    fallbacks, unmatched = [], []
    tokens = [(e, set(re.split(r"\s*\+\s*|[()\[\]{}]|\s+", e.name))) for e in layers]
    for layer, (node, want) in planned.items():
        hit = next((e for e, toks in tokens if node in toks or layer in toks), None)
        if hit is None:
            unmatched.append(layer)
            continue
        if want in ("int8", "fp8") and hit.precision not in (want, "?"):
            fallbacks.append(Fallback(layer, want, hit.name, hit.precision))
    return fallbacks, unmatched


def build_engine(model: onnx.ModelProto | bytes, *, max_batch: int = 1, workspace_mib: int = 1024,
                 profile_runs: int = 10, trt: Any = None) -> tuple[bytes, EngineReport]:
    """Build a serialized engine from a QDQ model and report per-layer precision, time and silent fallbacks.

    Args:
        model: a ``trt``-profile export (ModelProto or serialized bytes).
        max_batch: the largest batch of the optimization profile for a symbolic batch dimension.
        workspace_mib: the builder's workspace limit.
        profile_runs: timed runs with the per-layer profiler (0: skip; needs a CUDA device and torch.cuda).
        trt: the TensorRT module (default: ``import tensorrt``; tests pass a stand-in).

    Returns:
        The serialized engine and its report.
    """
    trt = trt or load_tensorrt()
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # noqa: BLE001 - TensorRT raises plain RuntimeError/TypeError without a GPU
        raise UserError(f"TensorRT could not start a builder ({str(e).strip()[:200] or type(e).__name__}); "
                        "building an engine needs an NVIDIA GPU and its driver") from None
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected the model: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _add_profile(trt, builder, network, config, max_batch)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise UserError("TensorRT could not build an engine from the model (see its log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    inspector = engine.create_engine_inspector()
    layers = parse_engine_info(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    if profile_runs:
        times = _profile(trt, engine, profile_runs)
        for e in layers:
            e.ms = times.get(e.name)
    fallbacks, unmatched = compare_with_plan(layers, planned_precisions(proto))
    report = EngineReport(str(getattr(trt, "__version__", "?")), layers, fallbacks, unmatched)
    for f in fallbacks:
        log.warning("silent fallback: %s planned %s runs %s in %s", f.layer, f.planned, f.got, f.engine_layer)
    return bytes(blob), report


def _add_profile(trt: Any, builder: Any, network: Any, config: Any, max_batch: int) -> None:
    """An optimization profile (batch 1..max_batch, optimum 1) when an input has symbolic dimensions."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs)
               if any(d < 0 for d in network.get_input(i).shape)]
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for t in dynamic:
        shape = list(t.shape)
        if any(d < 0 for d in shape[1:]):
            raise UserError(f"input {t.name} has symbolic dimensions besides the batch: {shape}; export with "
                            "a fixed input shape")
        profile.set_shape(t.name, [1, *shape[1:]], [1, *shape[1:]], [max_batch, *shape[1:]])
    config.add_optimization_profile(profile)


def _profile(trt: Any, engine: Any, runs: int) -> dict[str, float]:
    """Mean per-layer milliseconds over ``runs`` executions with random inputs on the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        log.warning("no CUDA device: skipping the per-layer profile")
        return {}

    class _Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.ms: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.ms[layer_name] = self.ms.get(layer_name, 0.0) + ms

    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
              trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    context = engine.create_execution_context()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = [d if d > 0 else 1 for d in engine.get_tensor_shape(name)]
            context.set_input_shape(name, shape)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = list(context.get_tensor_shape(name))
        t = torch.zeros(shape, dtype=dtypes.get(engine.get_tensor_dtype(name), torch.float32), device="cuda")
        if t.is_floating_point():
            t.normal_()
        buffers.append(t)
        context.set_tensor_address(name, t.data_ptr())
    profiler = _Profiler()
    context.profiler = profiler
    stream = torch.cuda.current_stream()
    for _ in range(runs):
        context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {k: v / runs for k, v in profiler.ms.items()}


__all__ = ["EngineLayer", "EngineReport", "Fallback", "INSTALL_HINT", "build_engine", "compare_with_plan",
           "load_tensorrt", "parse_engine_info", "planned_precisions", "tensorrt_available"]
