"""Per-layer latency of TensorRT engines (``mpqc profile --target tensorrt``).

Each distinct layer signature and candidate becomes a one-op ONNX model written for TensorRT's explicit
quantization (``profile_ort.build_layer_model(runtime="trt")``: signed zero-points only, float biases, fp8 Q/DQ,
block-32 int4 weight-only MatMul), which is parsed, built and timed with the documented Python API
(research/formats.md §3.5-3.6): ``Builder`` -> ``create_network`` (strongly typed where the flag exists) ->
``OnnxParser.parse`` -> ``build_serialized_network`` -> ``Runtime.deserialize_cuda_engine`` ->
``execute_async_v3`` between CUDA events. Float candidates run in fp16 (the model is cast, since a strongly
typed network runs the types it is given). The engine inspector's layer precisions go into the row note, so a
silent fallback (an "int8" layer that runs in fp16) shows up in the table.

TensorRT is optional: without it every entry point raises one ``UserError`` line saying how to get it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

import numpy as np

from mpqc.errors import UserError

from .latency import LatencyRow, LatencyTable, plan_measurements
from .profile_cuda import cuda_provenance, require_cuda, time_cuda
from .protocols import LayerLike, kind_name


def require_tensorrt():
    """The ``tensorrt`` module (and a CUDA device), or a ``UserError`` saying how to get them."""
    try:
        import tensorrt as trt  # noqa: TID251 - optional, import-guarded; profiling engines needs TensorRT itself
    except ImportError:
        raise UserError("TensorRT is not installed: `--target tensorrt` builds and times engines with the tensorrt "
                        "Python package (pip install 'mpqc[tensorrt]' on a machine with an NVIDIA GPU); use "
                        "--target cuda or --target ort-cpu meanwhile") from None
    require_cuda()
    return trt


def _to_fp16(model):
    """Cast a float one-op model to fp16 (initializers, inputs, outputs): a strongly typed network runs fp16."""
    from onnx import TensorProto, numpy_helper

    for i, t in enumerate(model.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                                                        t.name))
    for v in list(model.graph.input) + list(model.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def build_engine(trt, onnx_bytes: bytes, logger):
    """Parse and build one engine; ``NotImplementedError`` with TensorRT's first error when it refuses."""
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required on 10.x, implied on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise NotImplementedError(f"TensorRT cannot parse it: {errors[0][:200] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise NotImplementedError("TensorRT could not build an engine (see its log)")
    return trt.Runtime(logger).deserialize_cuda_engine(blob)


def engine_precisions(trt, engine) -> str:
    """A short summary of the built layers and their precisions, from the engine inspector."""
    try:
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except (AttributeError, RuntimeError, ValueError):
        return ""
    parts = []
    for layer in info.get("Layers", []):
        if isinstance(layer, dict):
            fmt = (layer.get("Inputs") or [{}])[0].get("Format/Datatype", "")
            parts.append(f"{layer.get('LayerType', '?')}[{fmt}]")
    return "; ".join(parts)[:300]


def time_engine(trt, engine, feeds: dict, repeats: int, warmup: int) -> tuple[float, float]:
    """Median and IQR (ms) of ``execute_async_v3`` with torch CUDA buffers bound to every I/O tensor."""
    torch = require_cuda()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
              trt.int32: torch.int32, trt.int8: torch.int8}
    ctx = engine.create_execution_context()
    keep = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = dtypes[engine.get_tensor_dtype(name)]
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = torch.as_tensor(feeds[name]).to("cuda", dtype)
        else:
            t = torch.empty(tuple(ctx.get_tensor_shape(name)), device="cuda", dtype=dtype)
        ctx.set_tensor_address(name, t.data_ptr())
        keep.append(t)
    stream = torch.cuda.current_stream()
    return time_cuda(lambda: ctx.execute_async_v3(stream.cuda_stream), repeats, warmup)


def profile_layers_trt(layers: Sequence[LayerLike], target: Any, *, repeats: int = 100, warmup: int = 20,
                       progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Build and time one engine per distinct layer signature and candidate precision of ``target``."""
    trt = require_tensorrt()
    from .profile_ort import build_layer_model

    prov = {**cuda_provenance(), "runtime": "tensorrt", "runtime_version": trt.__version__}
    logger = trt.Logger(trt.Logger.ERROR)
    table = LatencyTable(meta={"provenance": prov, "repeats": repeats, "warmup": warmup})
    for sig, layer, cand in plan_measurements(layers, target):
        base = dict(target=target.name, signature=sig, kind=kind_name(layer.kind), macs=int(layer.macs),
                    w_bits=cand.w_bits, a_bits=cand.a_bits, format=cand.format, provenance=prov, layer=layer.name)
        try:
            model, feeds, note = build_layer_model(layer, cand.w_bits, cand.a_bits, cand.format, act_signed=True,
                                                   runtime="trt")
            if cand.w_bits is None and cand.a_bits is None:
                model = _to_fp16(model)
                feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
                note = "fp16"
            engine = build_engine(trt, model.SerializeToString(), logger)
            med, iqr = time_engine(trt, engine, feeds, repeats, warmup)
            layers_info = engine_precisions(trt, engine)
            note = "; ".join(x for x in (note, layers_info) if x)
            table.add(LatencyRow(median_ms=med, spread_ms=iqr, repeats=repeats, note=note, **base))
        except NotImplementedError as e:
            table.add(LatencyRow(median_ms=math.nan, spread_ms=math.nan, repeats=0, status="unsupported",
                                 note=str(e), **base))
        if progress:
            progress(f"{layer.name} {cand.label}")
    return table
