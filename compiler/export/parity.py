"""Parity of an exported ONNX model with the PyTorch fake-quant model it came from, in onnxruntime.

The model runs twice, with graph optimisations off (``ORT_DISABLE_ALL``: DequantizeLinear + float kernels, the
file's own semantics) and on (``ORT_ENABLE_ALL``: fused integer kernels such as QLinearConv, whose requantization
rounds once more). Both are compared with the torch reference on held-out samples:

- classification top-1 agreement (outputs of shape [N, C], C > 1), which must reach ``min_top1`` (99.5 %);
- the max and mean absolute error in units of the output quantization step ("LSB"): the scale of the
  DequantizeLinear that produces the output when the output is quantized, otherwise the step of an 8-bit
  symmetric grid over the reference outputs (max|y| / 127), which is stated in the report as such.

Float kernels accumulate in a different order than torch, so a value on a rounding boundary can land one code
away; such flips propagate, which is why the tolerance is an agreement rate and an error in LSB, not zero
(formats.md §2.2, style.md §3.4). A network at 2-3 bits can amplify those one-code flips into a few changed
top-1 answers per hundred, on every runtime alike. When a mode falls below ``min_top1`` the check therefore
measures the reference against itself: every activation quantizer's input scaled by 1 + u·1e-6 (u uniform in
[-1, 1], float32-level noise, two seeds) so that only values within a rounding error of a tie move. A mode
that agrees with the reference as well as the reference agrees with itself under that noise (less two
standard errors and one sample) passes, and the report says so; a wrong scale, zero point or bias moves far
more than ties and still fails. onnxruntime's weight-only ``MatMulNBits`` would by default quantize activations
on the fly (accuracy level 4); the check runs it at level 0, exact, and says so.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from mpqc.errors import UserError, first_line

log = logging.getLogger(__name__)

MIN_TOP1 = 0.995
TIE_EPS = 1e-6  # relative noise on each activation quantizer's input: float32 accumulation-order level
TIE_SEEDS = 2
MODES = {"no-opt": "ORT_DISABLE_ALL", "opt": "ORT_ENABLE_ALL"}


class ParityError(UserError):
    """The exported model disagrees with the fake-quant model beyond the tolerance; ``report`` has the numbers."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


@dataclass
class ModeResult:
    """Agreement of one onnxruntime optimisation level with the reference."""

    mode: str
    top1_agreement: float | None
    err_max_lsb: float
    err_mean_lsb: float
    err_max: float
    exact_fraction: float  # samples whose every output is within 0.01 LSB (float rounding of the last layer)


@dataclass
class ParityReport:
    """What ``check_parity`` measured; ``passed`` is False when any mode fell below ``min_top1``."""

    samples: int
    lsb: float
    lsb_source: str
    min_top1: float
    modes: list[ModeResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tie_agreement: float | None = None  # the reference against itself under tie noise (measured on failure only)
    # on failure: the activation codes compared point by point in the worst mode (export/localize.py):
    # {"mode", "first": the earliest point that departs, or None (localize.departs), "points": [PointDiff dicts]}
    localized: dict | None = None

    @property
    def threshold(self) -> float:
        """The top-1 agreement a mode needs: ``min_top1``; where the reference's own agreement under tie noise is
        below that, that agreement less two standard errors and one sample."""
        if self.tie_agreement is None or self.samples <= 0 or self.tie_agreement >= self.min_top1:
            return self.min_top1
        p = self.tie_agreement
        return p - 2.0 * float(np.sqrt(p * (1.0 - p) / self.samples)) - 1.0 / self.samples

    @property
    def passed(self) -> bool:
        return all(m.top1_agreement is None or m.top1_agreement >= self.threshold for m in self.modes) and all(
            np.isfinite(m.err_max) for m in self.modes)

    def to_dict(self) -> dict:
        """JSON-ready form, with ``passed`` and the ``threshold`` applied."""
        return {**asdict(self), "threshold": self.threshold, "passed": self.passed}

    def summary(self) -> str:
        """One line per mode."""
        lines = []
        for m in self.modes:
            top1 = f"top-1 agreement {m.top1_agreement:.2%}, " if m.top1_agreement is not None else ""
            lines.append(f"{m.mode:6s}: {top1}error max {m.err_max_lsb:.2f} / mean {m.err_mean_lsb:.3f} LSB, "
                         f"{m.exact_fraction:.0%} of samples exact ({self.samples} samples, LSB = {self.lsb:.4g}: "
                         f"{self.lsb_source})")
        if self.tie_agreement is not None:
            lines.append(f"ties  : the reference agrees with itself {self.tie_agreement:.2%} under tie noise; top-1 "
                         f"threshold {self.threshold:.2%}")
        if self.localized is not None:
            lines.append(f"where : {departure(self.localized)}")
        return "\n".join(lines)


_FLOAT8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
           onnx.TensorProto.FLOAT8E5M2FNUZ}


