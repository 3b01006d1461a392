"""Per-layer latency on onnxruntime's CPU execution provider (``mpqc profile --target ort-cpu``).

Each distinct layer signature becomes a one-op ONNX model per candidate precision, written the way a QDQ export
writes it, so ORT applies the fusions a deployed graph gets (research/formats.md §2.2):

- float: the op alone, fp32.
- W8A8: Q/DQ on the input (uint8 with a zero-point; int8 for a symmetric target), DQ of per-channel int8
  weights (int32 bias for convs) and Q/DQ on the output, so Conv -> QLinearConv and MatMul(+bias) -> QGemm or
  QLinearMatMul. Narrower W/A widths run in the same int8 container (ORT has no sub-8-bit kernels), noted so.
- W4/W8 weight-only linear: DQ of block-32 int4/int8 weights -> MatMul -> MatMulNBits, with the fusion's
  default accuracy level (the fast path a deployment gets; parity tests set it to 0 instead).

A single-op int8 time includes quantizing its input and dequantizing its output (what an isolated int8 layer
costs); the whole-model times show how much of that a fused graph saves. ``boundary`` rows time a
QuantizeLinear->DequantizeLinear pair per distinct input shape, the price of a precision boundary. By default
the CPU caches are flushed before each timed run (``CacheFlusher``), as a layer inside a network finds its
weights in DRAM rather than in cache; the whole model is timed the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import os
import platform
import time
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mpqc.errors import UserError

from .latency import LatencyRow, LatencyTable, plan_measurements
from .protocols import LayerLike, kind_name

log = logging.getLogger(__name__)
OPSET = 21
BLOCK = 32  # weight-only block size along K


def cpu_name() -> str:
    """The CPU model name (``lscpu``'s "Model name"), or what ``platform`` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ort_provenance(threads: int | None = None) -> dict:
    return {"device": f"{cpu_name()} ({os.cpu_count()} logical CPUs)", "runtime": "onnxruntime",
            "runtime_version": ort.__version__, "provider": "CPUExecutionProvider", "driver": "-",
            "onnx_version": onnx.__version__, "threads": threads or "ort default", "opset": OPSET,
            "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


class _Graph:
    """A one-op ONNX graph under construction."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def const(self, arr: np.ndarray) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def qdq(self, x: str, scale: float, zp: str) -> str:
        """Q -> DQ of ``x`` with a zero-point of kind ``zp``: u8 (128), s8 (0) or fp8 (e4m3, 0)."""
        s = self.const(np.array(scale, np.float32))
        z = self.const(_zero_point(zp))
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, s, z]), s, z])

    def dq_weight(self, w: np.ndarray, bits: int, axis: int, fmt: str) -> str:
        """DQ of per-channel quantized weights (int codes, or fp8 e4m3 values) along ``axis``."""
        q, s = quantize_per_channel(w, bits, axis, fmt)
        z = np.zeros(s.shape, _zero_point("fp8" if fmt == "fp8" else "s8").dtype)
        return self.op("DequantizeLinear", [self.const(q), self.const(s), self.const(z)], axis=axis)

    def model(self, inputs: list[tuple[str, int, list[int]]], out: str) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        g = helper.make_graph(self.nodes, "layer", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _zero_point(kind: str) -> np.ndarray:
    if kind == "fp8":
        import ml_dtypes

        return np.array(0, ml_dtypes.float8_e4m3fn)
    return np.array(0, np.int8) if kind == "s8" else np.array(128, np.uint8)


def quantize_per_channel(w: np.ndarray, bits: int, axis: int, fmt: str = "int") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel codes in an int8 container (or fp8 e4m3 values) and float scales along ``axis``."""
    qmax = 448.0 if fmt == "fp8" else 2 ** (bits - 1) - 1
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=red) / qmax + 1e-12).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    if fmt == "fp8":
        import ml_dtypes

        return np.clip(w / scale.reshape(shape), -qmax, qmax).astype(ml_dtypes.float8_e4m3fn), scale
    return np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8), scale


