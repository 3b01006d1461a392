"""Sensitivity analysis: a non-negative score per (group, candidate precision) that predicts the loss increase.

One interface, one module per method (research/seeds.md §1–5, anchors.md §1 and §14.8)::

    table = run_sensitivity("fisher", captured_or_qmodel, load_data("digits"), {"candidates": (8, 4, 2)})
    table.save("sens.json")

Methods (``METHODS``): ``fisher`` (default; the empirical Fisher's quadratic form ½·ΔᵀFΔ, one pass),
``hutchinson`` (Hessian trace per group × ‖Δ‖²/n, HAWQ-V2/V3), ``impq`` (IMPQ's margin noise gain, per output
channel), ``eval`` (measured KL divergence with one group quantized), ``limpq`` (learned LSQ step sizes of a
joint multi-bit pre-training), ``dual`` (final dual variables of a short primal-dual PD-QAT run), ``analog``
(Fisher-weighted output noise variance of the analog target per energy per MAC). Results are cached by (model
hash, data hash, method, options) when a cache is given.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from mpqc.compiler.capture import Captured
from mpqc.compiler.quantize import QuantizedModel
from mpqc.errors import UserError

from . import analog, dual, fisher, hutchinson, impq, limpq
from . import eval as eval_method
from ._common import (
    DEFAULT_CANDIDATES,
    Context,
    LossFn,
    ProgressFn,
    RawScores,
    SensitivityOptions,
    act_groups,
    as_dataset,
    cross_entropy,
    data_hash,
    merge_params,
    take,
    weights_hash,
)
from .cache import SensitivityCache, cache_key, default_cache_dir
from .table import TABLE_VERSION, LayerScores, SensitivityTable, load_table, read_limpq_pickle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A registered method: how it runs, its own options with defaults, and what it can score."""

    name: str
    run: Callable[[Context], RawScores]
    defaults: dict
    summary: str
    granularities: tuple[str, ...] = ("layer",)
    needs_target: bool = False


METHODS: dict[str, Method] = {
    "fisher": Method("fisher", fisher.run, fisher.DEFAULTS, "½·ΔᵀFΔ with the empirical Fisher (block or diagonal)",
                     ("layer", "channel")),
    "hutchinson": Method("hutchinson", hutchinson.run, hutchinson.DEFAULTS,
                         "(Hessian trace / n)·‖Δ‖², Hutchinson's estimator (HAWQ-V2/V3)", ("layer", "channel")),
    "impq": Method("impq", impq.run, impq.DEFAULTS, "IMPQ margin noise gain × Δ²/12, per output channel",
                   ("layer", "channel")),
    "eval": Method("eval", eval_method.run, eval_method.DEFAULTS,
                   "measured KL divergence (or loss increase) with one group quantized"),
    "limpq": Method("limpq", limpq.run, limpq.DEFAULTS, "LIMPQ: learned LSQ step sizes of joint multi-bit training"),
    "dual": Method("dual", dual.run, dual.DEFAULTS, "PD-QAT: final dual variables of per-layer proximity constraints"),
    "analog": Method("analog", analog.run, analog.DEFAULTS,
                     "Fisher-weighted output noise variance of the analog target per energy per MAC",
                     ("layer", "channel"), needs_target=True),
}


def _options(options: SensitivityOptions | dict | None) -> SensitivityOptions:
    if options is None:
        return SensitivityOptions()
    if isinstance(options, SensitivityOptions):
        return options
    if not isinstance(options, dict):
        raise UserError(f"options must be a SensitivityOptions or a dict, not {type(options).__name__}")
    names = {f.name for f in fields(SensitivityOptions)}
    common = {k: v for k, v in options.items() if k in names and k != "extra"}
    extra = {**options.get("extra", {}), **{k: v for k, v in options.items() if k not in names}}
    if "candidates" in common:
        common["candidates"] = tuple(common["candidates"])
    return SensitivityOptions(**common, extra=extra)