def opt_disabled(model: onnx.ModelProto) -> tuple[str, ...]:
    """The onnxruntime optimizers the check turns off at ``opt`` for this file.

    - trt and qcdq profiles: ``WeightBiasQuantization``. onnxruntime rounds a float conv bias to int32 when it
      fuses, where such a file (and TensorRT) adds it in float.
    - float8 weights on onnxruntime < 1.32: ``QDQSelectorActionTransformer``. Those releases fuse an fp8
      DequantizeLinear -> MatMul into MatMulIntegerToFloat, which takes only 8-bit integers, and then refuse
      the graph they made (seen on 1.30 and 1.31; 1.32 leaves it unfused).
    """
    profile = {p.key: p.value for p in model.metadata_props}.get("mpqc.profile")
    off = ["WeightBiasQuantization"] if profile in ("trt", "qcdq") else []
    if _ort_version() < (1, 32) and any(t.data_type in _FLOAT8 for t in model.graph.initializer):
        off.append("QDQSelectorActionTransformer")
    return tuple(off)


def _ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    major, minor = ort.__version__.split(".")[:2]
    return int(major), int(minor)


_OPT_NOTES = {
    "WeightBiasQuantization": "opt: onnxruntime's WeightBiasQuantization disabled (this profile keeps float biases)",
    "QDQSelectorActionTransformer": "opt: onnxruntime's QDQ fusions disabled (before 1.32 they fuse float8 weights "
                                    "into an integer-only kernel and reject the result)",
}


def ort_session(model, *, level: str = "ORT_ENABLE_ALL", threads: int | None = None,
                exact_matmulnbits: bool = True, disabled_optimizers: tuple[str, ...] = ()):
    """An onnxruntime CPU session for ``model`` (ModelProto, bytes or path) at one optimisation level."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    else:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # checks need no spin-waiting
    if exact_matmulnbits:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load the exported model at {level}: "
                        f"{first_line(e, 300)}") from None


@contextlib.contextmanager
def tie_noise(reference: torch.nn.Module, seed: int, eps: float = TIE_EPS):
    """While inside, every activation quantizer of ``reference`` sees its input scaled by 1 + u·eps (u uniform in
    [-1, 1], drawn from ``seed``): only values within float rounding of a tie move."""
    from mpqc.compiler.quantize import ActQuantizer

    g = torch.Generator().manual_seed(seed)

    def jitter(_m, args):
        x = args[0]
        u = torch.rand(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
        return (x * (1 + eps * (2 * u - 1)), *args[1:])

    hooks = [m.register_forward_pre_hook(jitter) for m in reference.modules() if isinstance(m, ActQuantizer)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def tie_agreement(reference: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *, batch_size: int = 32,
                  eps: float = TIE_EPS, seeds: int = TIE_SEEDS) -> float | None:
    """Top-1 agreement of ``reference`` with itself when every activation quantizer's input is scaled by
    1 + u·eps (u uniform in [-1, 1]); the lowest over ``seeds`` noise draws. None when the outputs are not
    [N, C] logits. A reference without activation quantizers agrees with itself exactly (1.0)."""
    from mpqc.compiler.quantize import ActQuantizer

    base = run_torch(reference, inputs, batch_size)
    if base.ndim != 2 or base.shape[1] < 2:
        return None
    mods = [m for m in reference.modules() if isinstance(m, ActQuantizer)]
    if not mods:
        return 1.0
    worst = 1.0
    for seed in range(seeds):
        with tie_noise(reference, seed, eps):
            got = run_torch(reference, inputs, batch_size)
        worst = min(worst, float((got.argmax(1) == base.argmax(1)).mean()))
    return worst


def _as_inputs(samples) -> tuple[torch.Tensor, ...]:
    if isinstance(samples, torch.Tensor):
        return (samples,)
    if isinstance(samples, np.ndarray):
        return (torch.from_numpy(samples),)
    return tuple(torch.as_tensor(s) for s in samples)


def _batches(inputs: tuple[torch.Tensor, ...], size: int):
    n = inputs[0].shape[0]
    for i in range(0, n, size):
        yield tuple(x[i:i + size] for x in inputs)


def run_onnx(session, inputs: tuple[torch.Tensor, ...], batch_size: int = 32) -> np.ndarray:
    """First output of ``session`` over ``inputs`` (split along dim 0; a static batch is respected)."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise UserError(f"the ONNX model takes {len(names)} inputs, the samples give {len(inputs)}")
    dim0 = session.get_inputs()[0].shape[0]
    size = dim0 if isinstance(dim0, int) and dim0 > 0 else batch_size
    outs = []
    for b in _batches(inputs, size):
        if b[0].shape[0] != size and isinstance(dim0, int):
            break  # a static-batch model cannot take the ragged tail
        outs.append(session.run(None, {k: v.numpy() for k, v in zip(names, b)})[0])
    return np.concatenate(outs)


