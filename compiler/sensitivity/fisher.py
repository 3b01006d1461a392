"""Fisher sensitivity (the default): the Fisher quadratic form ½·Δᵀ F Δ from one pass over the data.

F is the empirical Fisher, the mean over samples of g_i g_iᵀ with g_i the per-sample loss gradient, and Δ_b
the quantization error at b bits: Q_b(W) − W for a weight (per-channel step sizes of the model's weight
quantizer), Q_b(a) − a for an activation (the calibrated activation quantizer applied to each sample's
recorded activation). With the Fisher standing in for the Hessian, the score is the second-order estimate of
the loss increase of quantizing that one group (anchors.md §15: one backward pass per batch serves every group
and every candidate at once).

``form`` picks how much of F is used:

- ``"diag"``: ½·Σ F_diag ⊙ Δ² (the textbook diagonal approximation);
- ``"block"`` (default): ½·mean_i (g_iᵀΔ)², the exact quadratic form of the group's Fisher block (per output
  channel at channel granularity). Same cost: it reads the same per-sample gradients. On the digits CNN the
  diagonal misjudged layers by up to 18× against the block (it drops the within-layer correlation of g⊙Δ: the
  residual conv4 was underrated 13-18×, the first conv on smooth images overrated ~2×), and its rank
  correlation with the measured 2-bit loss increase fell to 0.5-0.9 over training seeds where the block's
  stayed at 0.9-1.0 (see the issue-4 report).

Per-sample weight gradients come from ``torch.func.vmap`` (``per_sample="vmap"``, in chunks of ``chunk``
samples), a loop over single samples (``"loop"``), or, cheapest and biased upwards by the squared mean
gradient, each batch's summed gradient as if it were one sample, divided by B (``"batch"``). Activation
gradients are per-sample for free: a sample's activation only reaches its own loss. ``labels="model"`` draws
the labels from the model's own prediction (a Monte-Carlo estimate of the true Fisher) instead of the data's.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator

import torch
from torch.func import functional_call, jacrev, vmap

from mpqc.errors import UserError

from ._common import (
    Context,
    RawScores,
    Taps,
    act_delta,
    act_groups,
    act_scales,
    per_channel_sum,
    weight_delta,
    weighted_layers,
)

log = logging.getLogger(__name__)

DEFAULTS = {"form": "block", "per_sample": "vmap", "chunk": "auto", "labels": "data"}
CHUNK_CAP = 32  # "auto" never goes above this many samples per vmap call

# "auto" chunk: the samples of one vmap call hold about BYTES_PER_ELEMENT bytes per (per-sample gradient
# element + activation element of one sample); measured on torchvision's MobileNet-V2 at 224² on a CPU
# (chunk 32: 13.8 GB peak, chunk 8: 7.1 GB, chunk 2: 6.0 GB; 16.5 M elements per sample -> ~16 B each).
# CHUNK_BYTES keeps that part near 2 GiB: ResNet-20 on CIFAR keeps the cap, MobileNet-V2 gets 8, ResNet-50 2.
CHUNK_BYTES = 2 * 2**30
BYTES_PER_ELEMENT = 16

# (model output of one sample [1, ...], its target [1, ...]) -> K scalars, one gradient each
VectorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_grads(ctx: Context, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     fn: VectorFn, *, mode: str, chunk: int) -> Iterator[dict[str, torch.Tensor]]:
    """Per-sample gradients of ``fn``'s K outputs w.r.t. ``params`` (by FQN), ``chunk`` samples at a time.

    Yields ``{fqn: tensor[samples, K, *param.shape]}``. Quantizers must be off (the float model's gradient).
    With ``mode="vmap"`` a failure of ``torch.func`` falls back to the loop once and is recorded in
    ``ctx.meta["per_sample"]``.
    """
    gm = ctx.qmodel.gm
    names = list(params)
    if mode == "vmap" and ctx.meta.get("per_sample") != "loop (vmap failed)":
        def one(p, xi, yi):
            return fn(functional_call(gm, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).reshape(-1)

        detached = {n: params[n].detach() for n in names}
        try:
            for i in range(0, len(x), chunk):
                with torch.enable_grad():
                    jac = vmap(jacrev(one), in_dims=(None, 0, 0))(detached, x[i:i + chunk], y[i:i + chunk])
                yield {n: jac[n].detach() for n in names}
            return
        except Exception as e:  # noqa: BLE001 - vmap refuses some models; the loop is exact, only slower
            if i > 0:
                raise
            log.warning("per-sample gradients with torch.func.vmap failed (%s); looping over samples",
                        (str(e).splitlines() or [type(e).__name__])[0][:200])
            ctx.meta["per_sample"] = "loop (vmap failed)"
    ps = [params[n] for n in names]
    for i in range(0, len(x), chunk):
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for j in range(i, min(i + chunk, len(x))):
            with torch.enable_grad():
                f = fn(gm(x[j:j + 1]), y[j:j + 1]).reshape(-1)
                per_k: dict[str, list[torch.Tensor]] = {n: [] for n in names}
                for k in range(f.numel()):
                    gs = torch.autograd.grad(f[k], ps, retain_graph=k + 1 < f.numel(), allow_unused=True)
                    for n, g, p in zip(names, gs, ps):
                        per_k[n].append(torch.zeros_like(p) if g is None else g)
            for n in names:
                rows[n].append(torch.stack(per_k[n]))
        yield {n: torch.stack(rows[n]) for n in names}


def chunk_size(ctx: Context, value, outputs: int = 1, cap: int = CHUNK_CAP) -> int:
    """Samples per per-sample-gradient call: ``value`` as given (an integer >= 1), or for ``"auto"`` as many as
    fit CHUNK_BYTES, from the captured graph's weights (``outputs`` gradients of each per sample) and
    activations per sample, at most ``cap``. A fixed 32 took 13.8 GB on MobileNet-V2 at 224²."""
    if value == "auto":
        g = ctx.graph
        weights = sum(op.params for op in g.ops.values() if op.weight_fqn)
        acts = sum(math.prod(op.out_shape[1:]) for op in g.ops.values() if op.out_shape)
        per_sample = BYTES_PER_ELEMENT * (outputs * weights + acts)
        return int(max(1, min(cap, CHUNK_BYTES // max(per_sample, 1))))
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():  # from --option chunk=8
        n = int(value)
    else:
        n = 0
    if n < 1:
        raise UserError(f"chunk must be auto or an integer >= 1, not {value!r}")
    return n


def _check(params: dict) -> None:
    allowed = {"form": ("diag", "block"), "per_sample": ("vmap", "loop", "batch"), "labels": ("data", "model")}
    for k, values in allowed.items():
        if params[k] not in values:
            raise UserError(f"fisher: {k} must be one of {', '.join(values)}, not {params[k]!r}")


def run(ctx: Context) -> RawScores:
    _check(ctx.params)
    form, mode = ctx.params["form"], ctx.params["per_sample"]
    try:
        chunk = chunk_size(ctx, ctx.params["chunk"])
    except UserError as e:
        raise UserError(f"fisher: {e}") from None
    qm, cands = ctx.qmodel, ctx.candidates
    channel = ctx.options.granularity == "channel"
    layers = weighted_layers(qm)
    groups = act_groups(qm)
    scales = act_scales(groups, cands)
    weights = {op.weight_fqn: qm.weight(op.name) for op in layers}
    deltas = {op.weight_fqn: {b: weight_delta(qm, op.name, b) for b in cands} for op in layers}
    stacked = {n: torch.stack([d[b].reshape(d[b].shape[0], -1) for b in cands]) for n, d in deltas.items()}
    # accumulators: the Fisher diagonal (diag form); Σ_i (g_iᵀΔ)² per layer and per output channel (block form)
    fdiag = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()} if form == "diag" else {}
    wacc = {n: {b: torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) for b in cands}
            for n, w in weights.items()}
    wtot = {n: {b: torch.zeros((), dtype=torch.float64, device=w.device) for b in cands} for n, w in weights.items()}
    aacc = {g.key: {b: torch.zeros((), dtype=torch.float64, device=ctx.device) for b in cands} for g in groups}
    gen = torch.Generator().manual_seed(ctx.options.seed)
    loss_one = lambda out, y: ctx.loss_fn(out, y).reshape(-1)[:1]  # noqa: E731
    n = 0
    with ctx.stage("fisher: gradients", ctx.n_batches()) as tick:
        for x, y in ctx.batches():
            if ctx.params["labels"] == "model":  # Monte-Carlo true Fisher: labels drawn from the prediction
                with torch.no_grad():
                    p = torch.softmax(qm.gm(x).float(), -1).cpu()
                y = torch.multinomial(p, 1, generator=gen).squeeze(1).to(x.device)
            with Taps(groups) as taps, torch.enable_grad():
                losses = ctx.loss_fn(qm.gm(x), y)
                keys = [k for k in taps.tensors if taps.tensors[k].requires_grad]
                inputs = [taps.tensors[k] for k in keys] + (list(weights.values()) if mode == "batch" else [])
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
            for k, g in zip(keys, grads):
                if g is None:
                    continue
                g = g.detach().float()
                for b in cands:
                    d = act_delta(taps.values[k], scales[k][b], b, qm.aq[k].signed)
                    aacc[k][b] += ((g * d).flatten(1).sum(1).pow(2).sum() if form == "block"
                                   else (g.pow(2) * d.pow(2)).sum()).double()
            if mode == "batch":  # Σ_batches (g_sumᵀΔ)² / n: each batch's (g_sumᵀΔ)²/B is one estimate of the mean
                chunks = [{name: g.detach()[None, None]
                           for name, g in zip(weights, grads[len(keys):]) if g is not None}]
            else:
                chunks = per_sample_grads(ctx, weights, x, y, loss_one, mode=mode, chunk=chunk)
            for gs in chunks:
                for name, g in gs.items():
                    g = g.float().flatten(0, 1)  # (samples·K, *shape)
                    if form == "diag":
                        fdiag[name] += g.pow(2).sum(0)
                        continue
                    # every candidate in one pass over the gradients: dots[b, s, c] = g_s,c · Δ_b,c
                    dots = torch.einsum("sck,bck->bsc", g.reshape(g.shape[0], g.shape[1], -1), stacked[name])
                    for i, b in enumerate(cands):
                        wtot[name][b] += dots[i].sum(1).pow(2).sum().double()
                        if channel:
                            wacc[name][b] += dots[i].pow(2).sum(0).double()
            n += len(x)
            tick()
    raw = RawScores(meta={"samples": n, "form": form, "per_sample": ctx.meta.get("per_sample", mode), "chunk": chunk})
    for op in layers:
        name = op.weight_fqn
        raw.w[op.name], chans = {}, {}
        for b in cands:
            if form == "diag":
                chans[b] = per_channel_sum(0.5 * fdiag[name] / max(n, 1) * deltas[name][b].pow(2))
                raw.w[op.name][b] = float(sum(chans[b]))
            else:  # the layer's block, and each channel's own block (their sum drops cross-channel terms)
                chans[b] = [float(v) for v in (0.5 * wacc[name][b] / max(n, 1)).cpu()]
                raw.w[op.name][b] = float(0.5 * wtot[name][b] / max(n, 1))
        if channel:
            raw.w_channel[op.name] = chans
    for g in groups:
        raw.a[g.key] = {b: float(0.5 * aacc[g.key][b] / max(n, 1)) for b in cands}
    return raw


__all__ = ["DEFAULTS", "chunk_size", "per_sample_grads", "run"]