class _QuantizerState:
    """The quantizer state and gradient flags of a QuantizedModel, to put back after working on it in place.

    The weights themselves are only read by the methods that run in place (the training ones copy the model);
    the weight quantizers' step-size caches are kept on purpose (the MSE step search is the most expensive part
    of a CPU run on a large model, and a second method on the same model reuses it).
    """

    def __init__(self, qm: QuantizedModel):
        self.qm = qm
        self.wq = {k: (q.enabled, q.bits.clone(), q.scale.detach().clone(), q.training) for k, q in qm.wq.items()}
        self.aq = {k: (q.bits, q.observing, q.scale.detach().clone(), q.absmax.clone(), q.sample, q.training)
                   for k, q in qm.aq.items()}
        self.grad = [(p, p.requires_grad) for p in qm.gm.parameters()]
        self.training = qm.training

    def restore(self) -> None:
        with torch.no_grad():
            for k, (enabled, bits, scale, training) in self.wq.items():
                q = self.qm.wq[k]
                q.enabled, q.training = enabled, training
                q.bits.copy_(bits)
                q.scale.copy_(scale)
            for k, (bits, observing, scale, absmax, sample, training) in self.aq.items():
                q = self.qm.aq[k]
                q.bits, q.observing, q.training = bits, observing, training
                q.scale.copy_(scale)
                q.absmax = absmax
                q.sample = sample
        for p, flag in self.grad:
            p.requires_grad_(flag)
        self.qm.training = self.training


def _quantized_copy(model: QuantizedModel | Captured, act_groups_mode: str) -> QuantizedModel:
    """A private quantized model: the caller's model is never changed (methods move, re-quantize or train it)."""
    if isinstance(model, QuantizedModel):
        return copy.deepcopy(model)
    if isinstance(model, Captured):
        if hasattr(model.gm, "wq") or hasattr(model.gm, "aq"):
            raise UserError("this Captured model already carries quantizers (a QuantizedModel was built on it); "
                            "pass that QuantizedModel instead")
        gm = copy.deepcopy(model.gm)
        return QuantizedModel(Captured(model.graph, gm, model.method, model.example_inputs),
                              act_groups=act_groups_mode)
    raise UserError(f"sensitivity needs a Captured model or a QuantizedModel, not {type(model).__name__}")