@torch.no_grad()
def run_torch(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], batch_size: int = 32) -> np.ndarray:
    """The reference's first output over ``inputs`` in batches."""
    outs = []
    for b in _batches(inputs, batch_size):
        y = module(*b)
        y = y[0] if isinstance(y, (tuple, list)) else y
        outs.append(y.detach().float().numpy())
    return np.concatenate(outs)


def departure(localized: dict) -> str:
    """The localisation in words: where the codes first depart, or that they never do by more than a tie."""
    first = next((p for p in localized["points"] if p["key"] == localized["first"]), None)
    if first is None:
        return (f"({localized['mode']}) no activation's codes depart from the reference's beyond rounding ties")
    return (f"({localized['mode']}) the activation codes first depart at {first['tensor']} ({first['key']}): up to "
            f"{first['max_codes']} codes, {first['frac_far']:.2%} of its elements off by 2 or more")


def _worst(report: ParityReport) -> ModeResult:
    return min((m for m in report.modes if m.top1_agreement is not None), key=lambda m: m.top1_agreement,
               default=report.modes[0])


def failure(report: ParityReport) -> str:
    """What a failed report failed on, in one clause (the caller says what to do about it)."""
    worst = _worst(report)
    what = (f"top-1 agreement {worst.top1_agreement:.2%} < {report.threshold:.1%}"
            if worst.top1_agreement is not None else "non-finite outputs")
    where = ""
    if report.localized is not None and report.localized["first"] is not None:
        first = next(p for p in report.localized["points"] if p["key"] == report.localized["first"])
        where = f"; its codes first depart at {first['tensor']} (up to {first['max_codes']} codes)"
    return (f"parity check failed in onnxruntime ({worst.mode}): {what} over {report.samples} samples, max error "
            f"{worst.err_max_lsb:.1f} LSB{where}")


def reference_vs_trained(trained, reference, x) -> dict:
    """How far exporting itself moves the model: the deploy reference (what the ONNX file is checked against:
    biases on the s_in·s_w grid, folded renorms) against the fine-tuned fake-quant model, on ``x``."""
    with torch.no_grad():
        a, b = trained(x).float(), reference(x).float()
    return {"samples": len(x), "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
            "max_abs_diff": float((a - b).abs().max())}


def _has_sub_byte_weights(model) -> bool:
    """Whether an initializer is int4/uint4 or int2/uint2: weights onnxruntime may run as MatMulNBits."""
    import onnx

    sub_byte = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    sub_byte |= {getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)}
    proto = model if isinstance(model, onnx.ModelProto) else None
    if proto is None:
        return True  # a path or bytes: do not open it twice for a note
    return any(t.data_type in sub_byte for t in proto.graph.initializer)


