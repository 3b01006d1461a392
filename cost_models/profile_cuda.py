"""Per-layer latency of PyTorch kernels on an NVIDIA GPU (``mpqc profile --target cuda``), timed with CUDA events.

Each candidate runs the kernel a deployment through PyTorch would call:

- bf16: ``F.conv{1,2,3}d`` / ``F.linear`` / ``torch.matmul`` in bfloat16.
- W8A8 int: ``torch._int_mm`` (int8 x int8 -> int32); needs M > 16 and K, N multiples of 8, so shapes are
  padded up (noted in the row).
- W8A8 fp8: ``torch._scaled_mm`` on float8_e4m3fn with per-tensor scales, bf16 out; compute capability >= 8.9;
  dimensions padded to multiples of 16.
- W4 weight-only: ``torch.ops.aten._weight_int4pack_mm`` (bf16 activations, int4 weights packed by
  ``_convert_weight_to_int4pack``, group 128); K padded to a multiple of 128. Where the op is missing or
  rejects the shape the row is ``unsupported`` with PyTorch's reason.

int8/fp8 convs are lowered to one GEMM (M = N·H_out·W_out, K = (C_in/g)·k_h·k_w, N = C_out); only the GEMM is
timed (not the im2col, not quantizing the activation), and grouped convs have no such lowering (unsupported).
Rows record the device, compute capability, CUDA and driver versions and the torch version.
"""

from __future__ import annotations

import datetime
import math
import platform
from typing import Any, Callable, Sequence

import numpy as np

from mpqc.errors import UserError, first_line

from .latency import LatencyRow, LatencyTable, plan_measurements
from .protocols import LayerLike, kind_name