def _device(qm: QuantizedModel, requested: str | None) -> torch.device:
    if requested:
        from mpqc.compiler.devices import resolve_device

        return resolve_device(requested)
    p = next(qm.gm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _needs_calibration(qm: QuantizedModel) -> bool:
    return any(aq.sample.numel() == 0 for aq in qm.aq.values())


def _assemble(qm: QuantizedModel, raw: RawScores) -> tuple[dict[str, LayerScores], dict[str, dict]]:
    """Per-layer scores; each activation group's score is split evenly among the layers that read it."""
    groups = act_groups(qm)
    share: dict[str, dict[int, float]] = {}
    out_groups: dict[str, dict] = {}
    for g in groups:
        if g.key not in raw.a:
            continue
        out_groups[g.name] = {"consumers": list(g.consumers), "a": dict(raw.a[g.key])}
        for layer in g.consumers:
            acc = share.setdefault(layer, {})
            for b, s in raw.a[g.key].items():
                acc[b] = acc.get(b, 0.0) + s / len(g.consumers)
    layers = {}
    for op in qm.graph_ir.layers():
        layers[op.name] = LayerScores(dict(raw.w.get(op.name, {})), share.get(op.name, {}),
                                      raw.w_channel.get(op.name), raw.e.get(op.name), raw.e_channel.get(op.name))
    return layers, out_groups


def run_sensitivity(method: str, model: QuantizedModel | Captured, data: Any,
                    options: SensitivityOptions | dict | None = None, *, loss_fn: LossFn | None = None,
                    progress: ProgressFn | None = None,
                    cache: SensitivityCache | str | None = None) -> SensitivityTable:
    """Score every group of ``model`` at every candidate with ``method``; see the module docstring.

    ``data``: a ``DataSplits`` (``load_data``), a ``TensorDataset`` or an ``(inputs, targets)`` pair.
    ``loss_fn(output, target)`` returns per-sample losses (default: cross-entropy). ``progress(stage, done,
    total)`` is called as work proceeds. ``cache``: a ``SensitivityCache`` or a directory; None disables it.
    The caller's model is never modified.
    """
    if method not in METHODS:
        raise UserError(f"unknown sensitivity method {method!r}; use one of {', '.join(METHODS)}")
    m = METHODS[method]
    opts = _options(options)
    params = merge_params(method, m.defaults, opts.extra)
    if opts.granularity not in m.granularities:
        per_channel = ", ".join(k for k, v in METHODS.items() if "channel" in v.granularities)
        raise UserError(f"method {method} scores whole layers only; use --granularity layer "
                        f"(channel granularity: {per_channel})")
    target = None
    if m.needs_target:
        if not opts.target:
            raise UserError(f"method {method} needs a target with an analog noise model: pass --target analog")
        from mpqc.targets import SchemaError, load_target

        try:
            target = load_target(opts.target)
        except SchemaError as e:
            raise UserError(f"--target {opts.target}: {e}") from None
        if getattr(target, "analog", None) is None:
            raise UserError(f"--target {opts.target} has no [analog] section; method {method} needs an analog target")
    in_place = isinstance(model, QuantizedModel) and _device(model, opts.device) == _device(model, None)
    if in_place:  # restored below; only reads the weights (the training methods copy it themselves)
        qm, saved = model, _QuantizerState(model)
        try:
            return _run(m, method, qm, data, opts, params, target, loss_fn, progress, cache)
        finally:
            saved.restore()
    qm = _quantized_copy(model, opts.act_groups)
    return _run(m, method, qm, data, opts, params, target, loss_fn, progress, cache)


def _run(m: Method, method: str, qm: QuantizedModel, data: Any, opts: SensitivityOptions, params: dict, target,
         loss_fn: LossFn | None, progress: ProgressFn | None, cache) -> SensitivityTable:
    qm.disable()
    device = _device(qm, opts.device)
    calib = as_dataset(data, "calib")
    train = as_dataset(data, "train")
    sample = take(calib, int(opts.samples), train)
    heldout = take(as_dataset(data, "val"), int(opts.samples))
    train_s = take(train, int(opts.samples))

    key_opts = {**opts.key(params), "act_groups": qm.act_groups_mode}
    mhash, dhash = weights_hash(qm), data_hash(data)
    if cache is not None and not isinstance(cache, SensitivityCache):
        cache = SensitivityCache(cache)
    if cache is not None:
        hit = cache.get(mhash, dhash, method, key_opts)
        if hit is not None:
            hit.meta["cached"] = True
            log.info("sensitivity %s: cache hit", method)
            return hit

    qm.eval()
    ctx = Context(qm, sample, heldout, train_s, opts, params, loss_fn or cross_entropy, device, progress, target)
    if _needs_calibration(qm):
        # NOTE: before the move to the device: ActQuantizer keeps its observed sample on the CPU while observing
        dev0 = _device(qm, None)
        with ctx.stage("calibrate", 1) as tick:
            qm.calibrate(((x.to(dev0), y) for x, y in ctx.batches(device=dev0)), max_batches=ctx.n_batches())
            tick()
    qm.to(device)
    t0 = time.perf_counter()
    for p in qm.gm.parameters():  # methods that need gradients ask for them; the rest runs without
        p.requires_grad_(True)
    raw = m.run(ctx)
    elapsed = time.perf_counter() - t0
    layers, groups = _assemble(qm, raw)
    for name, ls in layers.items():
        for kind in ("w", "a"):
            for b, s in getattr(ls, kind).items():
                if not math.isfinite(s) or s < 0:
                    raise RuntimeError(f"{method} produced a score {s} for {name}.{kind}[{b}]")
    meta = {"time_s": round(elapsed, 3), "device": str(device), "samples": len(sample), "torch": torch.__version__,
            "summary": m.summary, **ctx.meta, **raw.meta}
    table = SensitivityTable(method, mhash, dhash, key_opts, layers, groups, meta)
    if cache is not None:
        cache.put(table)
    return table


__all__ = ["DEFAULT_CANDIDATES", "METHODS", "TABLE_VERSION", "LayerScores", "Method", "SensitivityCache",
           "SensitivityOptions", "SensitivityTable", "cache_key", "default_cache_dir", "load_table",
           "read_limpq_pickle", "run_sensitivity"]
