"""onnxruntime CPU latency of exported models on this machine, measured side by side.

Models are timed in interleaved rounds (a few runs of each in turn) after a warm-up, so a frequency change or a
noisy neighbour affects every model alike; the median over all runs is reported with the 10th/90th percentiles.
Sessions use ``ORT_ENABLE_ALL`` (the fused integer kernels), a fixed thread count and batch 1 by default.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .parity import ort_session


@dataclass
class Latency:
    """Per-inference wall time of one model, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    threads: int
    clock: str = "wall"


def feeds_for(session, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every input of ``session`` (symbolic dims: ``batch``; integer inputs: zeros)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in i.shape]
        if "float" in i.type:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            out[i.name] = np.zeros(shape, dtype=np.int64 if "int64" in i.type else np.int32)
    return out


def compare_latency(models: dict[str, onnx.ModelProto | bytes | str], *, threads: int = 2, batch: int = 1,
                    warmup: int = 10, runs: int = 50, rounds: int = 5,
                    feeds: dict[str, np.ndarray] | None = None, clock: str = "wall") -> dict[str, Latency]:
    """Median latency of each model, timed in ``rounds`` interleaved rounds of ``runs // rounds`` runs.

    Args:
        models: name -> model (ModelProto, serialized bytes or a path).
        threads: intra-op threads of every session.
        batch: batch size for inputs with a symbolic batch dimension.
        warmup: untimed runs per model first.
        runs: timed runs per model in total.
        rounds: how many times to cycle through the models.
        feeds: inputs to use (default: random, see ``feeds_for``).
        clock: ``wall`` (perf_counter) or ``cpu`` (process CPU time; with ``threads=1`` it is the latency without
            the time other processes held the CPU, the robust choice on a shared machine).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures latency only with threads=1 (it sums the CPU time of all threads)")
    now = time.perf_counter if clock == "wall" else time.process_time
    sessions = {k: ort_session(_bytes(m), level="ORT_ENABLE_ALL", threads=threads, exact_matmulnbits=False)
                for k, m in models.items()}
    inputs = {k: feeds if feeds is not None else feeds_for(s, batch) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, inputs[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = now()
                s.run(None, inputs[k])
                times[k].append((now() - t) * 1e3)
    return {k: Latency(float(np.median(v)), float(np.percentile(v, 10)), float(np.percentile(v, 90)), len(v),
                       threads, clock) for k, v in times.items()}


def _bytes(m) -> bytes:
    if isinstance(m, onnx.ModelProto):
        return m.SerializeToString()
    if isinstance(m, (str, os.PathLike)):
        with open(m, "rb") as f:
            return f.read()
    return m


def speed_report(quantized: onnx.ModelProto, fp32: onnx.ModelProto, *, threads: int = 2, batch: int = 1,
                 warmup: int = 10, runs: int = 50) -> dict:
    """Latency of the quantized export against its fp32 twin: both medians, the speed-up and the machine."""
    lat = compare_latency({"quantized": quantized, "fp32": fp32}, threads=threads, batch=batch, warmup=warmup,
                          runs=runs)
    q, f = lat["quantized"], lat["fp32"]
    return {"quantized": asdict(q), "fp32": asdict(f), "speedup": f.median_ms / q.median_ms if q.median_ms else None,
            "threads": threads, "batch": batch, "machine": machine()}


def machine() -> str:
    """The CPU model (lscpu's "Model name") and core count, for provenance."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


__all__ = ["Latency", "compare_latency", "feeds_for", "machine", "speed_report"]