def require_cuda():
    """The torch module, after checking that a CUDA device is usable; ``UserError`` otherwise."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA device: `--target cuda` times kernels on an NVIDIA GPU and torch.cuda.is_available() "
                        "is False here; run mpqc profile on a GPU machine, or use --target ort-cpu")
    return torch


def cuda_provenance() -> dict:
    torch = require_cuda()
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    driver = "unknown"
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return {"device": props.name, "capability": f"{props.major}.{props.minor}", "runtime": "torch",
            "runtime_version": torch.__version__, "cuda": torch.version.cuda, "driver": driver,
            "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float]:
    """Median and inter-quartile range (ms) of ``repeats`` calls, each between two CUDA events."""
    torch = require_cuda()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ts = np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])
    q1, med, q3 = np.percentile(ts, [25, 50, 75])
    return float(med), float(q3 - q1)


def gemm_shape(layer: LayerLike) -> tuple[int, int, int]:
    """(M, K, N) of the GEMM a layer lowers to; ``NotImplementedError`` when it has none."""
    kind = kind_name(layer.kind)
    if kind == "conv":
        if (getattr(layer, "attrs", None) or {}).get("transposed"):
            raise NotImplementedError("transposed convs run in bf16 only here (no int8/fp8 GEMM lowering)")
        if layer.groups != 1:
            raise NotImplementedError("grouped/depthwise convs have no int8/fp8 GEMM lowering")
        out = layer.out_shape
        return out[0] * math.prod(out[2:]), layer.fan_in, layer.weight_shape[0]
    if kind == "linear":
        x = layer.in_shapes[0]
        return math.prod(x[:-1]), x[-1], layer.weight_shape[0]
    if kind == "matmul" and len(layer.in_shapes) == 2:
        a, b = layer.in_shapes
        if len(b) > 2 and math.prod(b[:-2]) > 1:
            raise NotImplementedError("batched activation x activation matmuls run in bf16 only")
        return math.prod(a[:-1]), a[-1], b[-1]
    raise NotImplementedError(f"{kind} layers have no GEMM lowering")


def _up(v: int, m: int) -> int:
    return -(-v // m) * m


def _padded(shape: tuple[int, int, int], padded: tuple[int, int, int]) -> str:
    return "" if shape == padded else f"; padded {'x'.join(map(str, shape))} -> {'x'.join(map(str, padded))}"


def kernel(layer: LayerLike, w_bits: int | None, a_bits: int | None, fmt: str) -> tuple[Callable[[], Any], str]:
    """A no-argument callable running ``layer`` at the precision on the GPU, and a note for the row."""
    torch = require_cuda()
    import torch.nn.functional as F

    dev, kind = "cuda", kind_name(layer.kind)
    if fmt in ("bf16", "float") and w_bits in (None, 16) and a_bits in (None, 16):
        bf = torch.bfloat16
        xs = [torch.randn(*s, device=dev, dtype=bf) for s in layer.in_shapes[:2]]
        if kind == "conv" and (getattr(layer, "attrs", None) or {}).get("transposed"):
            from .profile_ort import _conv_transpose_geometry

            geo = _conv_transpose_geometry(layer)
            nd = len(layer.weight_shape) - 2
            conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
            w = torch.randn(*layer.weight_shape, device=dev, dtype=bf).transpose(0, 1).contiguous()
            return lambda: conv_t(xs[0], w, None, geo["strides"], geo["pads"][:nd], geo["output_padding"], 1,
                                  geo["dilations"]), "bf16"
        if kind == "conv":
            from .profile_ort import _conv_geometry

            geo = _conv_geometry(layer)
            nd = len(layer.weight_shape) - 2
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
            w = torch.randn(*layer.weight_shape, device=dev, dtype=bf)
            pad = geo["pads"][:nd]
            return lambda: conv(xs[0], w, None, geo["strides"], pad, geo["dilations"], geo["group"]), "bf16"
        if kind == "linear":
            w = torch.randn(*layer.weight_shape, device=dev, dtype=bf)
            return lambda: F.linear(xs[0], w), "bf16"
        if kind == "matmul" and len(xs) == 2:
            return lambda: torch.matmul(xs[0], xs[1]), "bf16"
        raise NotImplementedError(f"{kind} is not profiled per layer")
    shape = gemm_shape(layer)
    m, k, n = shape
    lowered = "im2col GEMM, " if kind == "conv" else ""
    if fmt == "int" and w_bits == 8 and a_bits == 8:
        mp, kp, np_ = max(17, _up(m, 8)), _up(k, 8), _up(n, 8)
        a = torch.randint(-128, 127, (mp, kp), device=dev, dtype=torch.int8)
        b = torch.randint(-128, 127, (np_, kp), device=dev, dtype=torch.int8).t()
        return lambda: torch._int_mm(a, b), f"{lowered}torch._int_mm, GEMM only{_padded(shape, (mp, kp, np_))}"
    if fmt == "fp8" and w_bits == 8 and a_bits == 8:
        if torch.cuda.get_device_capability() < (8, 9):
            raise NotImplementedError("fp8 needs compute capability >= 8.9")
        mp, kp, np_ = _up(m, 16), _up(k, 16), _up(n, 16)
        a = torch.randn(mp, kp, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(np_, kp, device=dev).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=dev)
        return (lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16),
                f"{lowered}torch._scaled_mm e4m3, GEMM only{_padded(shape, (mp, kp, np_))}")
    if fmt == "int" and w_bits == 4 and a_bits is None and kind == "linear":
        op = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
        if op is None:
            raise NotImplementedError("torch.ops.aten._weight_int4pack_mm is not in this PyTorch build")
        group = 128
        kp, np_ = _up(k, group), _up(n, 8)
        x = torch.randn(m, kp, device=dev, dtype=torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 256, (np_, kp // 2), device=dev, dtype=torch.uint8), 8)
        sz = torch.ones(kp // group, np_, 2, device=dev, dtype=torch.bfloat16)
        return (lambda: op(x, packed, group, sz),
                f"_weight_int4pack_mm, group {group}{_padded(shape, (m, kp, np_))}")
    raise NotImplementedError(f"no PyTorch CUDA kernel is profiled for W{w_bits}A{a_bits} {fmt}")


def profile_layers_cuda(layers: Sequence[LayerLike], target: Any, *, repeats: int = 100, warmup: int = 20,
                        progress: Callable[[str], None] | None = None) -> LatencyTable:
    """Measure every distinct layer signature at every candidate precision of ``target`` on the current GPU."""
    torch = require_cuda()
    prov = cuda_provenance()
    table = LatencyTable(meta={"provenance": prov, "repeats": repeats, "warmup": warmup})
    for sig, layer, cand in plan_measurements(layers, target):
        base = dict(target=target.name, signature=sig, kind=kind_name(layer.kind), macs=int(layer.macs),
                    w_bits=cand.w_bits, a_bits=cand.a_bits, format=cand.format, provenance=prov, layer=layer.name)
        try:
            with torch.no_grad():
                fn, note = kernel(layer, cand.w_bits, cand.a_bits, cand.format)
                med, iqr = time_cuda(fn, repeats, warmup)
            table.add(LatencyRow(median_ms=med, spread_ms=iqr, repeats=repeats, note=note, **base))
        except (NotImplementedError, RuntimeError) as e:  # RuntimeError: PyTorch rejects the shape or dtype
            reason = first_line(e)
            table.add(LatencyRow(median_ms=math.nan, spread_ms=math.nan, repeats=0, status="unsupported",
                                 note=reason, **base))
        if progress:
            progress(f"{layer.name} {cand.label}")
    return table


def profile_whole_model_cuda(module, example_inputs: tuple, *, repeats: int = 100, warmup: int = 20) -> dict:
    """Time the whole model in bf16 eager mode on the GPU: ``{"bf16": {...}}`` in ms."""
    torch = require_cuda()
    model = module.eval().to("cuda", torch.bfloat16)
    xs = tuple(x.to("cuda", torch.bfloat16) if torch.is_floating_point(x) else x.to("cuda") for x in example_inputs)
    with torch.no_grad():
        med, iqr = time_cuda(lambda: model(*xs), repeats, warmup)
    return {"bf16": {"median_ms": med, "spread_ms": iqr, "repeats": repeats, "how": "torch eager, bfloat16"}}