def check_parity(model: onnx.ModelProto, reference: torch.nn.Module, samples, *, min_top1: float = MIN_TOP1,
                 lsb: float | None = None, batch_size: int = 32, modes=tuple(MODES), raise_on_failure: bool = True,
                 exact_matmulnbits: bool = True, threads: int | None = None) -> ParityReport:
    """Compare ``model`` in onnxruntime with ``reference`` on ``samples`` (a tensor or a tuple of input tensors).

    Args:
        model: the exported QDQ model.
        reference: the fake-quant torch module the export reproduces (``ExportedModel.reference``).
        samples: held-out inputs, N along dim 0 (not the calibration samples).
        min_top1: the top-1 agreement each mode must reach on [N, C] outputs.
        lsb: the output quantization step; default: from the model (see the module docstring).
        batch_size: samples per run.
        modes: which of ``no-opt`` / ``opt`` to run.
        raise_on_failure: raise ``ParityError`` instead of returning a failed report.
        exact_matmulnbits: run onnxruntime's MatMulNBits at accuracy level 0 (exact).
        threads: onnxruntime intra-op threads (default: onnxruntime's, one per core).

    Returns:
        The report (``.passed``, ``.summary()``, ``.to_dict()``).
    """
    from .qdq import quantization_step

    inputs = _as_inputs(samples)
    if inputs[0].shape[0] == 0:
        raise UserError("the parity check needs at least one held-out sample")
    ref = run_torch(reference, inputs, batch_size)
    step = lsb if lsb is not None else quantization_step(model)
    source = "given" if lsb is not None else "scale of the output DequantizeLinear"
    if step is None:
        absmax = float(np.abs(ref).max()) if ref.size else 0.0
        step, source = (absmax / 127 if absmax > 0 else 1.0), "int8 step of the reference output range"
    report = ParityReport(samples=0, lsb=float(step), lsb_source=source, min_top1=min_top1)
    if exact_matmulnbits and _has_sub_byte_weights(model):  # what onnxruntime fuses into MatMulNBits
        report.notes.append("MatMulNBits at accuracy level 0 (exact); the default level 4 quantizes activations")
    report.notes.extend(_OPT_NOTES[name] for name in opt_disabled(model))
    for mode in modes:
        sess = ort_session(model, level=MODES[mode], exact_matmulnbits=exact_matmulnbits, threads=threads,
                           disabled_optimizers=opt_disabled(model) if mode == "opt" else ())
        got = run_onnx(sess, inputs, batch_size)
        r = ref[: len(got)]
        if got.shape != r.shape:
            raise UserError(f"the ONNX output has shape {got.shape[1:]}, the reference {r.shape[1:]}")
        err = np.abs(got.astype(np.float64) - r.astype(np.float64))
        top1 = None
        if r.ndim == 2 and r.shape[1] > 1:
            top1 = float((got.argmax(1) == r.argmax(1)).mean())
        report.samples = len(got)
        per_sample = err.reshape(len(err), -1).max(axis=1) / step
        report.modes.append(ModeResult(mode, top1, float(err.max() / step), float(err.mean() / step),
                                       float(err.max()), float(np.mean(per_sample <= 0.01))))
    if any(m.top1_agreement is not None and m.top1_agreement < min_top1 for m in report.modes):
        report.tie_agreement = tie_agreement(reference, inputs, batch_size=batch_size)
        if report.tie_agreement is not None and report.tie_agreement < 1.0:
            report.notes.append(
                f"below {min_top1:.1%}: the reference agrees with itself only {report.tie_agreement:.2%} when its "
                f"rounding ties break differently (inputs x (1 + {TIE_EPS:g} u)); threshold {report.threshold:.2%}")
    if not report.passed:  # where the codes depart, in the worst failing mode
        from .localize import first_departure, localize

        worst = _worst(report)
        diffs = localize(model, reference, inputs, mode=worst.mode, batch_size=batch_size, threads=threads,
                         exact_matmulnbits=exact_matmulnbits)
        first = first_departure(diffs)
        report.localized = {"mode": worst.mode, "first": first.key if first else None,
                            "points": [d.to_dict() for d in diffs]}
    if not report.passed and raise_on_failure:
        raise ParityError(f"{failure(report)}; pass --no-check to keep the file anyway", report)
    log.info("parity:\n%s", report.summary())
    return report


__all__ = ["MIN_TOP1", "ModeResult", "ParityError", "ParityReport", "check_parity", "ort_session",
           "reference_vs_trained", "run_onnx", "run_torch", "tie_agreement"]