def _conv_geometry(layer: LayerLike) -> dict:
    """ONNX Conv attributes from the IR's stride/padding/dilation (torch defaults for omitted ones), or inferred
    from the shapes when the capture recorded none (the fx path)."""
    k = list(layer.weight_shape[2:])
    nd = len(k)
    attrs = getattr(layer, "attrs", None) or {}

    def vec(v, default):
        v = [default] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]
        return v * nd if len(v) == 1 else v

    dil = vec(attrs.get("dilation"), 1)
    if "stride" in attrs:
        stride, pad = vec(attrs["stride"], 1), attrs.get("padding", 0)
        if pad == "same":
            begin = [d * (kk - 1) // 2 for d, kk in zip(dil, k)]
            end = [d * (kk - 1) - b for d, kk, b in zip(dil, k, begin)]
        else:
            begin = end = vec(0 if pad == "valid" else pad, 0)
    else:
        stride, begin = [], []
        for i_, o_, kk, d in zip(layer.in_shapes[0][2:], layer.out_shape[2:], k, dil):
            s_, p_ = next(((s_, p_) for s_ in range(1, i_ + 1) for p_ in range(0, d * kk + 1)
                           if (i_ + 2 * p_ - d * (kk - 1) - 1) // s_ + 1 == o_), (1, 0))
            stride.append(s_)
            begin.append(p_)
        end = begin
    return {"strides": stride, "dilations": dil, "pads": list(begin) + list(end), "group": int(layer.groups)}


def _conv_transpose_geometry(layer: LayerLike) -> dict:
    """ONNX ConvTranspose attributes from the IR's stride/padding/output_padding/dilation (torch defaults)."""
    nd = len(layer.weight_shape) - 2
    attrs = getattr(layer, "attrs", None) or {}

    def vec(v, default):
        v = [default] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]
        return v * nd if len(v) == 1 else v

    pad = vec(attrs.get("padding"), 0)
    return {"strides": vec(attrs.get("stride"), 1), "dilations": vec(attrs.get("dilation"), 1), "pads": pad + pad,
            "output_padding": vec(attrs.get("output_padding"), 0), "group": 1}


def build_layer_model(layer: LayerLike, w_bits: int | None, a_bits: int | None, fmt: str = "int", *,
                      act_signed: bool = False, runtime: str = "ort",
                      seed: int = 0) -> tuple[onnx.ModelProto, dict, str]:
    """A one-op ONNX model of ``layer`` at a precision, its feeds, and a note ("" when nothing to say).

    ``runtime="trt"`` writes what TensorRT's parser accepts: signed zero-points only, float biases, fp8 Q/DQ.
    Raises ``NotImplementedError`` (with the reason) for precisions the runtime cannot run.
    """
    kind = kind_name(layer.kind)
    trt = runtime == "trt"
    if fmt not in (("int", "float", "fp8") if trt else ("int", "float")):
        raise NotImplementedError(f"{fmt} has no {'TensorRT' if trt else 'onnxruntime CPU'} kernels here")
    if any(b is not None and b not in range(2, 9) for b in (w_bits, a_bits)):
        raise NotImplementedError("only integer widths 2..8 and float are profiled on this runtime")
    rng = np.random.default_rng(seed)
    g = _Graph()
    note = "int8 container (no sub-8-bit kernels)" if (w_bits or 8) < 8 or (a_bits or 8) < 8 else ""
    zp = "fp8" if fmt == "fp8" else "s8" if act_signed or trt else "u8"
    has_bias = bool(getattr(layer, "bias_fqn", None))
    quant = a_bits is not None
    if kind == "conv" and (getattr(layer, "attrs", None) or {}).get("transposed"):
        # the IR stores the weight (C_out, C_in, k...); ONNX ConvTranspose reads (C_in, C_out, k...), scales on axis 1
        w = np.swapaxes(rng.standard_normal(layer.weight_shape) / math.sqrt(max(layer.fan_in, 1)), 0, 1)
        w = np.ascontiguousarray(w, dtype=np.float32)
        x_shape = list(layer.in_shapes[0])
        if w_bits is not None and not quant:
            raise NotImplementedError("weight-only convs run as DQ + float ConvTranspose (no fused kernel)")
        ins = [g.qdq("x", 0.02, zp), g.dq_weight(w, w_bits, 1, fmt)] if quant else ["x", g.const(w)]
        if has_bias:
            ins.append(g.const((rng.standard_normal(layer.weight_shape[0]) * 0.1).astype(np.float32)))
        y = g.op("ConvTranspose", ins, **_conv_transpose_geometry(layer))
        y = g.qdq(y, 0.05, zp) if quant else y
        return g.model([("x", TensorProto.FLOAT, x_shape)], y), {"x": rng.standard_normal(x_shape, np.float32)}, note
    if kind == "conv":
        w = (rng.standard_normal(layer.weight_shape) / math.sqrt(max(layer.fan_in, 1))).astype(np.float32)
        b = (rng.standard_normal(layer.weight_shape[0]) * 0.1).astype(np.float32)
        x_shape = list(layer.in_shapes[0])
        if w_bits is not None and not quant:
            raise NotImplementedError("weight-only convs run as DQ + float Conv (no fused kernel)")
        ins = [g.qdq("x", 0.02, zp), g.dq_weight(w, w_bits, 0, fmt)] if quant else ["x", g.const(w)]
        if has_bias and quant and not trt:  # int32 bias: what lets ORT fuse the bias into QLinearConv
            _, s = quantize_per_channel(w, w_bits, 0)
            bs = (0.02 * s).astype(np.float32)
            ins.append(g.op("DequantizeLinear", [g.const(np.round(b / bs).astype(np.int32)), g.const(bs),
                                                 g.const(np.zeros_like(bs, np.int32))], axis=0))
        elif has_bias:
            ins.append(g.const(b))
        y = g.op("Conv", ins, **_conv_geometry(layer))
        y = g.qdq(y, 0.05, zp) if quant else y
        return g.model([("x", TensorProto.FLOAT, x_shape)], y), {"x": rng.standard_normal(x_shape, np.float32)}, note
    if kind == "linear":
        n_out, k = layer.weight_shape[0], layer.weight_shape[-1]
        w = (rng.standard_normal((k, n_out)) / math.sqrt(k)).astype(np.float32)  # ONNX MatMul wants [K, N]
        x_shape = list(layer.in_shapes[0])
        if quant:
            y = g.op("MatMul", [g.qdq("x", 0.02, zp), g.dq_weight(w, w_bits, 1, fmt)])
        elif w_bits is not None:
            if w_bits not in (4, 8):
                raise NotImplementedError(f"{w_bits}-bit weight-only MatMul has no fused kernel at opset 21")
            y = g.op("MatMul", ["x", _blocked_weight(g, w, w_bits)])
            note = f"weight-only int{w_bits}, block {BLOCK}" + ("" if trt else " (MatMulNBits)")
        else:
            y = g.op("MatMul", ["x", g.const(w)])
        if has_bias:
            y = g.op("Add", [y, g.const((rng.standard_normal(n_out) * 0.1).astype(np.float32))])
        y = g.qdq(y, 0.05, zp) if quant else y
        return g.model([("x", TensorProto.FLOAT, x_shape)], y), {"x": rng.standard_normal(x_shape, np.float32)}, note
    if kind == "matmul":
        if len(layer.in_shapes) != 2 or (w_bits is not None and not quant):
            raise NotImplementedError("only two-operand matmuls (not fused attention) are profiled per layer")
        a_shape, b_shape = (list(s) for s in layer.in_shapes)
        a, b = (g.qdq("a", 0.02, zp), g.qdq("b", 0.02, zp)) if quant else ("a", "b")
        y = g.op("MatMul", [a, b])
        y = g.qdq(y, 0.05, zp) if quant else y
        feeds = {"a": rng.standard_normal(a_shape, np.float32), "b": rng.standard_normal(b_shape, np.float32)}
        return g.model([("a", TensorProto.FLOAT, a_shape), ("b", TensorProto.FLOAT, b_shape)], y), feeds, note
    if kind == "embedding":
        if a_bits is not None:
            raise NotImplementedError("an embedding reads no quantized activations")
        table = rng.standard_normal(layer.weight_shape).astype(np.float32)
        wt = g.const(table) if w_bits is None else g.dq_weight(table, w_bits, 0, "int")
        note = note if w_bits is None else f"DQ(int{w_bits}, per row) -> Gather"
        idx_shape = list(layer.in_shapes[0]) if layer.in_shapes else [1, 1]
        y = g.op("Gather", [wt, "i"], axis=0)
        idx = rng.integers(0, layer.weight_shape[0], idx_shape).astype(np.int64)
        return g.model([("i", TensorProto.INT64, idx_shape)], y), {"i": idx}, note
    raise NotImplementedError(f"op kind {kind!r} is not profiled per layer")


def _blocked_weight(g: _Graph, w: np.ndarray, bits: int) -> str:
    """DQ of [K, N] weights quantized in blocks of ``BLOCK`` along K (what fuses into MatMulNBits)."""
    import ml_dtypes

    k, n = w.shape
    nb = -(-k // BLOCK)
    wp = np.pad(w, ((0, nb * BLOCK - k), (0, 0))).reshape(nb, BLOCK, n)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(wp).max(axis=1) / qmax + 1e-12).astype(np.float32)
    q = np.clip(np.round(wp / scale[:, None, :]), -qmax - 1, qmax).reshape(nb * BLOCK, n)[:k]
    q = q.astype(ml_dtypes.int4 if bits == 4 else np.int8)
    return g.op("DequantizeLinear", [g.const(q), g.const(scale)], axis=0, block_size=BLOCK)


def build_boundary_model(shape: Sequence[int], signed: bool = False) -> tuple[onnx.ModelProto, dict]:
    """QuantizeLinear -> DequantizeLinear on one activation tensor: the convert a precision boundary adds."""
    g = _Graph()
    y = g.qdq("x", 0.02, "s8" if signed else "u8")
    x = np.random.default_rng(0).standard_normal(list(shape), np.float32)
    return g.model([("x", TensorProto.FLOAT, list(shape))], y), {"x": x}


def make_session(model: onnx.ModelProto | str, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class CacheFlusher:
    """Evicts the CPU caches by writing a buffer larger than the last-level cache (64 MiB by default).

    A one-op model rerun back to back keeps its weights in cache, which a whole network (resnet18: 46 MB of
    fp32 weights against a 32 MiB L3) does not: timed warm, resnet18's fc takes 0.03 ms alone but 0.9 ms inside
    the fp32 model. Flushing before each timed run (outside the timed interval) is the default ("cold").
    """

    def __init__(self, mib: int = 64):
        self.buf = np.ones(mib * 2**20 // 8)

    def __call__(self) -> None:
        self.buf += 1.0


CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def time_session(sess: ort.InferenceSession, feeds: dict, repeats: int, warmup: int,
                 flush: Callable[[], None] | None = None, clock: str = "wall") -> tuple[float, float]:
    """Median and inter-quartile range, in ms, of ``repeats`` calls after ``warmup`` untimed ones.

    ``flush`` (e.g. a ``CacheFlusher``) runs before each timed call, outside the timed interval. ``clock="cpu"``
    reads the process CPU time instead of the wall clock: with one intra-op thread that is the latency without
    the time other processes held the CPU (a shared machine preempts a 20 ms run far more often than a 1 ms one).
    """
    now = CLOCKS[clock]
    for _ in range(warmup):
        sess.run(None, feeds)
    ts = np.empty(repeats)
    for i in range(repeats):
        if flush is not None:
            flush()
        t0 = now()
        sess.run(None, feeds)
        ts[i] = (now() - t0) / 1e6
    q1, med, q3 = np.percentile(ts, [25, 50, 75])
    return float(med), float(q3 - q1)


def profile_layers_ort(layers: Sequence[LayerLike], target: Any, *, repeats: int = 50, warmup: int = 10,
                       threads: int | None = None, boundary: bool = True, cache: str = "cold",
                       clock: str = "wall", progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Measure every distinct layer signature at every candidate precision of ``target``; one row each.

    ``cache="cold"`` flushes the CPU caches before each timed run (see ``CacheFlusher``); "warm" does not.
    ``clock`` is "wall" or "cpu" (see ``time_session``; "cpu" needs ``threads=1``).
    """
    flush = _flusher(cache, clock, threads)
    prov = {**ort_provenance(threads), "cache": cache, "clock": clock}
    table = LatencyTable(meta={"provenance": prov, "repeats": repeats, "warmup": warmup, "cache": cache,
                               "clock": clock})
    act_signed = bool(target.symmetric_acts)
    for sig, layer, cand in plan_measurements(layers, target):
        label = f"{layer.name} {cand.label}"
        base = dict(target=target.name, signature=sig, kind=kind_name(layer.kind), macs=int(layer.macs),
                    w_bits=cand.w_bits, a_bits=cand.a_bits, format=cand.format, provenance=prov, layer=layer.name)
        try:
            model, feeds, note = build_layer_model(layer, cand.w_bits, cand.a_bits, cand.format, act_signed=act_signed)
            med, iqr = time_session(make_session(model, threads), feeds, repeats, warmup, flush, clock)
            table.add(LatencyRow(median_ms=med, spread_ms=iqr, repeats=repeats, note=note, **base))
        except NotImplementedError as e:
            table.add(LatencyRow(median_ms=math.nan, spread_ms=math.nan, repeats=0, status="unsupported",
                                 note=str(e), **base))
        if progress:
            progress(label)
    if boundary:
        for shape in boundary_shapes(layers):
            model, feeds = build_boundary_model(shape, act_signed)
            med, iqr = time_session(make_session(model, threads), feeds, repeats, warmup, flush, clock)
            table.add(LatencyRow(target.name, f"boundary|in={'x'.join(map(str, shape))}", "boundary", 0, None, 8,
                                 "int", med, iqr, repeats, prov, numel=math.prod(shape[1:]) if len(shape) > 1 else
                                 math.prod(shape), note="QuantizeLinear->DequantizeLinear"))
            if progress:
                progress(f"boundary {shape}")
    return table


def _flusher(cache: str, clock: str, threads: int | None) -> CacheFlusher | None:
    if cache not in ("cold", "warm"):
        raise ValueError(f"cache must be 'cold' or 'warm', not {cache!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    if clock == "cpu" and threads != 1:
        raise UserError("--clock cpu measures latency only with one intra-op thread; add --threads 1")
    return CacheFlusher() if cache == "cold" else None


def boundary_shapes(layers: Sequence[LayerLike]) -> list[tuple[int, ...]]:
    """The distinct input shapes of the convs and linears (one boundary row each)."""
    return sorted({tuple(ly.in_shapes[0]) for ly in layers if kind_name(ly.kind) in ("conv", "linear")})


# -- whole model -----------------------------------------------------------------------------------------
def export_onnx(module, example_inputs: tuple, path: str) -> None:
    """fp32 ONNX via ``torch.onnx.export(dynamo=True, opset 21)``, weights inside the file."""
    import torch

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            torch.onnx.export(module.eval(), tuple(example_inputs), path, dynamo=True, opset_version=OPSET,
                              external_data=False)
        except Exception as e:  # noqa: BLE001 - the exporter fails in many ways; report it in one line
            raise UserError(f"cannot export the model to ONNX for whole-model timing ({str(e).splitlines()[0][:200]})"
                            "; pass --no-whole-model to profile layers only") from None


def quantize_int8_random(fp32_path: str, out_path: str, example_inputs: tuple, *, symmetric_acts: bool = False,
                         batches: int = 8) -> str:
    """Whole-model int8 QDQ with ``onnxruntime.quantization.quantize_static`` calibrated on random normal inputs.

    For timing only: random calibration gives meaningless accuracy, the graph (and so its speed) is the real
    one: per-channel int8 weights, uint8 activations (int8 when symmetric), MinMax ranges.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in onnx.load(fp32_path, load_external_data=False).graph.input]
    rng = np.random.default_rng(0)
    data = [{n: rng.standard_normal(tuple(x.shape)).astype(np.float32) for n, x in zip(names, example_inputs)}
            for _ in range(batches)]

    class _Random(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    pre = out_path + ".pre.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        quantize_static(pre, out_path, _Random(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric_acts else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": symmetric_acts})
    os.unlink(pre)
    return out_path


def profile_whole_model_ort(module, example_inputs: tuple, workdir: str, *, repeats: int = 50, warmup: int = 10,
                            threads: int | None = None, symmetric_acts: bool = False, cache: str = "cold",
                            clock: str = "wall") -> dict:
    """Time the whole model in fp32 and as an int8 QDQ graph; ``{"fp32": {...}, "int8": {...}}`` in ms.

    ``cache`` as for the layers, so that the sum of layers and the whole model are measured alike.
    """
    flush = _flusher(cache, clock, threads)
    fp32 = os.path.join(workdir, "model_fp32.onnx")
    int8 = os.path.join(workdir, "model_int8_qdq.onnx")
    export_onnx(module, example_inputs, fp32)
    quantize_int8_random(fp32, int8, example_inputs, symmetric_acts=symmetric_acts)
    out = {}
    for key, path, how in (("fp32", fp32, "torch.onnx.export(dynamo=True, opset 21), fp32"),
                           ("int8", int8, "onnxruntime.quantization.quantize_static QDQ, per-channel s8 weights, "
                            f"{'s8' if symmetric_acts else 'u8'} activations, MinMax on 8 random-normal batches "
                            "(timing only: accuracy meaningless)")):
        sess = make_session(path, threads)
        feeds = {i.name: np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float32)
                 for i, x in zip(sess.get_inputs(), example_inputs)}
        med, iqr = time_session(sess, feeds, repeats, warmup, flush, clock)
        out[key] = {"median_ms": med, "spread_ms": iqr, "repeats": repeats, "cache": cache, "how": how}
    return out
